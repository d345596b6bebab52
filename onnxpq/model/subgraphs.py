"""Weights inside ``If``/``Loop``/``Scan`` bodies: walk every scope, and lift those weights into the main graph.

A body may read any value of an enclosing scope (ONNX IR, "Names within a
graph"), so a constant weight moved from a branch into the main graph's
initializers leaves the model's function unchanged. Once lifted it is an ordinary
main-graph constant: selection, quantization, the bit allocator and the encoder
treat it like any other, and its decode chain sits in the main graph, where
onnxruntime folds it at session creation. (onnxruntime 1.32 also folds a
``Cast -> Gather`` chain placed inside a branch, with its tables inside or outside
the branch; one place for every decode chain keeps the encoder simple.)

Lifting changes no value and adds no node; it moves only float constants of rank
2 or more (the only ones onnxpq ever compresses), so small shape constants stay
where they are.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import onnx
from onnx import helper

from onnxpq.model.graph import display_name, node_bodies
from onnxpq.model.tensors import FLOAT_TYPES

__all__ = [
    "ScopedNode",
    "inline_branches",
    "lift_subgraph_weights",
    "scoped_nodes",
    "subgraph_weight_count",
    "value_names",
]


@dataclass(frozen=True)
class ScopedNode:
    """A node of the main graph or of a body nested in it, at any depth.

    Parameters
    ----------
    name : display name with the path of the bodies above it, e.g. ``If_0/then_branch/Conv_3``.
    node : the node itself.
    in_subgraph : the node is inside an ``If``/``Loop``/``Scan`` body.
    hidden : names the enclosing bodies define themselves; inside this node's scope they
        shadow main-graph values of the same name.
    """

    name: str
    node: onnx.NodeProto
    in_subgraph: bool
    hidden: frozenset[str]


def _own_names(graph: onnx.GraphProto) -> set[str]:
    """The names one graph defines itself (not those of its nested bodies)."""
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    return names | {o for n in graph.node for o in n.output if o}


def scoped_nodes(
    graph: onnx.GraphProto, prefix: str = "", hidden: frozenset[str] = frozenset()
) -> Iterator[ScopedNode]:
    """Every node in graph order, depth first: each node is followed by the nodes of its bodies."""
    for index, node in enumerate(graph.node):
        name = prefix + display_name(node, index)
        yield ScopedNode(name, node, bool(prefix), hidden)
        for attr_name, body in node_bodies(node):
            yield from scoped_nodes(body, f"{name}/{attr_name}/", hidden | _own_names(body))


def value_names(graph: onnx.GraphProto) -> Counter[str]:
    """How many times each value name is defined, over the graph and all its bodies."""
    counts = Counter(_own_names(graph))
    for node in graph.node:
        for _, body in node_bodies(node):
            counts.update(value_names(body))
    return counts


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    return next((a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)


def _liftable(tensor: onnx.TensorProto) -> bool:
    return tensor.data_type in FLOAT_TYPES and len(tensor.dims) >= 2


def subgraph_weight_count(graph: onnx.GraphProto) -> int:
    """Float constants of rank >= 2 still inside bodies: after lifting, only those a body returns as an output."""
    count = 0
    for node in graph.node:
        for _, body in node_bodies(node):
            consts = list(body.initializer) + [t for n in body.node if (t := _constant_value(n)) is not None]
            count += sum(_liftable(t) for t in consts) + subgraph_weight_count(body)
    return count


@dataclass
class _Lifter:
    """Moves body weights into ``main``, renaming each one whose name is defined more than once in the model."""

    main: onnx.GraphProto
    counts: Counter[str]
    taken: set[str]

    def new_name(self, old: str, path: str) -> str:
        return old if self.counts[old] == 1 else _scoped_name(old, path, self.taken)

    def lift(self, body: onnx.GraphProto, path: str) -> None:
        """Lift ``body``'s own weights, then those of the bodies nested in it."""
        fixed = {o.name for o in body.output} | {i.name for i in body.input}
        moved: dict[str, str] = {}
        kept_inits = []
        for tensor in body.initializer:
            if _liftable(tensor) and tensor.name not in fixed:
                moved[tensor.name] = self._add(tensor, tensor.name, path)
            else:
                kept_inits.append(tensor)
        kept_nodes = []
        for node in body.node:
            value = _constant_value(node)
            if value is not None and _liftable(value) and node.output[0] not in fixed:
                moved[node.output[0]] = self._add(value, node.output[0], path)
            else:
                kept_nodes.append(node)
        if not moved:
            self._nested(body, path)
            return
        del body.initializer[:], body.node[:]
        body.initializer.extend(kept_inits)
        body.node.extend(kept_nodes)
        kept_info = [v for v in body.value_info if v.name not in moved]
        del body.value_info[:]
        body.value_info.extend(kept_info)
        for old, new in moved.items():
            if old != new:
                _rename_reads(body, old, new)
        self._nested(body, path)

    def _nested(self, body: onnx.GraphProto, path: str) -> None:
        for index, node in enumerate(body.node):
            for attr_name, inner in node_bodies(node):
                self.lift(inner, f"{path}/{display_name(node, index)}/{attr_name}")

    def _add(self, tensor: onnx.TensorProto, old: str, path: str) -> str:
        lifted = onnx.TensorProto()
        lifted.CopyFrom(tensor)
        lifted.name = self.new_name(old, path)
        self.main.initializer.append(lifted)
        return lifted.name


