"""Run an ONNX graph in torch, so gradients reach its constants (the codebooks above all).

Fine-tuning needs the compressed model as a differentiable function. The graph
is interpreted node by node in eager torch: shape arithmetic (``Shape``,
``Gather`` on shapes, ``Reshape`` to a computed shape) just runs, and the decode
chain ``Cast -> Gather(codebook) -> Reshape`` becomes an ``index_select``, whose
gradient for each codeword is the sum over the subvectors that use it.

Operators live in one table, ``TORCH_OPS`` (name -> function of the node's
attributes and inputs), as onnxruntime's quantization registry does. A graph
with an operator missing from the table is refused up front, naming every
missing one, so the caller can skip fine-tuning instead of failing midway.
The semantics follow the ONNX operator specification for opsets 7-23; the tests
compare against onnxruntime on every benchmarked model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from onnxpq.errors import UnsupportedGraphError
from onnxpq.model.graph import attributes, constant_tensors, opset_version
from onnxpq.operators import conv_pads

__all__ = ["TORCH_OPS", "OnnxModule", "unsupported_ops"]

_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}

Tensor = torch.Tensor
Op = Callable[..., Any]


@dataclass(frozen=True)
class _Node:
    """One node, ready to run: its function, attributes and tensor names."""

    op: Op
    attrs: dict[str, Any]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    name: str


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    """The node's attributes as the operators below use them: strings decoded, tensors as torch tensors."""
    out = {}
    for name, value in attributes(node).items():
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, onnx.TensorProto):
            value = _from_numpy(numpy_helper.to_array(value))
        out[name] = value
    return out


def _from_numpy(array: np.ndarray) -> Tensor:
    """A torch tensor of the array; sub-byte and unsigned-wide types widen to what torch indexes with."""
    four_bit = array.dtype.name in ("uint4", "int4")  # ml_dtypes' 4-bit types (kind "V"): UINT4 indices
    if four_bit or (array.dtype.kind in "ui" and array.dtype not in (np.uint8, np.int8, np.int16, np.int32, np.int64)):
        array = array.astype(np.int64)
    return torch.from_numpy(np.array(array, copy=True))


def _ints(t: Tensor | Sequence[int] | None) -> list[int]:
    if t is None:
        return []
    return [int(v) for v in (t.tolist() if isinstance(t, Tensor) else t)]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# ---------------------------------------------------------------- elementwise


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> Op:
    return lambda attrs, a, b: fn(a, b)


def _div(attrs: dict, a: Tensor, b: Tensor) -> Tensor:
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> Op:
    def run(attrs: dict, *xs: Tensor) -> Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out

    return run


def _unary(fn: Callable[[Tensor], Tensor]) -> Op:
    return lambda attrs, x: fn(x)


def _clip(attrs: dict, x: Tensor, lo: Tensor | None = None, hi: Tensor | None = None) -> Tensor:
    """One ``clamp`` with Python bounds: maximum/minimum against tensors split the gradient at ties,
    and their backward (where, eq, div) cost MobileNetV2's ReLU6s as much as its convolutions."""
    lo = lo.item() if lo is not None else attrs.get("min")  # ONNX: min and max are scalars
    hi = hi.item() if hi is not None else attrs.get("max")
    return x if lo is None and hi is None else torch.clamp(x, lo, hi)


def _hard_sigmoid(attrs: dict, x: Tensor) -> Tensor:
    return torch.clamp(attrs.get("alpha", 0.2) * x + attrs.get("beta", 0.5), 0.0, 1.0)


def _hard_swish(attrs: dict, x: Tensor) -> Tensor:
    return x * torch.clamp(x / 6.0 + 0.5, 0.0, 1.0)


