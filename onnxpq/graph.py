"""Load and save ONNX models safely, and find the constant tensors a graph holds.

Loading turns every way a file can be wrong into one ``InputModelError`` that
names the problem; saving is atomic so a failed or interrupted run never
leaves a partial model behind, and switches to external data past protobuf's
2 GB limit.

External data is never loaded with the graph: each tensor keeps its reference
(with the location made absolute), ``tensor_array`` reads one tensor when a
pass needs it, and ``save_model`` streams the untouched ones from the input's
data file to the output's. So a model far larger than memory is processed one
layer at a time. ``read()`` is used, not ``mmap``: mapped pages that were read
stay in the process's resident set, read buffers are freed with the array.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from onnxpq.errors import InputModelError, OutputPathError

__all__ = [
    "MIN_OPSET",
    "ConstantTensor",
    "check_output_path",
    "constant_foldable_nodes",
    "constant_tensors",
    "constants_as_inputs",
    "display_name",
    "load_model",
    "materialized",
    "opset_version",
    "readers",
    "save_model",
    "serialized",
    "subgraph_initializer_count",
    "tensor_array",
]

MIN_OPSET = 11
#: Protobuf refuses to serialise messages of 2 GiB or more; keep a margin for the graph itself.
PROTOBUF_LIMIT = 2**31 - 2**26
#: Tensors of at least this many bytes go to the data file when a model is saved with external data.
EXTERNAL_MIN_BYTES = 1024
#: Offsets in the data file are aligned so onnxruntime can map each tensor directly.
EXTERNAL_ALIGN = 4096
#: Bytes copied at a time when external data is streamed from the input to the output.
COPY_CHUNK = 64 << 20


@dataclass(frozen=True)
class ConstantTensor:
    """A constant tensor of the main graph: an initializer or the output of a ``Constant`` node.

    Parameters
    ----------
    name : the tensor's name in the graph.
    tensor : the TensorProto holding the values.
    constant_node : index in ``graph.node`` of the ``Constant`` node that produces it, or None
        for an initializer.
    """

    name: str
    tensor: onnx.TensorProto
    constant_node: int | None

    def to_array(self) -> np.ndarray:
        return tensor_array(self.tensor)


@dataclass(frozen=True)
class _External:
    """Where one tensor's bytes are: an absolute file path, offset and length."""

    path: Path
    offset: int
    length: int


def _external(tensor: onnx.TensorProto) -> _External | None:
    if not onnx.external_data_helper.uses_external_data(tensor):
        return None
    info = onnx.external_data_helper.ExternalDataInfo(tensor)
    path = Path(info.location)
    length = info.length if info.length is not None else path.stat().st_size - (info.offset or 0)
    return _External(path, info.offset or 0, length)


def _read(where: _External) -> bytes:
    with where.path.open("rb") as f:
        f.seek(where.offset)
        return f.read(where.length)


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The values of a tensor, read from its data file when it has external data (one tensor in memory)."""
    where = _external(tensor)
    if where is None:
        return numpy_helper.to_array(tensor)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    shape = tuple(tensor.dims)
    if dtype.kind in "fiubc":
        # Plain numeric storage: read straight into the array, without an intermediate bytes object.
        count = int(np.prod(shape))
        return np.fromfile(where.path, dtype=dtype.newbyteorder("<"), count=count, offset=where.offset).reshape(shape)
    inline = onnx.TensorProto()
    inline.CopyFrom(tensor)
    _inline(inline, where)
    return numpy_helper.to_array(inline)


def _inline(tensor: onnx.TensorProto, where: _External) -> None:
    tensor.raw_data = _read(where)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT


def materialized(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself when all its data is inline, else a copy with the external data read in.

    For what needs the whole model in memory anyway: an onnxruntime session built
    from bytes, or the torch executor.
    """
    if not any(_external(t) for t in _all_tensors(model.graph)):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in _all_tensors(out.graph):
        where = _external(tensor)
        if where is not None:
            _inline(tensor, where)
    return out


def serialized(model: onnx.ModelProto) -> bytes:
    """The model as bytes for an onnxruntime session, external data included."""
    return materialized(model).SerializeToString()


