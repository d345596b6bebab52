"""The allocator's error probe: the model's outputs on a few samples with one layer's tensors replaced.

Replacing a layer's weight changes only the nodes its value reaches, the layer's *suffix*; everything before
is the same for every setting. So each setting runs the suffix alone, fed the activations at its border.
Those are read for a group of consecutive layers at a time, each group's from the last one's, so reading
them all costs about one pass of the model. On PP-OCRv4 rec the whole-model probe took 38 of its 92 s.

Models with If/Loop/Scan bodies are probed whole: a body reads outer values by name, and the border would
have to follow them into every body.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from onnxpq.calibration import Dataset, batches, run_size
from onnxpq.errors import ConfigError
from onnxpq.model.files import serialized, serialized_with_outputs
from onnxpq.model.graph import constant_tensors, constants_as_inputs, node_bodies

__all__ = ["ARRAY_TYPES", "BORDER_BYTES", "NON_FINITE", "PROBE_BATCH", "OutputProbe", "squared_error"]

#: Samples per onnxruntime run of the probe. onnxruntime keeps the activation memory of its largest run:
#: all 32 at once put MobileNetV2's peak RSS at 1217 MiB (--jobs 1), 8 at a time at 902 MiB, with the same
#: wall time and the same output bytes.
PROBE_BATCH = 8
#: Output error of a setting that makes the outputs overflow or NaN: never worth its bits, yet finite
#: so the log-log interpolation and the allocator's comparisons still order it.
NON_FINITE = 1e30
#: The most bytes of border activations one group holds (two are held while the next is read). A layer
#: whose border alone is larger is probed on the whole model.
BORDER_BYTES = 64 << 20

#: onnxruntime's types of the activations a border may hold: tensors it returns as numpy arrays.
ARRAY_TYPES = frozenset(
    f"tensor({t})"
    for t in ("float", "double", "float16", "bool", *(f"{s}int{b}" for s in ("", "u") for b in (8, 16, 32, 64)))
)
#: Activation values per name: one array per probe batch.
Held = Mapping[str, Sequence[np.ndarray]]


@dataclass(frozen=True)
class _Part:
    """Nodes of the graph that compute ``outputs`` from the graph's inputs, its initializers and ``border``.

    Parameters
    ----------
    nodes : indices into ``graph.node``, in graph order (so topologically sorted).
    border : activations the nodes read that nodes outside them compute.
    outputs : names of the values computed.
    whole : the part is the whole model (a layer probed without a suffix).
    """

    nodes: tuple[int, ...]
    border: tuple[str, ...]
    outputs: tuple[str, ...]
    whole: bool = False


def _fixed(graph: onnx.GraphProto) -> set[str]:
    """The values no node computes: fed or stored."""
    return {i.name for i in graph.input} | {t.name for t in graph.initializer}


def _part(graph: onnx.GraphProto, targets: Sequence[str], held: Collection[str]) -> _Part:
    """The nodes that compute ``targets`` from the fixed values and the ``held`` activations."""
    fixed = _fixed(graph)
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    nodes, border, seen, todo = set(), set(), set(), list(targets)
    while todo:
        name = todo.pop()
        if name in seen or name in fixed:
            continue
        seen.add(name)
        if name in held:
            border.add(name)
        elif name in producer and producer[name] not in nodes:
            nodes.add(producer[name])
            todo.extend(i for i in graph.node[producer[name]].input if i)
    return _Part(tuple(sorted(nodes)), tuple(sorted(border)), tuple(targets))


def _in_order(graph: onnx.GraphProto) -> list[int] | None:
    """Node indices with every node after the producers of its inputs (the graph's own order when it is one,
    as ONNX asks, though onnxruntime sorts what it is given); None when there is no such order."""
    available, order, pending = _fixed(graph) | {""}, [], list(range(len(graph.node)))
    while pending:
        left = []
        for index in pending:
            if available.issuperset(graph.node[index].input):
                order.append(index)
                available.update(graph.node[index].output)
            else:
                left.append(index)
        if len(left) == len(pending):
            return None
        pending = left
    return order


def _sorted(graph: onnx.GraphProto) -> bool:
    """Put the nodes in topological order, in place; False when they have none."""
    order = _in_order(graph)
    if order is None:
        return False
    if order != sorted(order):
        nodes = [onnx.NodeProto.FromString(graph.node[i].SerializeToString()) for i in order]
        del graph.node[:]
        graph.node.extend(nodes)
    return True


def _whole(graph: onnx.GraphProto) -> _Part:
    return _Part(tuple(range(len(graph.node))), (), tuple(o.name for o in graph.output), whole=True)


def _suffix(graph: onnx.GraphProto, changed: Collection[str]) -> _Part:
    """The nodes that ``changed`` (graph inputs here) reaches on the way to an output, with the input-less
    nodes (``Constant``) they read; the activations they read from the other nodes are the border."""
    if any(o.name in changed for o in graph.output):
        return _whole(graph)  # a replaced tensor that is itself an output: no node computes it
    reached = set(changed)
    for node in graph.node:
        if reached.intersection(node.input):
            reached.update(o for o in node.output if o)
    held = {o for n in graph.node if n.input and not reached.intersection(n.output) for o in n.output}
    return _part(graph, [o.name for o in graph.output if o.name in reached], held)


def _border_input(name: str, arrays: Sequence[np.ndarray]) -> onnx.ValueInfoProto:
    """A graph input for a held activation: its dtype, and its dims where every batch agrees."""
    first = arrays[0]
    dims = [d if all(a.shape[i] == d for a in arrays) else f"{name}_{i}" for i, d in enumerate(first.shape)]
    return onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(first.dtype), dims)


def _part_model(model: onnx.ModelProto, part: _Part, held: Held) -> bytes:
    """The part as a model of its own: the graph inputs and initializers its nodes read, its border as
    inputs typed like the ``held`` arrays, its outputs (untyped where they are not the graph's)."""
    graph = model.graph
    nodes = [graph.node[i] for i in part.nodes]
    read = {name for n in nodes for name in n.input} | set(part.outputs)
    declared = {o.name: o for o in graph.output}
    out = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import, functions=model.functions)
    out.graph.name = graph.name
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(t for t in graph.initializer if t.name in read)
    out.graph.input.extend(i for i in graph.input if i.name in read)
    out.graph.input.extend(_border_input(name, held[name]) for name in part.border)
    out.graph.output.extend(declared.get(name, onnx.ValueInfoProto(name=name)) for name in part.outputs)
    return serialized(out)


