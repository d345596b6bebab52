"""Channel-space analysis: which channels of a graph can be reordered without changing what it computes.

A *channel space* is a set of C channels that several tensors share along one
axis: a Conv's output channels are rows of its weight and entries of its bias,
flow through activations, pooling and normalisation (whose per-channel
parameters follow), are summed with other spaces by residual Adds (which merge
the spaces), and end as the input channels of the next Conv/Gemm/MatMul
weights. Permuting every member of a space by the same permutation leaves the
model's outputs unchanged, at no runtime cost.

The analysis walks the graph once, tracking for every activation which space
(or which blocks of spaces, after a Concat or a Flatten) lies along its channel
axis, and merges spaces with a union-find. Concat and Split on the channel
axis move whole spaces to new offsets; Pad passes channels through when it pads
other axes. A space touched by anything the rules do not understand (a graph
output, a Reshape that mixes channels, an unknown operator, a Split that cuts a
space in two, a grouped Conv, ...) is frozen, with the reason recorded. The
operator rules are data (``PASS_THROUGH``, ``PER_CHANNEL_PARAMS`` ...) so
support for a new operator is one table entry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxpq.model.graph import attributes, constant_tensors, display_name, node_bodies, readers, value_dims

__all__ = ["ChannelGroup", "Member", "Segment", "find_groups"]

#: Operators whose output has the input's channels, unchanged, on the same axis.
PASS_THROUGH = {
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Softplus",
    "Softsign", "Clip", "Gelu", "Erf", "Mish", "Exp", "Log", "Sqrt", "Neg", "Abs", "Reciprocal", "Floor", "Ceil",
    "Round", "Sign", "Identity", "Dropout", "Cast", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool",
    "GlobalMaxPool", "GlobalLpPool", "Resize", "Upsample", "Sin", "Cos",
}  # fmt: skip
#: Operators that read a tracked tensor without caring about its channel order.
ORDER_FREE = {"Shape", "Size"}
#: Elementwise binary operators: two activations merge their spaces; a constant must be per-channel or broadcast.
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow"}
#: Normalisations over spatial axes whose listed inputs are per-channel vectors (axis 0).
PER_CHANNEL_PARAMS = {
    "BatchNormalization": (1, 2, 3, 4),
    "InstanceNormalization": (1, 2),
}


@dataclass(frozen=True)
class Member:
    """A constant that a space's permutation reorders: along ``axis``, channel c occupies indices
    ``offset + c*block ... offset + c*block + block - 1`` (block > 1 after a Flatten)."""

    tensor: str
    axis: int
    offset: int = 0
    block: int = 1
    role: str = "param"  # "producer", "consumer" or "param"
    node: str = ""


@dataclass(frozen=True)
class Segment:
    """Part of an activation's channel axis: ``length`` channels of space ``space`` from ``offset``."""

    space: int
    offset: int
    length: int
    block: int = 1


@dataclass
class ChannelGroup:
    """One permutable channel space: its size, the constants it reorders, or why it is frozen."""

    size: int
    members: list[Member] = field(default_factory=list)
    frozen: str | None = None
    origin: str = ""

    @property
    def consumers(self) -> list[Member]:
        return [m for m in self.members if m.role == "consumer"]