def _scoped_name(old: str, path: str, taken: set[str]) -> str:
    """``<path>/<old>``, with a numeric suffix if that is taken too; the name is added to ``taken``."""
    base = f"{path}/{old}"
    name, suffix = base, 0
    while name in taken:
        suffix += 1
        name = f"{base}_{suffix}"
    taken.add(name)
    return name


def _rename_reads(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Point every read of ``old`` in ``graph`` and its bodies at ``new``, except where a body redefines ``old``."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for _, body in node_bodies(node):
            if old not in _own_names(body):
                for out in body.output:
                    if out.name == old:
                        out.name = new
                _rename_reads(body, old, new)


def lift_subgraph_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose body weights (float constants of rank >= 2) are main-graph initializers.

    A weight keeps its name when the name is defined only once in the whole
    model; otherwise (two branches each holding a ``weight``, or a body reusing
    a main-graph name) it becomes ``<body path>/<name>``, made unique, and the
    body's reads follow it. A weight a body returns directly as an output stays.
    Returns ``model`` itself when it has no body, so such models pass unchanged.
    """
    if not any(True for node in model.graph.node for _ in node_bodies(node)):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    counts = value_names(out.graph)
    lifter = _Lifter(out.graph, counts, set(counts))
    for index, node in enumerate(out.graph.node):
        for attr_name, body in node_bodies(node):
            lifter.lift(body, f"{display_name(node, index)}/{attr_name}")
    return out


def _inlined(
    node: onnx.NodeProto, name: str, branch: str, counts: Counter[str], taken: set[str]
) -> list[onnx.NodeProto]:
    """The nodes of one ``If``'s ``branch`` as main-graph nodes that define the ``If``'s outputs.

    Each node is named by its scoped path (``If_0/then_branch/Conv_3``, as ``scoped_nodes`` names
    it), and each value the branch defines that another scope defines too becomes ``<path>/<name>``
    (made unique, as lifted weights are), so nothing in the main graph is redefined; Identity nodes
    hand the branch outputs to the ``If``'s.
    """
    body = onnx.GraphProto()
    body.CopyFrom(next(g for attr, g in node_bodies(node) if attr == branch))
    path = f"{name}/{branch}"
    for value in sorted(_own_names(body)):
        if counts[value] > 1:
            renamed = _scoped_name(value, path, taken)
            for n in body.node:
                n.output[:] = [renamed if o == value else o for o in n.output]
            for t in body.initializer:
                t.name = renamed if t.name == value else t.name
            for o in body.output:
                o.name = renamed if o.name == value else o.name
            _rename_reads(body, value, renamed)
    nodes = [helper.make_node("Constant", [], [t.name], f"{path}/{t.name}", value=t) for t in body.initializer]
    for index, inner in enumerate(body.node):
        copy = onnx.NodeProto()
        copy.CopyFrom(inner)
        copy.name = f"{path}/{display_name(inner, index)}"
        nodes.append(copy)
    for out, value in zip(node.output, body.output, strict=True):
        nodes.append(helper.make_node("Identity", [value.name], [out], f"{path}/output/{out}"))
    return nodes


def inline_branches(model: onnx.ModelProto, taken: dict[str, str]) -> onnx.ModelProto:
    """A copy of ``model`` in which each main-graph ``If`` named in ``taken`` is replaced by its branch there.

    ``taken`` maps an ``If``'s display name to ``then_branch`` or ``else_branch``: the branch its
    condition chose on every calibration sample. The copy computes the same outputs on those samples,
    and the weights that branch reads (lifted into the main graph first) are read by main-graph nodes,
    whose inputs onnxruntime can expose: this is the graph layer statistics are collected on, never
    the one written out, which keeps both branches.
    """
    if not taken:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    counts = value_names(out.graph)
    names = set(counts)
    nodes = []
    for index, node in enumerate(out.graph.node):
        name = display_name(node, index)
        if node.op_type == "If" and name in taken:
            nodes.extend(_inlined(node, name, taken[name], counts, names))
        else:
            nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out
