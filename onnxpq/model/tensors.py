"""Tensor values wherever a model stores them: inline, or in an external data file.

External data is never loaded with the graph: each tensor keeps its reference (with the location
made absolute by ``files.load_model``), ``tensor_array`` reads one tensor when a pass needs it, and
``files.save_model`` streams the untouched ones from the input's data file to the output's. So a model
far larger than memory is processed one layer at a time. ``read()`` is used, not ``mmap``: mapped
pages that were read stay in the process's resident set, read buffers are freed with the array.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxpq.errors import InputModelError

__all__ = [
    "COPY_CHUNK",
    "FLOAT_TYPES",
    "FOUR_BIT_TYPES",
    "External",
    "check_tensor",
    "external_info",
    "external_location",
    "four_bit_tensor",
    "inline_external",
    "raw_bytes",
    "read_external",
    "tensor_array",
]

#: The floating-point tensor types: the weights onnxpq may compress, the values fine-tuning may train.
FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
)
#: Bytes copied at a time when external data is streamed from the input to the output.
COPY_CHUNK = 64 << 20


@dataclass(frozen=True)
class External:
    """Where one tensor's bytes are: an absolute file path, offset and length."""

    path: Path
    offset: int
    length: int


def external_info(tensor: onnx.TensorProto) -> onnx.external_data_helper.ExternalDataInfo:
    """The tensor's external-data entries; an offset of "abc" or -64 is the file's fault, not a crash."""
    try:
        info = onnx.external_data_helper.ExternalDataInfo(tensor)
    except ValueError as err:
        raise InputModelError(f"tensor {tensor.name!r} has a bad external data entry: {err}") from None
    if "\0" in info.location:
        raise InputModelError(f"tensor {tensor.name!r}: its external data location holds a NUL byte")
    return info


def external_location(tensor: onnx.TensorProto) -> External | None:
    if not onnx.external_data_helper.uses_external_data(tensor):
        return None
    info = external_info(tensor)
    path = Path(info.location)
    length = info.length if info.length is not None else path.stat().st_size - (info.offset or 0)
    return External(path, info.offset or 0, length)


def read_external(where: External) -> bytes:
    with where.path.open("rb") as f:
        f.seek(where.offset)
        data = f.read(where.length)
    if len(data) != where.length:
        raise InputModelError(f"external data file {where.path} ended early: {len(data)} of {where.length} bytes")
    return data


#: Typed fields of a TensorProto; an inline tensor keeps its values in ``raw_data`` or one of these.
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


#: Elements per byte of the sub-byte types; the 2-bit ones exist only in newer onnx releases.
_PER_BYTE = {
    getattr(onnx.TensorProto, name): per_byte
    for name, per_byte in (("INT4", 2), ("UINT4", 2), ("FLOAT4E2M1", 2), ("INT2", 4), ("UINT2", 4))
    if hasattr(onnx.TensorProto, name)
}


def raw_bytes(tensor: onnx.TensorProto, dtype: np.dtype, count: int) -> int:
    per_byte = _PER_BYTE.get(tensor.data_type)
    return -(-count // per_byte) if per_byte else count * dtype.itemsize


def check_tensor(tensor: onnx.TensorProto) -> None:
    """Refuse a tensor whose dims, type and inline values disagree, before anything is allocated or reshaped.

    Dims are multiplied as Python integers (no int64 overflow) and compared with the
    values actually present, so 2^20 x 2^20 dims over four bytes fail here instead of
    allocating. External data is checked against its file by ``load_model``.
    """
    name, dims = tensor.name, list(tensor.dims)
    if any(d < 0 for d in dims):
        raise InputModelError(f"tensor {name!r} has negative dims {dims}")
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    except (KeyError, ValueError, TypeError):
        raise InputModelError(f"tensor {name!r} has no valid data type (data_type={tensor.data_type})") from None
    if onnx.external_data_helper.uses_external_data(tensor):
        return
    count = math.prod(dims)
    if tensor.raw_data:
        need, have, what = raw_bytes(tensor, dtype, count), len(tensor.raw_data), "bytes of raw_data"
    else:
        complex_pairs = 2 if dtype.kind == "c" else 1
        need, what = count * complex_pairs, "values"
        have = sum(len(getattr(tensor, f)) for f in _TYPED_FIELDS)
        if tensor.data_type in _PER_BYTE and have == raw_bytes(tensor, dtype, count):
            need = have  # packed sub-byte values, several to an int32 entry
    if need != have:
        raise InputModelError(f"tensor {name!r} has dims {dims} ({count} elements) but holds {have} {what}, not {need}")


#: The 4-bit integer types, stored two to a byte.
FOUR_BIT_TYPES = frozenset({onnx.TensorProto.UINT4, onnx.TensorProto.INT4})


def four_bit_tensor(name: str, data_type: int, values: np.ndarray) -> onnx.TensorProto:
    """``values`` as a UINT4 or INT4 tensor, packed as ONNX stores them: the first element in the low nibble."""
    values = np.asarray(values)
    flat = (values.astype(np.int64).ravel() & 0x0F).astype(np.uint8)
    if len(flat) % 2:
        flat = np.append(flat, np.uint8(0))
    packed = flat[0::2] | (flat[1::2] << 4)
    return onnx.helper.make_tensor(name, data_type, values.shape, packed.tobytes(), raw=True)


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The values of a tensor, read from its data file when it has external data (one tensor in memory)."""
    check_tensor(tensor)
    where = external_location(tensor)
    if where is None:
        return numpy_helper.to_array(tensor)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    shape = tuple(tensor.dims)
    if dtype.kind in "fiubc":
        # Plain numeric storage: read straight into the array, without an intermediate bytes object.
        count = math.prod(shape)
        values = np.fromfile(where.path, dtype=dtype.newbyteorder("<"), count=count, offset=where.offset)
        if values.size != count:
            raise InputModelError(f"external data file {where.path} ended early: tensor {tensor.name!r} is cut short")
        return values.reshape(shape)
    inline = onnx.TensorProto()
    inline.CopyFrom(tensor)
    inline_external(inline, where)
    return numpy_helper.to_array(inline)


def inline_external(tensor: onnx.TensorProto, where: External) -> None:
    tensor.raw_data = read_external(where)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT
