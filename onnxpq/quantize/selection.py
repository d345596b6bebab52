"""Choose which weights to compress and how to cut each one into subvectors.

Every constant weight read by a supported operator becomes a ``Candidate``;
the ones that stay in float carry a ``skip_reason`` so the report can say why.
The subvector layout follows PQF's blocks and is chosen so the decoded
``Gather`` output is the weight in its own memory order: no Transpose is ever
needed at decode time.

Which weights are candidates:

1. The weight inputs of the operators in ``operators.REGISTRY`` (Conv, ConvTranspose, Gemm, MatMul,
   FusedMatMul, Gather, Einsum, and W and R of LSTM, GRU and RNN), when the weight is a constant.
2. Readers inside If/Loop/Scan bodies count like main-graph ones (a body's own
   weights are first lifted into the main graph, see ``subgraphs``).
3. The first Conv stays in float only when it is small (``_first_conv_kept``):
   at most 4 input channels per group and 1 % of the weights, as the first conv
   of an image or audio CNN is; ``keep_first`` True/False forces either way.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx

from onnxpq.config import CompressConfig
from onnxpq.errors import ConfigError
from onnxpq.model.graph import ConstantTensor, attributes, constant_tensors
from onnxpq.model.subgraphs import scoped_nodes
from onnxpq.model.tensors import FLOAT_TYPES
from onnxpq.operators import MULTIPLYING, RESHAPING_OPS, operator

__all__ = [
    "Candidate",
    "NodePattern",
    "Use",
    "find_candidates",
    "node_patterns",
    "pattern_counts",
    "variants",
    "with_uses_in",
]

#: The first Conv stays in float by default only when it reads at most this many channels per group
#: (an image's RGB, a mono or stereo waveform)...
FIRST_CONV_MAX_CHANNELS = 4
#: ... and holds at most this share of the compressible weights. ImageNet CNNs' first convs hold
#: 0.01-0.1 % (MobileNetV2 864 of 3.4 M, ResNet-50 9408 of 25 M); keeping a 1 % layer in float
#: costs at most 0.32 bits/weight of any budget, while a byte model whose first conv holds 84 %
#: of the weights could not go below 27 bits/weight with it kept.
FIRST_CONV_MAX_SHARE = 0.01
#: PQF's target subvector sizes: (small, large) for kernels with spatial extent and for the rest.
KERNEL_DIM = {"small": 9, "large": 18}
ROW_DIM = {"small": 4, "large": 8}


@dataclass(frozen=True)
class Use:
    """One node reading a weight: which node, its operator and which of its inputs.

    ``inputs_first`` is true when the node reduces over the weight's first axis
    (MatMul's [K, N] weight, Gemm with transB=0): subvectors must then run down
    that axis to stay along the inputs. ``in_subgraph`` is true for a node inside an
    ``If``/``Loop``/``Scan`` body; ``node`` then holds the body path (``If_0/then_branch/Conv_3``).
    """

    node: str
    op_type: str
    input_index: int
    inputs_first: bool = False
    in_subgraph: bool = False


@dataclass(frozen=True)
class Candidate:
    """A constant weight and how it will be quantized.

    Parameters
    ----------
    name : tensor name of the weight.
    shape : the weight's shape.
    uses : the nodes that read it (a shared weight is compressed once).
    kind : the operator family that decides the layout (``Conv``, ``Gemm``, ... or ``other``).
    row_axes : leading axes that are kept as index dimensions; the rest is one
        contiguous row cut into subvectors of ``subvector_dim`` weights.
    subvector_dim : d, or 0 when skipped.
    n_codewords : k after clamping, or 0 when skipped.
    skip_reason : why the weight stays in float; None when it is compressed.
    fix : the command-line option that would compress a skipped weight, when one would
        (``--no-keep-first``, ``--min-elements`` ...); None otherwise.
    strided : a 2-D [K, N] weight whose subvectors run along the K inputs: subvector
        (j, n) holds rows j, j + K/d, j + 2K/d, ... of column n, which a Gather on
        axis 1 of a [d, k] codebook followed by one Reshape rebuilds without a Transpose.
    """

    name: str
    shape: tuple[int, ...]
    dtype: int
    uses: tuple[Use, ...]
    kind: str
    row_axes: int = 1
    subvector_dim: int = 0
    n_codewords: int = 0
    skip_reason: str | None = None
    strided: bool = False
    fix: str | None = None

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def compressed(self) -> bool:
        return self.skip_reason is None

    @property
    def n_subvectors(self) -> int:
        return self.size // self.subvector_dim if self.subvector_dim else 0

    @property
    def node_names(self) -> tuple[str, ...]:
        return tuple(u.node for u in self.uses)


def _nearest_divisor(n: int, target: float) -> int:
    """The divisor of ``n`` closest to ``target``; ties go to the smaller one (more bits, safer)."""
    divisors = [d for d in range(1, min(n, 4 * math.ceil(target)) + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), d))


def _layout(
    kind: str, shape: tuple[int, ...], config: CompressConfig, *, strided: bool = False
) -> tuple[int, int, str | None]:
    """(row_axes, subvector_dim, skip_reason) for a weight of this operator family and shape.

    1. Conv/ConvTranspose: rows are dim 0, the row is the flattened kernel slab (dim 1 onwards);
       a 3x3 kernel gives d=9 (small) or 18 (large: two input channels), other kernels keep
       about the same bits per weight by taking the divisor of the row closest to 9 or 18,
       never a whole big kernel as one subvector.
    2. Everything else: rows are all axes but the last, cut along the last, contiguous axis
       (Gemm transB=1 and Gather rows cut along inputs; an RNN's W and R have a row per
       (direction, gate unit), cut along its inputs) with d=4 or 8.
    3. Strided 2-D [K, N] weights (MatMul, Gemm transB=0): d divides K, subvectors along the inputs.
    """
    if len(shape) < 2:
        return 0, 0, "1-D tensor: per-channel vectors stay in float"
    op = operator(kind)
    conv = op is not None and op.layout == "kernel"
    row_axes = 1 if conv or strided else len(shape) - 1
    row = shape[0] if strided else math.prod(shape[row_axes:])
    spatial = math.prod(shape[2:]) if conv else 1
    if config.subvector_dim is not None:
        d = config.subvector_dim
        if row % d:
            what = "inputs" if strided else "weights of each row"
            return row_axes, 0, f"subvector_dim={d} does not divide the {row} {what}"
        return row_axes, d, None
    target = (KERNEL_DIM if spatial > 1 else ROW_DIM)[config.block_size]
    return row_axes, _nearest_divisor(row, target), None


def _clamp_codewords(n_subvectors: int, requested: int) -> int:
    """k <= 2^floor(log2(n/4)): at least four subvectors per codeword, else the codebook just memorises."""
    if n_subvectors < 8:
        return 0
    return min(requested, 2 ** math.floor(math.log2(n_subvectors / 4)))


def _uses(graph: onnx.GraphProto, constants: dict[str, ConstantTensor]) -> dict[str, list[Use]]:
    """For each constant, the nodes reading it in graph order, inside If/Loop/Scan bodies too.

    A body that defines a name of its own shadows the main-graph constant of that name.
    """
    uses: dict[str, list[Use]] = {}
    for scoped in scoped_nodes(graph):
        node = scoped.node
        for i, name in enumerate(node.input):
            if name in constants and name not in scoped.hidden:
                op = operator(node.op_type)
                inputs_first = op is not None and op.inputs_first(attributes(node), i)
                use = Use(scoped.name, node.op_type, i, inputs_first, scoped.in_subgraph)
                uses.setdefault(name, []).append(use)
    return uses


def _owner(uses: Sequence[Use]) -> Use | None:
    """The use that decides a weight's layout: the first where it is one of that operator's weight inputs."""
    for use in uses:
        op = operator(use.op_type)
        if op is not None and use.input_index in op.weight_inputs:
            return use
    return None


def _first_conv(graph: onnx.GraphProto) -> str | None:
    """The first Conv in graph order (a body's nodes count where their If/Loop/Scan node stands)."""
    return next((s.name for s in scoped_nodes(graph) if s.node.op_type == "Conv"), None)


def _small_first_conv(shape: tuple[int, ...], share: float) -> bool:
    """PQF keeps the first conv of an ImageNet CNN in float: few input channels, a tiny share of the weights."""
    return len(shape) >= 2 and shape[1] <= FIRST_CONV_MAX_CHANNELS and share <= FIRST_CONV_MAX_SHARE


@dataclass(frozen=True)
class NodePattern:
    """A ``nodes_to_exclude``/``nodes_to_include`` pattern as typed, resolved against the graph's node names.

    1. A pattern equal to a node name matches that node only: onnxruntime's ``nodes_to_exclude`` takes
       exact names, and ``Conv_1`` must not also catch ``Conv_10`` ... ``Conv_19``.
    2. Any other pattern is a regular expression searched (``re.search``) in every node name.
    """

    pattern: str
    option: str
    exact: bool

    @property
    def flag(self) -> str:
        """The command-line option the pattern came from, for messages."""
        return "--" + self.option.replace("_", "-")

    def matches(self, node: str) -> bool:
        return node == self.pattern if self.exact else re.search(self.pattern, node) is not None


def node_patterns(patterns: Sequence[str], names: Sequence[str], option: str) -> tuple[NodePattern, ...]:
    """Resolve each pattern of ``option`` (rule 1 or 2 of ``NodePattern``); one matching no node is almost
    always a typo, so it is an error that shows the closest names."""
    known = set(names)
    resolved = []
    for pattern in patterns:
        node_pattern = NodePattern(pattern, option, pattern in known)
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(
                f"{node_pattern.flag} pattern {pattern!r} is not a valid regular expression: {err}"
            ) from None
        if not any(node_pattern.matches(n) for n in names):
            close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.3)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise ConfigError(f"{node_pattern.flag} pattern {pattern!r} matches no node{hint}")
        resolved.append(node_pattern)
    return tuple(resolved)


def _config_patterns(config: CompressConfig, names: Sequence[str]) -> tuple[NodePattern, ...]:
    """Every node pattern of ``config``, include patterns first, resolved against the node names."""
    return node_patterns(config.nodes_to_include, names, "nodes_to_include") + node_patterns(
        config.nodes_to_exclude, names, "nodes_to_exclude"
    )


def pattern_counts(model: onnx.ModelProto, config: CompressConfig) -> list[dict[str, Any]]:
    """How many nodes each node pattern matched, for the report's ``selection.patterns``: a pattern that
    catches more nodes than meant (a regex ``Conv_1`` also catches ``Conv_10``) is otherwise invisible."""
    names = [s.name for s in scoped_nodes(model.graph)]
    return [
        {"pattern": p.pattern, "option": p.option, "matched": sum(map(p.matches, names)), "exact": p.exact}
        for p in _config_patterns(config, names)
    ]


def _first_conv_kept(
    graph: onnx.GraphProto, uses: dict[str, list[Use]], constants: dict[str, ConstantTensor], config: CompressConfig
) -> tuple[str, str] | None:
    """(node, skip reason) when the first Conv stays in float, else None.

    ``keep_first`` True keeps it and False compresses it; None (the default) keeps it
    only when it is small as in PQF's ImageNet CNNs: at most ``FIRST_CONV_MAX_CHANNELS``
    input channels per group and at most ``FIRST_CONV_MAX_SHARE`` of the float constants
    at the weight inputs of the supported operators (counted before any other rule, so
    ``--op-types`` or ``--min-elements`` do not move the share).
    """
    first = _first_conv(graph)
    if first is None or config.keep_first is False:
        return None
    if config.keep_first:
        return first, "first conv kept in float (--keep-first)"
    weight = next((n for n, us in uses.items() if any(u.node == first and u.input_index == 1 for u in us)), None)
    if weight is None:
        return None
    total = sum(
        math.prod(constants[n].tensor.dims)
        for n, us in uses.items()
        if _owner(us) is not None and constants[n].tensor.data_type in FLOAT_TYPES
    )
    shape = tuple(int(d) for d in constants[weight].tensor.dims)
    share = math.prod(shape) / max(total, 1)
    if not _small_first_conv(shape, share):
        return None
    return first, (
        f"first conv kept in float: {shape[1]} input channel(s) per group, {share:.2%} of the weights "
        "(small, as PQF keeps it)"
    )


def _skip_reason(
    family: str | None,
    uses: Sequence[Use],
    dtype: int,
    size: int,
    config: CompressConfig,
    first_conv: tuple[str, str] | None,
    patterns: Sequence[NodePattern],
) -> tuple[str, str | None] | None:
    """(why a weight must stay in float, the option that changes it), checked in the order a user would ask."""
    nodes = [u.node for u in uses]
    include = [p for p in patterns if p.option == "nodes_to_include"]
    exclude = [p for p in patterns if p.option == "nodes_to_exclude"]
    if family is not None and family not in config.op_types and not config.all_op_types:
        return f"op type {family} not selected (--op-types)", "--op-types"
    if include and not any(p.matches(n) for p in include for n in nodes):
        return "not matched by --nodes-to-include", "--nodes-to-include"
    if any(p.matches(n) for p in exclude for n in nodes):
        return "matched by --nodes-to-exclude", "--nodes-to-exclude"
    if first_conv is not None and first_conv[0] in nodes:
        return first_conv[1], "--no-keep-first"
    if dtype not in FLOAT_TYPES:
        return f"{onnx.TensorProto.DataType.Name(dtype).lower()} weight: already integer or not float", None
    if size < config.min_size:
        return f"{size} elements < --min-elements {config.min_size}", "--min-elements"
    return None


def _candidate(
    name: str,
    constant: ConstantTensor,
    uses: Sequence[Use],
    owner: Use | None,
    config: CompressConfig,
    first_conv: tuple[str, str] | None,
    patterns: Sequence[NodePattern],
) -> Candidate:
    tensor = constant.tensor
    shape = tuple(int(d) for d in tensor.dims)
    family = owner.op_type if owner else None
    kind = family or "other"
    strided = owner is not None and owner.inputs_first and len(shape) == 2
    skipped = _skip_reason(family, uses, tensor.data_type, math.prod(shape), config, first_conv, patterns)
    reason, fix = skipped or (None, None)
    row_axes, d, layout_reason = _layout(kind, shape, config, strided=strided)
    if reason is None and layout_reason is not None:
        reason, fix = layout_reason, "--subvector-dim" if config.subvector_dim is not None else None
    k = 0
    if reason is None:
        k = _clamp_codewords(math.prod(shape) // d, config.n_codewords)
        if k == 0:
            reason = f"only {math.prod(shape) // d} subvectors of d={d}: too few for a codebook"
    if reason is None and not np.isfinite(constant.to_array()).all():
        reason = "contains NaN or Inf"
    if reason is not None:
        d, k = 0, 0
    return Candidate(name, shape, tensor.data_type, tuple(uses), kind, row_axes, d, k, reason, strided, fix)


def variants(c: Candidate) -> list[Candidate]:
    """Other layouts a bit allocator may give a compressed weight: about half and double its d, and d=1
    (scalar k-means: 8 bits/weight, for the layers that need them), each with k, k/2 ... k/16 codewords.

    The fewer codewords make the rate grid dense (d=1 at 4-8 bits, d=2 at 2-4 ...),
    and on small layers the fp16 codebook, not the indices, is what sets the size. On
    MobileNetV2 at 2.64 bits/weight, with every setting's output error measured,
    the allocator chose a k below the maximum for 29 of the 49 layers, at every d.
    Each variant keeps ``selection``'s rules (d divides the row or the inputs, k
    clamped to n/4), so any of them encodes without a Transpose.
    """
    row = c.shape[0] if c.strided else math.prod(c.shape[c.row_axes :])
    dims = sorted(
        {1, c.subvector_dim, _nearest_divisor(row, c.subvector_dim / 2), _nearest_divisor(row, 2 * c.subvector_dim)}
    )
    out = []
    for d in dims:
        k = _clamp_codewords(c.size // d, max(c.n_codewords, 2))
        out.extend(replace(c, subvector_dim=d, n_codewords=k >> shift) for shift in range(5) if k >> shift >= 2)
    return out


def _readers_by_input(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """For each value name, the nodes (inside bodies too) that read it."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for scoped in scoped_nodes(graph):
        for name in scoped.node.input:
            readers.setdefault(name, []).append(scoped.node)
    return readers


def _final_readers(name: str, readers: dict[str, list[onnx.NodeProto]]) -> set[str]:
    """Operator types that read ``name`` once the ``RESHAPING_OPS`` between them are looked through."""
    found: set[str] = set()
    todo, seen = [name], {name}
    while todo:
        for node in readers.get(todo.pop(), []):
            if node.op_type not in RESHAPING_OPS:
                found.add(node.op_type)
                continue
            for out in node.output:
                if out and out not in seen:
                    seen.add(out)
                    todo.append(out)
    return found


def _reshaped_weight(
    name: str,
    tensor: onnx.TensorProto,
    uses: Sequence[Use],
    readers: dict[str, list[onnx.NodeProto]],
    config: CompressConfig,
) -> bool:
    """A matrix that reaches only selected ``MULTIPLYING`` operators, and only through ``RESHAPING_OPS``, as exporters
    leave recurrent weights: Silero VAD's LSTM cell reaches its [512, 128] gate weights through Slice and
    Concat. Such a weight is compressed data-free by default; its rows are cut along the last axis. A table
    that ends in an Add (a sliced positional embedding) stays float unless ``--op-types all``."""
    if len(tensor.dims) < 2 or not all(u.op_type in RESHAPING_OPS for u in uses):
        return False
    final = _final_readers(name, readers)
    return bool(final) and final <= MULTIPLYING and final <= set(config.op_types)


def find_candidates(model: onnx.ModelProto, config: CompressConfig) -> list[Candidate]:
    """Every main-graph constant weight that a selected operator reads, with its layout or skip reason.

    Readers inside If/Loop/Scan bodies count (their names carry the body path), so a
    body weight lifted into the main graph (``subgraphs.lift_subgraph_weights``) is a
    candidate like any other. Weights read only by other operators are considered
    only with ``--op-types all`` or when they reach selected ``MULTIPLYING`` operators only through
    ``RESHAPING_OPS``, and
    then only float tensors of at least ``min_elements``.
    """
    graph = model.graph
    constants = constant_tensors(graph)
    patterns = _config_patterns(config, [s.name for s in scoped_nodes(graph)])
    uses_by_name = _uses(graph, constants)
    first_conv = _first_conv_kept(graph, uses_by_name, constants, config)
    readers = _readers_by_input(graph)
    candidates = []
    for name, uses in uses_by_name.items():
        owner = _owner(uses)
        tensor = constants[name].tensor
        if owner is None:
            large_float = tensor.data_type in FLOAT_TYPES and math.prod(tensor.dims) >= config.min_size
            if not (large_float and (config.all_op_types or _reshaped_weight(name, tensor, uses, readers, config))):
                continue
        candidates.append(_candidate(name, constants[name], uses, owner, config, first_conv, patterns))
    return candidates


def with_uses_in(model: onnx.ModelProto, candidates: Sequence[Candidate]) -> list[Candidate]:
    """``candidates`` with the uses they have in ``model``, a variant of the graph they were found in.

    For the graph the statistics run on (``subgraphs.inline_branches``): a weight that a taken branch
    reads is read there by main-graph nodes, so it gets statistics; a weight only an untaken branch
    reads is absent there and keeps its uses, and stays data-free. The layout is unchanged.
    """
    uses = _uses(model.graph, constant_tensors(model.graph))
    out = []
    for c in candidates:
        found = uses.get(c.name)
        owner = _owner(found) if found else None
        out.append(replace(c, uses=tuple(found)) if owner is not None and owner.op_type == c.kind else c)
    return out