class _Spaces:
    """Union-find over channel spaces, each with a size, members and a frozen reason."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.groups: list[ChannelGroup] = []

    def new(self, size: int, origin: str) -> int:
        self.parent.append(len(self.parent))
        self.groups.append(ChannelGroup(size, origin=origin))
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int, where: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        ga, gb = self.groups[ra], self.groups[rb]
        self.parent[rb] = ra
        ga.members.extend(gb.members)
        if ga.size != gb.size:
            ga.frozen = ga.frozen or f"{where}: merges spaces of {ga.size} and {gb.size} channels"
        ga.frozen = ga.frozen or gb.frozen

    def add(self, s: int, member: Member) -> None:
        self.groups[self.find(s)].members.append(member)

    def freeze(self, s: int, reason: str) -> None:
        group = self.groups[self.find(s)]
        group.frozen = group.frozen or reason

    def result(self) -> list[ChannelGroup]:
        return [g for i, g in enumerate(self.groups) if self.find(i) == i]


@dataclass
class _Walker:
    """State of one pass over the graph: each activation's channel axis and segments."""

    graph: onnx.GraphProto
    shapes: Mapping[str, tuple[int | None, ...]]
    constants: Mapping[str, np.ndarray]
    spaces: _Spaces = field(default_factory=_Spaces)
    layout: dict[str, tuple[int, list[Segment]]] = field(default_factory=dict)

    def freeze_tensor(self, name: str, reason: str) -> None:
        for seg in self.layout.get(name, (0, []))[1]:
            self.spaces.freeze(seg.space, reason)

    def set_new(self, name: str, axis: int, size: int, origin: str) -> int:
        space = self.spaces.new(size, origin)
        self.layout[name] = (axis, [Segment(space, 0, size)])
        return space

    def consume(self, name: str, weight: str, axis: int, node: str) -> None:
        """The weight's ``axis`` reads the channels of activation ``name``."""
        for seg in self.layout.get(name, (0, []))[1]:
            self.spaces.add(seg.space, Member(weight, axis, seg.offset, seg.block, "consumer", node))

    def param(self, name: str, tensor: str, axis: int, node: str) -> None:
        for seg in self.layout.get(name, (0, []))[1]:
            self.spaces.add(seg.space, Member(tensor, axis, seg.offset, seg.block, "param", node))

    def channels(self, name: str) -> int | None:
        """Number of channels along the tracked axis of an activation."""
        if name not in self.layout:
            return None
        _axis, segs = self.layout[name]
        return sum(s.length * s.block for s in segs)


def _rank(shapes: Mapping[str, tuple[int | None, ...]], name: str) -> int | None:
    shape = shapes.get(name)
    return None if shape is None else len(shape)


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    graph = onnx.shape_inference.infer_shapes(model).graph
    out = value_dims((*graph.value_info, *graph.input, *graph.output))
    for t in model.graph.initializer:
        out[t.name] = tuple(t.dims)
    return out


def _conv(w: _Walker, node: onnx.NodeProto, name: str) -> None:
    weight = node.input[1]
    if weight not in w.constants:
        w.freeze_tensor(node.input[0], f"{name}: Conv weight is not a constant")
        return
    shape = w.constants[weight].shape
    group = int(attributes(node).get("group", 1))
    c_in, c_out = shape[1] * group, shape[0]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if group == 1:
        w.consume(node.input[0], weight, 1, name)
        space = w.set_new(node.output[0], 1, c_out, name)
        w.spaces.add(space, Member(weight, 0, role="producer", node=name))
        if bias:
            w.spaces.add(space, Member(bias, 0, role="param", node=name))
    elif group == c_in == c_out and shape[1] == 1:
        # Depthwise: channel c of the output is channel c of the input; its filter and bias follow.
        if node.input[0] not in w.layout:
            w.set_new(node.input[0], 1, c_in, name)
        w.layout[node.output[0]] = w.layout[node.input[0]]
        w.param(node.input[0], weight, 0, name)
        if bias:
            w.param(node.input[0], bias, 0, name)
    else:
        w.freeze_tensor(node.input[0], f"{name}: grouped Conv (group={group}) permutes only within groups")
        space = w.set_new(node.output[0], 1, c_out, name)
        w.spaces.freeze(space, f"{name}: output of a grouped Conv (group={group})")


def _matrix(w: _Walker, node: onnx.NodeProto, name: str) -> None:
    """Gemm and MatMul with a constant [K, N] (or Gemm transB [N, K]) weight."""
    attrs = attributes(node)
    weight = node.input[1]
    x = node.input[0]
    if weight not in w.constants or w.constants[weight].ndim != 2 or attrs.get("transA", 0):
        w.freeze_tensor(x, f"{name}: {node.op_type} without a constant 2-D weight")
        return
    trans_b = node.op_type == "Gemm" and attrs.get("transB", 0)
    in_axis, out_axis = (1, 0) if trans_b else (0, 1)
    if x in w.layout and not _is_last(w.layout[x][0], _rank(w.shapes, x)):
        w.freeze_tensor(x, f"{name}: {node.op_type} reduces an axis other than the tracked channels")
    else:
        w.consume(x, weight, in_axis, name)
    n_out = w.constants[weight].shape[out_axis]
    # The output's channels are its last axis, whatever its rank (shape inference may not know it).
    space = w.set_new(node.output[0], -1, n_out, name)
    w.spaces.add(space, Member(weight, out_axis, role="producer", node=name))
    bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
    if bias:
        _constant_operand(w, node.output[0], bias, name, 2)