def _sniff(path: Path, head: bytes) -> None:
    """Name the common wrong files before protobuf gives an unreadable error."""
    if not head:
        raise InputModelError(f"{path}: file is empty")
    if head[4:8] == b"ORTM":
        raise InputModelError(
            f"{path}: this is an ORT-format model (.ort); onnxpq needs the .onnx model it was made from"
        )
    if head.lstrip()[:1] in (b"{", b"["):
        raise InputModelError(f"{path}: this looks like a JSON file, not an ONNX protobuf model")


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read an ONNX model, external data included, or raise ``InputModelError`` saying why not."""
    path = Path(path)
    if not path.exists():
        raise InputModelError(f"{path}: no such file")
    if path.is_dir():
        raise InputModelError(f"{path}: is a directory, expected an .onnx file")
    try:
        with path.open("rb") as f:
            head = f.read(64)
    except OSError as err:
        raise InputModelError(f"{path}: cannot read: {err.strerror}") from None
    _sniff(path, head)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError) as err:
        raise InputModelError(f"{path}: not a valid ONNX model (protobuf parse failed: {err})") from None
    if not model.HasField("graph") or not (model.graph.node or model.graph.output):
        raise InputModelError(f"{path}: parsed, but holds no graph: not an ONNX model or truncated")
    _resolve_external(model, path.parent)
    _check_opset(model, path)
    return model


def _set_location(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
    tensor.data_location = onnx.TensorProto.EXTERNAL


def _resolve_external(model: onnx.ModelProto, base_dir: Path) -> None:
    """Check every external tensor's data file and make its location absolute; read no data.

    A location must stay inside the model's folder, as onnxruntime requires.
    """
    root = base_dir.resolve()
    for tensor in _all_tensors(model.graph):
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        info = onnx.external_data_helper.ExternalDataInfo(tensor)
        data_path = (base_dir / info.location).resolve()
        if root not in data_path.parents:
            raise InputModelError(
                f"external data location {info.location!r} of tensor {tensor.name!r} is outside the model's folder"
            )
        if not data_path.is_file():
            raise InputModelError(
                f"external data file {info.location!r} of tensor {tensor.name!r} not found next to the model"
            )
        size = data_path.stat().st_size
        offset = info.offset or 0
        length = info.length if info.length is not None else size - offset
        if size < offset + length:
            raise InputModelError(
                f"external data file {info.location!r} is truncated: tensor {tensor.name!r} needs "
                f"bytes up to {offset + length}, the file has {size}"
            )
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        expected = dtype.itemsize * math.prod(tensor.dims)
        if dtype.kind in "fiubc" and length != expected:
            raise InputModelError(
                f"external data of tensor {tensor.name!r} is {length} bytes, but its shape "
                f"{list(tensor.dims)} and type {onnx.TensorProto.DataType.Name(tensor.data_type)} need {expected}"
            )
        _set_location(tensor, str(data_path), offset, length)


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of a graph and its subgraphs: initializers and tensor attributes."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from _all_tensors(body)


def opset_version(model: onnx.ModelProto) -> int:
    """The default-domain opset of the model (1 when the model does not declare one)."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 1


def _check_opset(model: onnx.ModelProto, path: Path) -> None:
    opset = opset_version(model)
    newest = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET:
        raise InputModelError(
            f"{path}: opset {opset} is older than {MIN_OPSET}; convert it first with "
            f"onnx.version_converter.convert_version(model, {MIN_OPSET})"
        )
    if opset > newest:
        raise InputModelError(f"{path}: opset {opset} is newer than this onnx package knows ({newest}); upgrade onnx")


def constant_tensors(graph: onnx.GraphProto) -> dict[str, ConstantTensor]:
    """Every constant of the main graph by name: initializers and ``Constant(value=tensor)`` outputs."""
    found = {t.name: ConstantTensor(t.name, t, None) for t in graph.initializer}
    for index, node in enumerate(graph.node):
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        for attr in node.attribute:
            if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                found[node.output[0]] = ConstantTensor(node.output[0], attr.t, index)
    return found