def squared_error(ref: Sequence[np.ndarray], test: Sequence[np.ndarray] | None = None) -> float:
    """Σ (ref - test)² over all outputs in float64 (Σ ref² without ``test``), one float64 copy at a time."""
    total = 0.0
    for i, r in enumerate(ref):
        diff = r.astype(np.float64)
        if test is not None:
            diff -= test[i]
        diff *= diff
        total += float(np.sum(diff))
    return total


def _concatenated(runs: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
    """Per output, its values over all runs, flat."""
    return [np.concatenate([np.ravel(r[i]) for r in runs]) for i in range(len(runs[0]))] if runs else []


@dataclass(frozen=True)
class _Runner:
    """A session that computes a part, fed only the inputs it declares."""

    session: ort.InferenceSession
    outputs: Sequence[str]

    def runs(self, feeds: Sequence[Mapping[str, np.ndarray]], held: Held) -> list[list[np.ndarray]]:
        """Its outputs on each probe batch: ``feeds`` and the ``held`` activations of the same batch."""
        inputs = [i.name for i in self.session.get_inputs()]
        runs = []
        for index, feed in enumerate(feeds):
            values = {n: held[n][index] if n in held else feed[n] for n in inputs}
            runs.append(self.session.run(list(self.outputs), values))
        return runs


def _runner(model: onnx.ModelProto, part: _Part, held: Held, *, arena: bool = True) -> _Runner:
    """A runner of ``part`` (``arena``: see ``session``; off for the whole model's, which waits while the
    suffixes run: its arena held 260 MB more on BERT-base)."""
    from onnxpq.model.session import session

    # The whole model as it is: its If/Loop/Scan bodies read outer values that no main-graph node lists.
    source = serialized(model) if part.whole else _part_model(model, part, held)
    return _Runner(session(source, prepack=False, arena=arena), part.outputs)


class OutputProbe:
    """Relative output MSE of the model with one layer's tensors replaced, on the first ``samples`` samples.

    ``layers`` maps each layer to the tensors a setting of it replaces (its weight, and the bias its
    correction moves). Ask for the layers in ``order``: border activations are held for one group of
    consecutive layers at a time, at most ``border_bytes`` of them.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        layers: Mapping[str, Collection[str]],
        dataset: Dataset,
        samples: int,
        *,
        border_bytes: int = BORDER_BYTES,
    ) -> None:
        replaced = {n for changed in layers.values() for n in changed}
        constants = constant_tensors(model.graph)
        values = {n: constants[n].to_array() for n in replaced}
        self.model = constants_as_inputs(model, replaced)
        graph = self.model.graph
        probed = dataset.head(samples)
        self.feeds = [{**feed, **values} for feed in batches(probed, model, batch_size=PROBE_BATCH)]
        self.whole = _runner(self.model, _whole(graph), {}, arena=False)
        self.reference = dict(zip(self.whole.outputs, _concatenated(self.whole.runs(self.feeds, {})), strict=True))
        # Over the outputs as listed, a repeated one as often as a suffix's error counts it; once, not per probe.
        self.signal = squared_error([self.reference[n] for n in self.whole.outputs])
        broken = [name for name, r in self.reference.items() if not np.isfinite(r).all()]
        if broken:
            raise ConfigError(
                f"the model's output {broken[0]!r} is not finite (inf or NaN) on the first {samples} "
                "calibration samples, so the bit allocation has nothing to measure errors against; "
                "check the calibration data"
            )
        # Bodies read outer values by name, past any border; a graph without a topological order has no suffixes.
        whole = any(True for n in graph.node for _ in node_bodies(n)) or not _sorted(graph)
        self.suffixes = {name: _whole(graph) if whole else _suffix(graph, ch) for name, ch in layers.items()}
        self.order = sorted(layers, key=lambda n: (self.suffixes[n].nodes[:1] or (len(graph.node),), n))
        step = run_size(probed, model, 1)  # one sample, or a fixed batch of them
        first = next(batches(probed.head(step), model, batch_size=1))
        sizes = self._border_bytes({**self.feeds[0], **first}, probed.n_samples / step)
        self.groups = self._grouped(sizes, border_bytes)
        self._held: tuple[int, dict[str, list[np.ndarray]]] = (-1, {})
        self._suffix: tuple[str, _Runner, list[np.ndarray]] | None = None

    def _border_bytes(self, first: Mapping[str, np.ndarray], runs: float) -> dict[str, float]:
        """Bytes each border activation takes over all probe samples, ``runs`` times a run of ``first``;
        infinite for one that cannot be fed back as an array (a sequence, an optional, a bfloat16 tensor)."""
        from onnxpq.model.session import session

        names = sorted({b for s in self.suffixes.values() for b in s.border})
        if not names:
            return {}
        built = session(serialized_with_outputs(self.model, names), prepack=False, arena=False)
        arrays = [o.name for o in built.get_outputs() if o.name in names and o.type in ARRAY_TYPES]
        sized = dict(zip(arrays, _Runner(built, arrays).runs([first], {})[0], strict=True)) if arrays else {}
        return {n: sized[n].nbytes * runs if n in sized else math.inf for n in names}

    def _grouped(self, sizes: Mapping[str, float], limit: int) -> dict[str, int]:
        """Each layer's group: consecutive layers (in ``order``) whose borders together fit ``limit`` bytes.
        A layer whose border alone does not fit is probed whole."""
        groups, group, held = {}, 0, set()
        for name in self.order:
            border = set(self.suffixes[name].border)
            if sum(sizes[b] for b in border) > limit:
                self.suffixes[name], border = _whole(self.model.graph), set()
            if sum(sizes[b] for b in held | border) > limit:
                group, held = group + 1, set()
            held |= border
            groups[name] = group
        return groups

    def _border(self, layer: str) -> dict[str, list[np.ndarray]]:
        """The border activations of ``layer``'s group on each probe batch, computed from the last group's
        (read once per group: consecutive layers' suffixes start near each other)."""
        group = self.groups[layer]
        if self._held[0] != group:
            last = self._held[1]
            names = sorted({b for n, g in self.groups.items() if g == group for b in self.suffixes[n].border})
            held = {n: last[n] for n in names if n in last}
            todo = [n for n in names if n not in last]
            if todo:
                segment = _runner(self.model, _part(self.model.graph, todo, last), last, arena=False)
                runs = segment.runs(self.feeds, last)
                held.update((n, [r[i] for r in runs]) for i, n in enumerate(todo))
            self._held = (group, held)
        return self._held[1]

    def _suffix_runner(self, layer: str) -> tuple[_Runner, list[np.ndarray]]:
        """The session of ``layer``'s suffix (the whole model's when probed whole) and the outputs to measure
        against; the last layer's are kept."""
        suffix = self.suffixes[layer]
        if suffix.whole:
            return self.whole, [self.reference[n] for n in suffix.outputs]
        if self._suffix is None or self._suffix[0] != layer:
            self._suffix = None  # let go of the last layer's session before building this one
            held = self._border(layer)
            runner = _runner(self.model, suffix, held)
            reference = [self.reference[n] for n in suffix.outputs]
            if any(held[b][0].dtype.kind == "f" and held[b][0].dtype.itemsize < 4 for b in suffix.border):
                # onnxruntime runs float16 nodes in float32 and drops the casts between them, so the whole
                # model never rounds there, and a float16 border would read as error of its own.
                reference = _concatenated(runner.runs(self.feeds, held))
            self._suffix = (layer, runner, reference)
        return self._suffix[1], self._suffix[2]

    def error(self, layer: str, changed: Mapping[str, np.ndarray]) -> float:
        """Relative output MSE of the model with ``changed`` in place of ``layer``'s original tensors."""
        suffix = self.suffixes[layer]
        if not suffix.outputs:
            return 0.0  # the layer reaches no output
        (runner, reference), held = self._suffix_runner(layer), {} if suffix.whole else self._border(layer)
        runs = runner.runs([{**feed, **changed} for feed in self.feeds], held)
        noise = squared_error(reference, _concatenated(runs))
        error = noise / self.signal if self.signal > 0 else noise
        return error if math.isfinite(error) else NON_FINITE