def _is_last(axis: int, rank: int | None) -> bool:
    """Whether a tracked channel axis (negative: counted from the end) is the last one."""
    return axis == -1 or (rank is not None and axis == rank - 1)


def _constant_operand(w: _Walker, act: str, const: str, name: str, act_rank: int | None) -> None:
    """A constant combined elementwise with an activation: per-channel (a member), broadcast, or freezing."""
    axis = w.layout[act][0]
    value = w.constants[const]
    if value.ndim == 0 or value.size == 1:
        return
    rank = act_rank or _rank(w.shapes, act)
    if axis < 0:
        pos = value.ndim + axis  # numpy broadcasting aligns trailing axes
    elif rank is not None:
        pos = axis - (rank - value.ndim)
    else:
        w.freeze_tensor(act, f"{name}: rank of {act} unknown, cannot align constant {const}")
        return
    others = [s for i, s in enumerate(value.shape) if i != pos]
    if 0 <= pos < value.ndim and value.shape[pos] == w.channels(act) and all(s == 1 for s in others):
        w.param(act, const, pos, name)
    elif 0 <= pos < value.ndim and value.shape[pos] == 1:
        return
    else:
        w.freeze_tensor(act, f"{name}: constant {const} of shape {value.shape} varies along the channels")


def _elementwise(w: _Walker, node: onnx.NodeProto, name: str) -> None:
    tracked = [i for i in node.input if i in w.layout]
    consts = [i for i in node.input if i in w.constants]
    unknown = [i for i in node.input if i and i not in w.layout and i not in w.constants]
    if not tracked:
        return
    first = tracked[0]
    axis, segs = w.layout[first]
    for other in tracked[1:]:
        o_axis, o_segs = w.layout[other]
        same = o_axis == axis and [(s.offset, s.length, s.block) for s in o_segs] == [
            (s.offset, s.length, s.block) for s in segs
        ]
        if not same:
            w.freeze_tensor(first, f"{name}: combines activations whose channel layouts differ")
            w.freeze_tensor(other, f"{name}: combines activations whose channel layouts differ")
            continue
        for a, b in zip(segs, o_segs, strict=True):
            w.spaces.union(a.space, b.space, name)
    for c in consts:
        _constant_operand(w, first, c, name, _rank(w.shapes, node.output[0]))
    if unknown:
        for t in tracked:
            w.freeze_tensor(t, f"{name}: combined with {unknown[0]}, which is not tracked")
    w.layout[node.output[0]] = w.layout[first]


def _norm(w: _Walker, node: onnx.NodeProto, name: str) -> None:
    x = node.input[0]
    if w.layout[x][0] != 1:
        w.freeze_tensor(x, f"{name}: normalisation over an axis other than 1")
        return
    for i in PER_CHANNEL_PARAMS[node.op_type]:
        if i < len(node.input) and node.input[i]:
            if node.input[i] not in w.constants:
                w.freeze_tensor(x, f"{name}: per-channel input {node.input[i]} is not a constant")
                return
            w.param(x, node.input[i], 0, name)
    w.layout[node.output[0]] = w.layout[x]


def _layer_norm(w: _Walker, node: onnx.NodeProto, name: str) -> None:
    """LayerNormalization over the last axis only: its statistics do not depend on channel order."""
    x = node.input[0]
    rank = _rank(w.shapes, x)
    axis = int(attributes(node).get("axis", -1))
    norm_last = axis == -1 or (rank is not None and axis == rank - 1)
    if not norm_last or not _is_last(w.layout[x][0], rank):
        w.freeze_tensor(x, f"{name}: LayerNormalization not over the channel axis alone")
        return
    for i in (1, 2):
        if i < len(node.input) and node.input[i]:
            w.param(x, node.input[i], 0, name)
    w.layout[node.output[0]] = w.layout[x]