def constants_as_inputs(model: onnx.ModelProto, names: Collection[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose named constants are graph inputs of the same dtype and shape.

    One onnxruntime session of it can then be run with many candidate values
    for those tensors, instead of building a session per candidate.
    """
    wanted = set(names)
    found = constant_tensors(model.graph)
    missing = sorted(wanted - set(found))
    if missing:
        raise KeyError(f"not constants of the main graph: {missing}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    kept_nodes = [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] in wanted)]
    kept_inits = [t for t in graph.initializer if t.name not in wanted]
    del graph.node[:], graph.initializer[:]
    graph.node.extend(kept_nodes)
    graph.initializer.extend(kept_inits)
    # Models older than IR 4 also list their initializers as inputs; those entries already declare the tensor.
    declared = {i.name for i in graph.input}
    graph.input.extend(
        onnx.helper.make_tensor_value_info(n, found[n].tensor.data_type, list(found[n].tensor.dims))
        for n in sorted(wanted - declared)
    )
    return out


def subgraph_initializer_count(graph: onnx.GraphProto) -> int:
    """Count the initializers inside ``If``/``Loop``/``Scan`` bodies, which onnxpq leaves alone."""
    count = 0
    for node in graph.node:
        for attr in node.attribute:
            bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for body in bodies:
                count += len(body.initializer) + sum(n.op_type == "Constant" for n in body.node)
                count += subgraph_initializer_count(body)
    return count


def display_name(node: onnx.NodeProto, index: int) -> str:
    """The node's name, or a stable stand-in for the unnamed nodes some exporters write."""
    return node.name or f"{node.op_type}_{index}"


def check_output_path(input_path: Path, output_path: Path, *, force: bool) -> None:
    """Refuse to overwrite the input ever, and an existing output unless ``force``."""
    if output_path.exists() and output_path.resolve() == input_path.resolve():
        raise OutputPathError(f"{output_path}: output is the input model; choose another output path")
    if output_path.is_dir():
        raise OutputPathError(f"{output_path}: is a directory; give a file name for the output model")
    if output_path.exists() and not force:
        raise OutputPathError(f"{output_path}: exists; pass --force to overwrite it")
    parent = output_path.parent
    if not parent.is_dir():
        raise OutputPathError(f"{output_path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputPathError(f"{output_path}: directory {parent} is not writable")


@contextlib.contextmanager
def _staging_dir(parent: Path) -> Iterator[Path]:
    """A temporary folder beside the output, so the final rename never crosses file systems."""
    tmp = Path(tempfile.mkdtemp(prefix=".onnxpq-", dir=parent))
    try:
        yield tmp
    finally:
        for child in tmp.iterdir():
            child.unlink()
        tmp.rmdir()


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str], *, check: bool = True) -> list[Path]:
    """Write ``model`` atomically; return the files written.

    The model (and its external data past 2 GB) is written in a staging folder
    beside ``path``, optionally checked with ``onnx.checker`` (full_check), then
    renamed into place, so readers never see a half-written file.
    """
    path = Path(path)
    external = sum(w.length for w in map(_external, _all_tensors(model.graph)) if w is not None)
    large = external + _byte_size(model) >= PROTOBUF_LIMIT
    data_name = path.name + ".data"
    with _staging_dir(path.parent) as stage:
        staged = stage / path.name
        if large:
            onnx.save_model(_with_data_file(model, stage / data_name), str(staged))
        else:
            onnx.save_model(materialized(model), str(staged))
        if check:
            onnx.checker.check_model(str(staged), full_check=True)
        written = []
        if large:
            os.replace(stage / data_name, path.parent / data_name)
            written.append(path.parent / data_name)
        os.replace(staged, path)
        written.insert(0, path)
    return written


def _with_data_file(model: onnx.ModelProto, data_path: Path) -> onnx.ModelProto:
    """A copy of ``model`` whose large tensors all live in ``data_path``, written now.

    Tensors already external are copied from their file in chunks, so memory holds
    at most one chunk of them; inline tensors are moved out as they are.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    with data_path.open("wb") as f:
        for tensor in _all_tensors(out.graph):
            where = _external(tensor)
            if where is None and tensor.data_type == onnx.TensorProto.STRING:
                continue  # strings have no raw form; they stay in the graph
            if where is None and len(tensor.raw_data) < EXTERNAL_MIN_BYTES:
                if tensor.raw_data or tensor.ByteSize() < EXTERNAL_MIN_BYTES:
                    continue
                tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
            f.write(b"\0" * (-f.tell() % EXTERNAL_ALIGN))
            offset = f.tell()
            if where is None:
                f.write(tensor.raw_data)
                tensor.ClearField("raw_data")
            else:
                _copy_bytes(where, f)
            _set_location(tensor, data_path.name, offset, f.tell() - offset)
    return out


def _copy_bytes(where: _External, out: BinaryIO) -> None:
    with where.path.open("rb") as src:
        src.seek(where.offset)
        left = where.length
        while left:
            block = src.read(min(COPY_CHUNK, left))
            if not block:
                raise InputModelError(f"external data file {where.path} ended early")
            out.write(block)
            left -= len(block)


def _byte_size(model: onnx.ModelProto) -> int:
    """Serialised size; ``ByteSize`` itself overflows past 2 GiB in some protobuf builds."""
    try:
        return model.ByteSize()
    except (ValueError, OverflowError):
        return PROTOBUF_LIMIT


def readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """For each tensor name, the nodes of the main graph that read it, in graph order."""
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def constant_foldable_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes whose inputs are all constants (transitively): what onnxruntime should fold at load."""
    overridable = {i.name for i in graph.input}
    known = {t.name for t in graph.initializer if t.name not in overridable}
    foldable = []
    for node in graph.node:
        if node.op_type == "Constant":
            known.update(node.output)
        elif node.input and all(not name or name in known for name in node.input):
            known.update(node.output)
            foldable.append(node)
    return foldable