def _gelu(attrs: dict, x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh" if attrs.get("approximate", "none") == "tanh" else "none")


def _prelu(attrs: dict, x: Tensor, slope: Tensor) -> Tensor:
    return torch.where(x >= 0, x, x * slope)


def _softmax(fn: Callable[..., Tensor]) -> Op:
    def run(attrs: dict, x: Tensor, *, opset: int) -> Tensor:
        if opset >= 13:
            return fn(x, dim=attrs.get("axis", -1))
        # Before opset 13 the input is flattened to 2-D at ``axis`` (default 1).
        axis = _axis(attrs.get("axis", 1), x.dim())
        flat = x.reshape(math.prod(x.shape[:axis]), -1)
        return fn(flat, dim=1).reshape(x.shape)

    return run


def _cast(attrs: dict, x: Tensor) -> Tensor:
    return x.to(_DTYPES[attrs["to"]])


def _where(attrs: dict, cond: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.where(cond, a, b)


# ---------------------------------------------------------------- linear algebra and normalisation


def _gemm(attrs: dict, a: Tensor, b: Tensor, c: Tensor | None = None) -> Tensor:
    a = a.T if attrs.get("transA", 0) else a
    b = b.T if attrs.get("transB", 0) else b
    out = attrs.get("alpha", 1.0) * (a @ b)
    return out if c is None else out + attrs.get("beta", 1.0) * c


def _channel_view(v: Tensor, rank: int) -> Tensor:
    return v.reshape(1, -1, *([1] * (rank - 2)))


def _batch_norm(attrs: dict, x: Tensor, scale: Tensor, bias: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    inv = torch.rsqrt(var + attrs.get("epsilon", 1e-5)) * scale
    return x * _channel_view(inv, x.dim()) + _channel_view(bias - mean * inv, x.dim())


def _instance_norm(attrs: dict, x: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    return F.instance_norm(x, weight=scale, bias=bias, eps=attrs.get("epsilon", 1e-5))


def _layer_norm(attrs: dict, x: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    dims = tuple(range(_axis(attrs.get("axis", -1), x.dim()), x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    centred = x - mean
    y = centred * torch.rsqrt(centred.square().mean(dim=dims, keepdim=True) + attrs.get("epsilon", 1e-5)) * scale
    return y if bias is None else y + bias


# ---------------------------------------------------------------- convolution and pooling


def _spatial_pads(attrs: dict, x: Tensor, kernel: Sequence[int]) -> list[int]:
    """ONNX pads [b1, b2, ..., e1, e2, ...], with auto_pad resolved against the input size."""
    n = len(kernel)
    strides = attrs.get("strides", [1] * n)
    dilations = attrs.get("dilations", [1] * n)
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    pads = conv_pads(attrs, x.shape[2:], extent, strides)
    return [b for b, _ in pads] + [e for _, e in pads]


def _pad_input(x: Tensor, pads: Sequence[int], value: float = 0.0) -> tuple[Tensor, list[int]]:
    """Symmetric pads go to the torch op; anything else is applied here first."""
    n = len(pads) // 2
    begin, end = list(pads[:n]), list(pads[n:])
    if begin == end:
        return x, begin
    torch_pads = [p for i in reversed(range(n)) for p in (begin[i], end[i])]
    return F.pad(x, torch_pads, value=value), [0] * n


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


#: Gates per recurrent operator, in ONNX's order within W, R and B.
_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
#: The default activations of each, per direction, as the ``activations`` attribute spells them.
_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
#: Attributes whose non-default values change the recurrence; the executor runs only the defaults.
_RECURRENT_DEFAULTS = {"activations": None, "activation_alpha": None, "activation_beta": None, "clip": None,
                       "input_forget": 0, "layout": 0}  # fmt: skip


def _recurrent(op: str) -> Op:
    """ONNX's LSTM, GRU or RNN, default activations, time-major layout: outputs Y [T, dirs, B, H], Y_h (and Y_c).

    A Python loop over time steps: fine-tuning runs the small recurrent layers of audio and sequence models.
    """

    def run(attrs: dict, x: Tensor, w: Tensor, r: Tensor, b: Tensor | None = None, *rest: Tensor | None) -> tuple:
        dirs = w.shape[0]
        # Exporters may spell out the defaults (tf2onnx does); strings come as bytes.
        spelled = [a.decode() if isinstance(a, bytes) else a for a in attrs.get("activations") or []]
        attrs = {**attrs, "activations": None} if spelled == _ACTIVATIONS[op] * dirs else attrs
        odd = [k for k, v in _RECURRENT_DEFAULTS.items() if k in attrs and attrs[k] != v]
        lens, h0, c0, peep = (list(rest) + [None] * 4)[:4]
        if odd or lens is not None or peep is not None:
            raise UnsupportedGraphError(f"{op} with {', '.join(odd) or 'sequence_lens or peepholes'} is not supported")
        hidden = r.shape[-1]
        steps, batch = x.shape[0], x.shape[1]
        bias = b if b is not None else x.new_zeros(dirs, 2 * _GATES[op] * hidden)
        zeros = x.new_zeros(dirs, batch, hidden)
        h0 = zeros if h0 is None else h0
        c0 = zeros if c0 is None else c0
        reverse = attrs.get("direction", "forward") == "reverse"
        ys, hs, cs = [], [], []
        for d in range(dirs):
            order = range(steps - 1, -1, -1) if reverse or d == 1 else range(steps)
            h, c, out = h0[d], c0[d], [None] * steps
            wb, rb = bias[d].chunk(2)
            for t in order:
                h, c = _CELLS[op](x[t] @ w[d].T + wb, h, c, r[d], rb, attrs)
                out[t] = h
            ys.append(torch.stack(out))
            hs.append(h)
            cs.append(c)
        y = torch.stack(ys, dim=1)
        return (y, torch.stack(hs), torch.stack(cs)) if op == "LSTM" else (y, torch.stack(hs))

    return run


def _lstm_cell(xw: Tensor, h: Tensor, c: Tensor, r: Tensor, rb: Tensor, attrs: dict) -> tuple[Tensor, Tensor]:
    i, o, f, g = (xw + h @ r.T + rb).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _gru_cell(xw: Tensor, h: Tensor, c: Tensor, r: Tensor, rb: Tensor, attrs: dict) -> tuple[Tensor, Tensor]:
    xz, xr, xh = xw.chunk(3, dim=-1)
    rz, rr, rh = r.chunk(3, dim=0)
    bz, br, bh = rb.chunk(3)
    z = torch.sigmoid(xz + h @ rz.T + bz)
    reset = torch.sigmoid(xr + h @ rr.T + br)
    if attrs.get("linear_before_reset", 0):
        candidate = torch.tanh(xh + reset * (h @ rh.T + bh))
    else:
        candidate = torch.tanh(xh + (reset * h) @ rh.T + bh)
    return (1 - z) * candidate + z * h, c


def _rnn_cell(xw: Tensor, h: Tensor, c: Tensor, r: Tensor, rb: Tensor, attrs: dict) -> tuple[Tensor, Tensor]:
    return torch.tanh(xw + h @ r.T + rb), c


_CELLS = {"LSTM": _lstm_cell, "GRU": _gru_cell, "RNN": _rnn_cell}


def _conv(attrs: dict, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    n = w.dim() - 2
    if n == 2:  # oneDNN's 2-D convolutions (backward most of all) are faster on channels-last activations.
        x = x.contiguous(memory_format=torch.channels_last)
    x, padding = _pad_input(x, _spatial_pads(attrs, x, w.shape[2:]))
    return _CONV[n](
        x,
        w,
        b,
        stride=attrs.get("strides", [1] * n),
        padding=padding,
        dilation=attrs.get("dilations", [1] * n),
        groups=attrs.get("group", 1),
    )


def _conv_transpose(attrs: dict, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    n = w.dim() - 2
    if "output_shape" in attrs or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise UnsupportedGraphError("ConvTranspose with output_shape or SAME auto_pad is not supported for fine-tuning")
    pads = list(attrs.get("pads", [0] * (2 * n))) if attrs.get("auto_pad", "NOTSET") == "NOTSET" else [0] * (2 * n)
    y = _CONV_T[n](
        x,
        w,
        b,
        stride=attrs.get("strides", [1] * n),
        output_padding=attrs.get("output_padding", [0] * n),
        dilation=attrs.get("dilations", [1] * n),
        groups=attrs.get("group", 1),
    )
    index = [slice(None), slice(None)]
    for i in range(n):
        index.append(slice(pads[i], y.shape[2 + i] - pads[n + i]))
    return y[tuple(index)]


def _pool(kind: str) -> Op:
    def run(attrs: dict, x: Tensor) -> Tensor:
        kernel = attrs["kernel_shape"]
        n = len(kernel)
        fill = -math.inf if kind == "max" else 0.0
        pads = _spatial_pads(attrs, x, kernel)
        if kind == "avg" and not attrs.get("count_include_pad", 0) and pads[:n] != pads[n:]:
            raise UnsupportedGraphError("AveragePool with asymmetric pads that exclude padding is not supported")
        x, padding = _pad_input(x, pads, fill)
        stride = attrs.get("strides", [1] * n)
        ceil = bool(attrs.get("ceil_mode", 0))
        if kind == "max":
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[n]
            return fn(x, kernel, stride, padding, attrs.get("dilations", [1] * n), ceil_mode=ceil)
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[n]
        return fn(x, kernel, stride, padding, ceil_mode=ceil, count_include_pad=bool(attrs.get("count_include_pad", 0)))

    return run


def _global_pool(fn: Callable[..., Tensor]) -> Op:
    return lambda attrs, x: fn(x, dim=tuple(range(2, x.dim())), keepdim=True)


def _global_max(x: Tensor, dim: tuple[int, ...], keepdim: bool) -> Tensor:
    return torch.amax(x, dim=dim, keepdim=keepdim)


# ---------------------------------------------------------------- shapes and indexing


def _shape(attrs: dict, x: Tensor) -> Tensor:
    dims = list(x.shape)
    start, end = attrs.get("start", 0), attrs.get("end", len(dims))
    return torch.tensor(dims[start:end], dtype=torch.int64)


def _reshape(attrs: dict, x: Tensor, shape: Tensor) -> Tensor:
    target = _ints(shape)
    if not attrs.get("allowzero", 0):
        target = [x.shape[i] if v == 0 else v for i, v in enumerate(target)]
    return x.reshape(target)


def _flatten(attrs: dict, x: Tensor) -> Tensor:
    axis = _axis(attrs.get("axis", 1), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), -1)


def _transpose(attrs: dict, x: Tensor) -> Tensor:
    return x.permute(attrs.get("perm", list(reversed(range(x.dim())))))


def _axes(attrs: dict, axes: Tensor | None) -> list[int] | None:
    if axes is not None:
        return _ints(axes)
    return list(attrs["axes"]) if "axes" in attrs else None


def _squeeze(attrs: dict, x: Tensor, axes: Tensor | None = None) -> Tensor:
    found = _axes(attrs, axes)
    if found is None:
        return x.squeeze()
    return x.squeeze(tuple(_axis(a, x.dim()) for a in found))


def _unsqueeze(attrs: dict, x: Tensor, axes: Tensor | None = None) -> Tensor:
    found = _axes(attrs, axes) or []
    rank = x.dim() + len(found)
    for a in sorted(_axis(a, rank) for a in found):
        x = x.unsqueeze(a)
    return x


def _concat(attrs: dict, *xs: Tensor) -> Tensor:
    return torch.cat([x for x in xs if x is not None], dim=attrs["axis"])


def _split(attrs: dict, x: Tensor, split: Tensor | None = None, *, n_outputs: int) -> tuple[Tensor, ...]:
    axis = attrs.get("axis", 0)
    sizes = _ints(split) if split is not None else list(attrs.get("split", []))
    if not sizes:
        size = x.shape[axis]
        chunk = -(-size // n_outputs)
        sizes = [min(chunk, size - i * chunk) for i in range(n_outputs)]
    return tuple(torch.split(x, sizes, dim=axis))


def _slice(attrs: dict, x: Tensor, *args: Tensor | None) -> Tensor:
    if args:
        starts, ends = _ints(args[0]), _ints(args[1])
        axes = _ints(args[2]) if len(args) > 2 and args[2] is not None else list(range(len(starts)))
        steps = _ints(args[3]) if len(args) > 3 and args[3] is not None else [1] * len(starts)
    else:  # opset < 10: attributes
        starts, ends = list(attrs["starts"]), list(attrs["ends"])
        axes = list(attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = _axis(axis, x.dim())
        size = x.shape[axis]
        begin, stop, stride = slice(start, end, step).indices(size)
        if stride > 0:
            x = x[(slice(None),) * axis + (slice(begin, stop, stride),)]
        else:
            x = x.index_select(axis, torch.arange(begin, stop, stride, dtype=torch.int64))
    return x


def _gather(attrs: dict, data: Tensor, index: Tensor) -> Tensor:
    axis = _axis(attrs.get("axis", 0), data.dim())
    flat = index.reshape(-1).to(torch.int64)
    flat = torch.where(flat < 0, flat + data.shape[axis], flat)
    picked = data.index_select(axis, flat)
    return picked.reshape((*data.shape[:axis], *index.shape, *data.shape[axis + 1 :]))


def _gather_elements(attrs: dict, data: Tensor, index: Tensor) -> Tensor:
    axis = _axis(attrs.get("axis", 0), data.dim())
    index = index.to(torch.int64)
    return torch.gather(data, axis, torch.where(index < 0, index + data.shape[axis], index))


def _expand(attrs: dict, x: Tensor, shape: Tensor) -> Tensor:
    return x.expand(torch.broadcast_shapes(x.shape, tuple(_ints(shape))))


def _tile(attrs: dict, x: Tensor, repeats: Tensor) -> Tensor:
    return x.repeat(_ints(repeats))


def _constant_of_shape(attrs: dict, shape: Tensor) -> Tensor:
    value = attrs.get("value", torch.zeros(1, dtype=torch.float32))
    return torch.full(_ints(shape), value.reshape(-1)[0].item(), dtype=value.dtype)


def _range(attrs: dict, start: Tensor, limit: Tensor, delta: Tensor) -> Tensor:
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


def _constant(attrs: dict) -> Tensor:
    for key, value in attrs.items():
        if key == "value":
            return value
        if key in ("value_float", "value_int"):
            return torch.tensor(value, dtype=torch.float32 if key == "value_float" else torch.int64)
        if key in ("value_floats", "value_ints"):
            return torch.tensor(list(value), dtype=torch.float32 if key == "value_floats" else torch.int64)
    raise UnsupportedGraphError(f"Constant with attributes {sorted(attrs)} is not supported for fine-tuning")


def _pad(attrs: dict, x: Tensor, pads: Tensor | None = None, value: Tensor | None = None, axes=None) -> Tensor:
    found = _ints(pads) if pads is not None else list(attrs["pads"])
    axes_list = _ints(axes) if axes is not None else list(range(x.dim()))
    n = len(axes_list)
    per_axis = {_axis(a, x.dim()): (found[i], found[n + i]) for i, a in enumerate(axes_list)}
    torch_pads = [p for d in reversed(range(x.dim())) for p in per_axis.get(d, (0, 0))]
    while torch_pads[-2:] == [0, 0]:  # torch pads from the last axis; unpadded leading axes are dropped
        torch_pads = torch_pads[:-2]
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}[
        attrs.get("mode", "constant")
    ]
    if mode == "constant":
        fill = value.item() if value is not None else attrs.get("value", 0.0)
        return F.pad(x, torch_pads, value=fill)
    return F.pad(x, torch_pads, mode=mode)


def _resize(attrs: dict, x: Tensor, roi=None, scales: Tensor | None = None, sizes: Tensor | None = None) -> Tensor:
    mode = attrs.get("mode", "nearest")
    transform = attrs.get("coordinate_transformation_mode", "half_pixel")
    spatial = x.shape[2:]
    if sizes is not None and sizes.numel():
        size = _ints(sizes)[2:]
    else:
        size = [math.floor(s * f) for s, f in zip(spatial, scales.tolist()[2:], strict=True)]
    if mode == "nearest":
        nearest = attrs.get("nearest_mode", "round_prefer_floor")
        if transform == "asymmetric" and nearest == "floor":
            return F.interpolate(x, size=size, mode="nearest")
        if transform in ("half_pixel", "pytorch_half_pixel") and nearest in ("round_prefer_ceil", "floor"):
            return F.interpolate(x, size=size, mode="nearest-exact")
    elif mode == "linear" and transform in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        torch_mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
        return F.interpolate(x, size=size, mode=torch_mode, align_corners=transform == "align_corners")
    raise UnsupportedGraphError(f"Resize mode={mode!r} coordinate_transformation_mode={transform!r} is not supported")


def _reduce(fn: Callable[..., Tensor], axes_input_from: int) -> Op:
    """Reduce ops took ``axes`` as an attribute until opset 18 (ReduceSum: 13)."""

    def run(attrs: dict, x: Tensor, axes: Tensor | None = None, *, opset: int) -> Tensor:
        found = _axes(attrs, axes if opset >= axes_input_from else None)
        keep = bool(attrs.get("keepdims", 1))
        if not found:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            found = list(range(x.dim()))
        return fn(x, tuple(_axis(a, x.dim()) for a in found), keep)

    return run


def _dropout(attrs: dict, x: Tensor, *rest: Tensor) -> tuple[Tensor, Tensor]:
    return x, torch.ones_like(x, dtype=torch.bool)


def _argmax(attrs: dict, x: Tensor) -> Tensor:
    out = torch.argmax(x, dim=attrs.get("axis", 0), keepdim=bool(attrs.get("keepdims", 1)))
    return out


def _einsum(attrs: dict, *xs: Tensor) -> Tensor:
    return torch.einsum(attrs["equation"], *xs)


#: ONNX operator -> torch function of (attributes, *inputs); missing inputs are None.
TORCH_OPS: dict[str, Op] = {
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _div,
    "Pow": _binary(torch.pow),
    "Sum": _variadic(torch.add),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Mean": lambda attrs, *xs: _variadic(torch.add)(attrs, *xs) / len(xs),
    "Equal": _binary(torch.eq),
    "Greater": _binary(torch.gt),
    "GreaterOrEqual": _binary(torch.ge),
    "Less": _binary(torch.lt),
    "LessOrEqual": _binary(torch.le),
    "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or),
    "Xor": _binary(torch.logical_xor),
    "Not": _unary(torch.logical_not),
    "IsNaN": _unary(torch.isnan),
    "IsInf": _unary(torch.isinf),
    "Where": _where,
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Sqrt": _unary(torch.sqrt),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Reciprocal": _unary(torch.reciprocal),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Sign": _unary(torch.sign),
    "Erf": _unary(torch.erf),
    "Tanh": _unary(torch.tanh),
    "Sigmoid": _unary(torch.sigmoid),
    "Relu": _unary(torch.relu),
    "Softplus": _unary(F.softplus),
    "Softsign": _unary(F.softsign),
    "LeakyRelu": lambda attrs, x: F.leaky_relu(x, attrs.get("alpha", 0.01)),
    "Elu": lambda attrs, x: F.elu(x, attrs.get("alpha", 1.0)),
    "Selu": lambda attrs, x: attrs.get("gamma", 1.0507) * F.elu(x, attrs.get("alpha", 1.67326)),
    "PRelu": _prelu,
    "Clip": _clip,
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _hard_swish,
    "Gelu": _gelu,
    "Softmax": _softmax(torch.softmax),
    "LogSoftmax": _softmax(torch.log_softmax),
    "Cast": _cast,
    "Identity": lambda attrs, x: x,
    "Dropout": _dropout,
    "MatMul": _binary(torch.matmul),
    "Gemm": _gemm,
    "LSTM": _recurrent("LSTM"),
    "GRU": _recurrent("GRU"),
    "RNN": _recurrent("RNN"),
    "Einsum": _einsum,
    "BatchNormalization": _batch_norm,
    "InstanceNormalization": _instance_norm,
    "LayerNormalization": _layer_norm,
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": _global_pool(torch.mean),
    "GlobalMaxPool": _global_pool(_global_max),
    "Shape": _shape,
    "Size": lambda attrs, x: torch.tensor(x.numel(), dtype=torch.int64),
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Transpose": _transpose,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "GatherElements": _gather_elements,
    "Expand": _expand,
    "Tile": _tile,
    "ConstantOfShape": _constant_of_shape,
    "Range": _range,
    "Constant": _constant,
    "Pad": _pad,
    "Resize": _resize,
    "ReduceMean": _reduce(lambda x, d, k: x.mean(dim=d, keepdim=k), 18),
    "ReduceSum": _reduce(lambda x, d, k: x.sum(dim=d, keepdim=k), 13),
    "ReduceMax": _reduce(lambda x, d, k: torch.amax(x, dim=d, keepdim=k), 18),
    "ReduceMin": _reduce(lambda x, d, k: torch.amin(x, dim=d, keepdim=k), 18),
    "ReduceProd": _reduce(lambda x, d, k: _prod(x, d, k), 18),
    "ReduceL2": _reduce(lambda x, d, k: x.square().sum(dim=d, keepdim=k).sqrt(), 18),
    "ReduceL1": _reduce(lambda x, d, k: x.abs().sum(dim=d, keepdim=k), 18),
    "ArgMax": _argmax,
}

_NEEDS_OPSET = {"Softmax", "LogSoftmax"} | {name for name in TORCH_OPS if name.startswith("Reduce")}


def _prod(x: Tensor, dims: tuple[int, ...], keep: bool) -> Tensor:
    for d in sorted(dims, reverse=True):
        x = x.prod(dim=d, keepdim=keep)
    return x


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """The operator types of the main graph that the executor cannot run, sorted."""
    missing = set()
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in TORCH_OPS:
            missing.add(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}")
    return sorted(missing)


def _bind(op_type: str, opset: int, n_outputs: int) -> Op:
    op = TORCH_OPS[op_type]
    if op_type in _NEEDS_OPSET:
        return lambda attrs, *xs: op(attrs, *xs, opset=opset)
    if op_type == "Split":
        return lambda attrs, *xs: op(attrs, *xs, n_outputs=n_outputs)
    return op


class OnnxModule(torch.nn.Module):
    """An ONNX graph as a torch module; ``trainable`` constants become float32 ``nn.Parameter``s.

    Parameters
    ----------
    model : the ONNX model (main graph only; If/Loop/Scan are not supported).
    trainable : names of floating-point constants (initializers or ``Constant``
        outputs) to train. Each is stored as float32 whatever its ONNX type and cast
        back by ``constants()``, so fp16 codebooks train in full precision.

    ``forward(**feeds)`` returns the graph outputs as a list, in graph order.
    """

    def __init__(self, model: onnx.ModelProto, trainable: Collection[str] = ()) -> None:
        super().__init__()
        missing = unsupported_ops(model)
        if missing:
            raise UnsupportedGraphError(f"the torch executor does not support: {', '.join(missing)}")
        graph = model.graph
        opset = opset_version(model)
        constants = constant_tensors(graph)
        unknown = sorted(set(trainable) - set(constants))
        if unknown:
            raise ValueError(f"not constants of the graph: {', '.join(unknown)}")
        self.parameter_names = sorted(trainable)
        self.params = torch.nn.ParameterList(
            torch.nn.Parameter(_from_numpy(constants[n].to_array()).float()) for n in self.parameter_names
        )
        self.fixed_names = sorted(set(constants) - set(trainable))
        for i, name in enumerate(self.fixed_names):
            # Buffers (not a dict) so ``.to(device)`` moves them; not persistent: the ONNX file holds them.
            self.register_buffer(f"fixed{i}", _from_numpy(constants[name].to_array()), persistent=False)
        self._dtypes = {n: _DTYPES[constants[n].tensor.data_type] for n in self.parameter_names}
        # Whether the graph computes in a reduced float type: its fp16 codebooks and biases must then be fed as
        # fp16. A float32 graph casts its fp16 codebooks itself, and trains them unrounded as it always has.
        reduced = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
        self._reduced = any(v.type.tensor_type.elem_type in reduced for v in (*graph.input, *graph.output))
        self._nodes = [
            _Node(_bind(n.op_type, opset, len(n.output)), _attrs(n), tuple(n.input), tuple(n.output), n.name)
            for n in graph.node
            if not (n.op_type == "Constant" and n.output[0] in constants)
        ]
        self.input_names = [i.name for i in graph.input if i.name not in constants]
        self.output_names = [o.name for o in graph.output]
        #: Functions applied to named tensors as they are computed (``codes.MovingCodes``' straight-through terms).
        self.adjust: dict[str, Callable[[Tensor], Tensor]] = {}

    def constants(self) -> dict[str, np.ndarray]:
        """The trained constants in their ONNX dtypes (fp16 codebooks rounded), for writing back."""
        return {
            name: p.detach().to(self._dtypes[name]).numpy()
            for name, p in zip(self.parameter_names, self.params, strict=True)
        }

    def forward(self, outputs: Sequence[str] | None = None, **feeds: Tensor) -> list[Tensor]:
        """Run the graph on ``feeds``; ``outputs`` may name any tensors (default: the graph outputs)."""
        env: dict[str, Tensor | None] = dict(zip(self.fixed_names, self.buffers(), strict=True))
        if self._reduced:  # an fp16 graph: its constants enter in their own type, beside fp16 activations
            env.update((n, p.to(self._dtypes[n])) for n, p in zip(self.parameter_names, self.params, strict=True))
        else:
            env.update(zip(self.parameter_names, self.params, strict=True))
        env[""] = None
        for name in self.input_names:
            if name not in feeds:
                raise ValueError(f"missing input {name!r}")
            env[name] = feeds[name]
        for node in self._nodes:
            try:
                result = node.op(node.attrs, *(env[i] for i in node.inputs))
            except UnsupportedGraphError:
                raise
            except Exception as err:  # An operator case the table gets wrong: say where, let callers skip.
                where = node.name or node.outputs[0]
                raise UnsupportedGraphError(f"torch executor failed at node {where!r}: {err}") from err
            results = result if isinstance(result, tuple) else (result,)
            env.update((n, v) for n, v in zip(node.outputs, results, strict=False) if n)  # '' is a skipped output
            for name in self.adjust.keys() & node.outputs:
                env[name] = self.adjust[name](env[name])
        return [env[name] for name in (outputs or self.output_names)]

    def set_constant(self, name: str, value: np.ndarray | Tensor) -> None:
        """Replace a fixed constant (e.g. re-estimated BatchNorm statistics, re-assigned codes)."""
        buffer = self.fixed(name)
        buffer.copy_(torch.as_tensor(value).to(buffer.dtype))

    def fixed(self, name: str) -> Tensor:
        """The buffer holding a fixed constant."""
        return getattr(self, f"fixed{self.fixed_names.index(name)}")

    def parameter(self, name: str) -> torch.nn.Parameter:
        """The float32 parameter of a trainable constant."""
        return self.params[self.parameter_names.index(name)]

    def feeds(self, arrays: Mapping[str, np.ndarray], device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """Numpy feeds as torch tensors on ``device``; every graph input must be present."""
        missing = [n for n in self.input_names if n not in arrays]
        if missing:
            raise ValueError(f"missing input(s) {', '.join(missing)}")
        return {name: _from_numpy(np.asarray(arrays[name])).to(device) for name in self.input_names}