def _concat(w: _Walker, node: onnx.NodeProto, name: str) -> None:
    rank = _rank(w.shapes, node.output[0])
    axis = int(attributes(node).get("axis", 0))
    if rank is not None:
        axis = axis % rank
    inputs = list(node.input)

    def along(i: str) -> bool:
        tracked = w.layout[i][0]
        return tracked == axis or (tracked == -1 and _is_last(axis, rank)) or (axis == -1 and _is_last(tracked, rank))

    if not all(i in w.layout and along(i) for i in inputs):
        for i in inputs:
            w.freeze_tensor(i, f"{name}: Concat of untracked tensors or on another axis")
        return
    segs, offset = [], 0
    for i in inputs:
        for s in w.layout[i][1]:
            segs.append(Segment(s.space, offset + s.offset, s.length, s.block))
        offset += w.channels(i) or 0
    w.layout[node.output[0]] = (axis, segs)


def _flatten(w: _Walker, node: onnx.NodeProto, name: str) -> None:
    """Flatten [N, C, H, W] -> [N, C*H*W]: each channel becomes a block of H*W features (PQF's fc6 trick)."""
    x = node.input[0]
    shape = w.shapes.get(x)
    axis = int(attributes(node).get("axis", 1)) if node.op_type == "Flatten" else 1
    out_shape = w.shapes.get(node.output[0])
    ok = shape is not None and w.layout[x][0] == 1 and axis == 1 and all(s for s in shape[1:])
    if node.op_type == "Reshape":
        ok = ok and out_shape is not None and len(out_shape) == 2 and out_shape[1] == math.prod(shape[1:])
    if not ok:
        w.freeze_tensor(x, f"{name}: {node.op_type} mixes the channel axis")
        return
    block = math.prod(shape[2:])
    segs = [Segment(s.space, s.offset * block, s.length, s.block * block) for s in w.layout[x][1]]
    w.layout[node.output[0]] = (1, segs)


def _split_sizes(w: _Walker, node: onnx.NodeProto, total: int) -> list[int] | None:
    if len(node.input) > 1 and node.input[1]:
        sizes = w.constants.get(node.input[1])
        return None if sizes is None else [int(v) for v in np.asarray(sizes).ravel()]
    if "split" in attributes(node):
        return [int(v) for v in attributes(node)["split"]]
    n = len(node.output)
    chunk = -(-total // n)
    return [min(chunk, total - i * chunk) for i in range(n)]


def _split(w: _Walker, node: onnx.NodeProto, name: str) -> None:
    """Split hands each output the segments inside its range, re-based; one that cuts a group freezes it."""
    x = node.input[0]
    rank = _rank(w.shapes, x)
    tracked, segs = w.layout[x]
    axis = int(attributes(node).get("axis", 0))
    if rank is None:
        w.freeze_tensor(x, f"{name}: Split of a tensor of unknown rank")
        return
    if tracked % rank != axis % rank:  # another axis: every output keeps all channels
        for out in node.output:
            w.layout[out] = w.layout[x]
        return
    sizes = _split_sizes(w, node, w.channels(x) or 0)
    if sizes is None:
        w.freeze_tensor(x, f"{name}: Split with sizes that are not constant")
        return
    start = 0
    for out, size in zip(node.output, sizes, strict=False):
        inside = []
        for seg in segs:
            lo, hi = seg.offset, seg.offset + seg.length * seg.block
            if hi <= start or lo >= start + size:
                continue
            if lo < start or hi > start + size:
                w.freeze_tensor(x, f"{name}: Split cuts a channel group in two")
                return
            inside.append(Segment(seg.space, lo - start, seg.length, seg.block))
        w.layout[out] = (tracked, inside)
        start += size


def _pad(w: _Walker, node: onnx.NodeProto, name: str) -> None:
    """Pad that pads no channel keeps the channel order (every mode fills each channel from itself)."""
    x = node.input[0]
    rank = _rank(w.shapes, x)
    if len(node.input) > 1:  # opset >= 11: pads (and optionally axes) are inputs
        pads = w.constants.get(node.input[1])
        axes_name = node.input[3] if len(node.input) > 3 else ""
        axes = w.constants.get(axes_name) if axes_name else np.arange(rank or 0)
    else:
        pads, axes = attributes(node).get("pads"), np.arange(rank or 0)
    if pads is None or axes is None or rank is None:
        w.freeze_tensor(x, f"{name}: Pad with pads that are not constant")
        return
    pads, axes = np.asarray(pads).ravel(), np.asarray(axes).ravel() % rank
    channel = w.layout[x][0] % rank
    n = len(axes)
    if any(a == channel and (pads[i] or pads[n + i]) for i, a in enumerate(axes)):
        w.freeze_tensor(x, f"{name}: Pad pads the channel axis")
        return
    w.layout[node.output[0]] = w.layout[x]


def _squeeze_spatial(w: _Walker, node: onnx.NodeProto, name: str) -> None:
    """Squeeze/Reshape that only drops 1-sized spatial axes after global pooling keeps channels on axis 1."""
    x = node.input[0]
    shape, out = w.shapes.get(x), w.shapes.get(node.output[0])
    if (
        shape
        and out
        and w.layout[x][0] == 1
        and len(out) >= 2
        and out[:2] == shape[:2]
        and all(s == 1 for s in shape[2:])
    ):
        w.layout[node.output[0]] = w.layout[x]
        return
    _flatten(w, node, name)


def _walk_node(w: _Walker, node: onnx.NodeProto, name: str) -> None:
    op = node.op_type
    tracked = [i for i in node.input if i in w.layout]
    if op == "Conv":
        _conv(w, node, name)
    elif op in ("Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in w.constants:
        _matrix(w, node, name)
    elif not tracked or op == "Constant" or op in ORDER_FREE:
        return
    elif op in PASS_THROUGH and node.input[0] in w.layout:
        for extra in node.input[1:]:
            if extra in w.layout:
                w.freeze_tensor(extra, f"{name}: {op} reads it as a parameter")
        if op == "PRelu" and len(node.input) > 1 and node.input[1] in w.constants:
            _constant_operand(w, node.input[0], node.input[1], name, _rank(w.shapes, node.input[0]))
        w.layout[node.output[0]] = w.layout[node.input[0]]
    elif op in ELEMENTWISE:
        _elementwise(w, node, name)
    elif op in PER_CHANNEL_PARAMS:
        _norm(w, node, name)
    elif op == "LayerNormalization":
        _layer_norm(w, node, name)
    elif op == "Concat":
        _concat(w, node, name)
    elif op == "Flatten":
        _flatten(w, node, name)
    elif op == "Pad" and node.input[0] in w.layout:
        _pad(w, node, name)
    elif op == "Split" and node.input[0] in w.layout:
        _split(w, node, name)
    elif op in ("Squeeze", "Reshape"):
        _squeeze_spatial(w, node, name)
    else:
        for t in tracked:
            w.freeze_tensor(t, f"{name}: {op} is not understood by the channel rules")


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names that If/Loop/Scan bodies read from the enclosing graph (the walker does not enter them)."""
    names: set[str] = set()
    for node in graph.node:
        for _, body in node_bodies(node):
            names |= {i for n in body.node for i in n.input} | _subgraph_reads(body)
    return names


def find_groups(model: onnx.ModelProto) -> list[ChannelGroup]:
    """Every channel space of the main graph, permutable or frozen (with the reason)."""
    graph = model.graph
    constants = {name: c.to_array() for name, c in constant_tensors(graph).items()}
    w = _Walker(graph, _shapes(model), constants)
    for index, node in enumerate(graph.node):
        _walk_node(w, node, display_name(node, index))
    for out in graph.output:
        w.freeze_tensor(out.name, f"graph output {out.name}")
    for name in _subgraph_reads(graph):
        w.freeze_tensor(name, f"read inside an If/Loop/Scan body: {name}")
    by_tensor = readers(graph)
    groups = w.spaces.result()
    for g in groups:
        shared = sorted({m.tensor for m in g.members if len(by_tensor.get(m.tensor, [])) > 1})
        if shared and not g.frozen:
            g.frozen = f"constant {shared[0]} is shared with other nodes"
        if not g.frozen and not g.consumers:
            g.frozen = "no consumer weight reads these channels"
    return groups
