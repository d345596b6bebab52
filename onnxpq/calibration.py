"""Sample inputs for a model: read from the files users already have, checked against the model's inputs.

A dataset is a dict from input name to an array whose first axis is the
sample (ModelOpt's ``.npz`` convention). Supported sources: ``.npz`` keyed by
input name, ``.npy`` for single-input models, a folder of
``test_data_set_*/input_*.pb`` (ONNX model zoo), any object with ``get_next()``
(onnxruntime's ``CalibrationDataReader``) or an iterable of feed dicts.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxpq.errors import ConfigError

__all__ = [
    "Dataset",
    "InputSpec",
    "RandomInputs",
    "batches",
    "input_specs",
    "load_dataset",
    "parse_shapes",
    "random_dataset",
]

_NP_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}


@dataclass(frozen=True)
class InputSpec:
    """A graph input: name, numpy dtype, and shape with None (or a name) for symbolic dimensions."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    @property
    def fixed_batch(self) -> bool:
        return bool(self.shape) and isinstance(self.shape[0], int)


@dataclass(frozen=True)
class Dataset:
    """Samples for every model input (first axis = sample), with where they came from."""

    arrays: dict[str, np.ndarray]
    source: str

    @property
    def n_samples(self) -> int:
        return len(next(iter(self.arrays.values())))

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for name in sorted(self.arrays):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(self.arrays[name]).tobytes())
        return digest.hexdigest()

    def head(self, n: int) -> Dataset:
        return Dataset({k: v[:n] for k, v in self.arrays.items()}, self.source)

    def skip(self, n: int) -> Dataset:
        """The samples after the first ``n`` (``head``'s complement)."""
        return Dataset({k: v[n:] for k, v in self.arrays.items()}, self.source)


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The real inputs of the graph: initializers listed as inputs (old exporters) are not inputs."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        ttype = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in ttype.shape.dim)
        specs.append(InputSpec(value.name, np.dtype(_NP_TYPES.get(ttype.elem_type, np.float32)), dims))
    return specs


def _kind(dtype: np.dtype) -> str:
    return "i" if dtype.kind in "iu" else dtype.kind


def _check(arrays: Mapping[str, np.ndarray], specs: list[InputSpec], source: str) -> dict[str, np.ndarray]:
    """Names, dtypes and ranks must match the model; the sample axis must agree across inputs."""
    names = {s.name for s in specs}
    missing = sorted(names - set(arrays))
    extra = sorted(set(arrays) - names)
    if missing:
        raise ConfigError(f"{source}: no data for model input(s) {missing}; it holds {sorted(arrays)}")
    if extra:
        raise ConfigError(f"{source}: key(s) {extra} are not inputs of the model (inputs: {sorted(names)})")
    checked = {}
    for spec in specs:
        arr = np.asarray(arrays[spec.name])
        if arr.ndim != len(spec.shape):
            raise ConfigError(
                f"{source}: input {spec.name!r} has rank {arr.ndim} (shape {arr.shape}), the model expects "
                f"rank {len(spec.shape)} {spec.shape} with samples on the first axis"
            )
        if arr.dtype != spec.dtype:
            # float64 -> float32 or int32 -> int64 is harmless; uint8 pixels into a float model are not.
            if _kind(arr.dtype) != _kind(spec.dtype):
                raise ConfigError(f"{source}: input {spec.name!r} is {arr.dtype}, the model expects {spec.dtype}")
            arr = arr.astype(spec.dtype)
        for axis, (got, want) in enumerate(zip(arr.shape[1:], spec.shape[1:], strict=True), start=1):
            if isinstance(want, int) and got != want:
                raise ConfigError(f"{source}: input {spec.name!r} axis {axis} is {got}, the model expects {want}")
        checked[spec.name] = arr
    counts = {len(a) for a in checked.values()}
    if len(counts) != 1 or 0 in counts:
        raise ConfigError(f"{source}: inputs disagree on the number of samples or are empty: {sorted(counts)}")
    return checked


def _from_pb_dir(path: Path, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    """Stack ``test_data_set_*/input_*.pb`` folders into arrays, one sample per folder."""
    sets = sorted(p for p in path.iterdir() if p.is_dir() and p.name.startswith("test_data_set_"))
    if not sets:
        raise ConfigError(f"{path}: no test_data_set_* folders")
    stacked: dict[str, list[np.ndarray]] = {}
    for folder in sets:
        files = sorted(folder.glob("input_*.pb"), key=lambda p: int(re.findall(r"\d+", p.stem)[-1]))
        for i, file in enumerate(files):
            tensor = onnx.TensorProto()
            tensor.ParseFromString(file.read_bytes())
            name = tensor.name or (specs[i].name if i < len(specs) else f"input_{i}")
            stacked.setdefault(name, []).append(numpy_helper.to_array(tensor))
    return {k: np.concatenate(v) if v[0].ndim and len(specs) else np.stack(v) for k, v in stacked.items()}


def _from_feeds(feeds: Iterable[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Concatenate feed dicts (each a batch with samples on the first axis)."""
    parts: dict[str, list[np.ndarray]] = {}
    for feed in feeds:
        for k, v in feed.items():
            parts.setdefault(k, []).append(np.asarray(v))
    if not parts:
        raise ConfigError("the calibration reader produced no samples")
    return {k: np.concatenate(v) for k, v in parts.items()}


def _reader_feeds(reader: Any) -> Iterator[Mapping[str, Any]]:
    """Drain an onnxruntime ``CalibrationDataReader``, rewinding it first when it can."""
    if hasattr(reader, "rewind"):
        reader.rewind()
    while (feed := reader.get_next()) is not None:
        yield feed


def load_dataset(
    source: str | os.PathLike[str] | Any, model: onnx.ModelProto, *, max_samples: int | None = None
) -> Dataset:
    """Read samples from a path or a Python reader and check them against the model's inputs."""
    specs = input_specs(model)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = str(path)
        if not path.exists():
            raise ConfigError(f"{path}: calibration data not found")
        if path.is_dir():
            arrays = _from_pb_dir(path, specs)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        elif path.suffix == ".npy":
            if len(specs) != 1:
                raise ConfigError(
                    f"{path}: a .npy file feeds single-input models; this one has {len(specs)} inputs, "
                    "use an .npz keyed by input name"
                )
            arrays = {specs[0].name: np.load(path, allow_pickle=False)}
        else:
            raise ConfigError(f"{path}: unknown calibration format; use .npz, .npy or a test_data_set_* folder")
    else:
        label = type(source).__name__
        arrays = _from_feeds(_reader_feeds(source) if hasattr(source, "get_next") else source)
    checked = _check(arrays, specs, label)
    dataset = Dataset(checked, label)
    return dataset.head(max_samples) if max_samples else dataset


def _concrete(dim: int | str | None, axis: int, overrides: Mapping[str, int]) -> int:
    if isinstance(dim, int) and dim > 0:
        return dim
    if isinstance(dim, str) and dim in overrides:
        return overrides[dim]
    return 1 if axis == 0 else 32


@dataclass(frozen=True)
class RandomInputs:
    """A request for synthetic calibration inputs with explicit shapes (``--calibration-shapes``)."""

    shapes: Mapping[str, tuple[int, ...]]


def parse_shapes(text: str) -> dict[str, tuple[int, ...]]:
    """``input:1x3x224x224,mask:1x128`` (ModelOpt's syntax) -> {name: shape}."""
    shapes = {}
    for item in text.split(","):
        name, sep, dims = item.strip().rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.split("x"))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or min(shape) < 1:
            raise ConfigError(f"bad shape {item!r}: write NAME:DxDx... with positive sizes, e.g. input:1x3x224x224")
        shapes[name] = shape
    return shapes


def _check_shape(spec: InputSpec, shape: tuple[int, ...]) -> list[int]:
    fixed_ok = all(not isinstance(d, int) or d == s for d, s in zip(spec.shape, shape, strict=False))
    if len(shape) != len(spec.shape) or not fixed_ok:
        raise ConfigError(f"shape {shape} for input {spec.name!r} does not match its declared shape {spec.shape}")
    return list(shape)


def random_dataset(
    model: onnx.ModelProto,
    n_samples: int,
    rng: np.random.Generator,
    *,
    dims: Mapping[str, int] | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> Dataset:
    """Synthetic inputs from the declared shapes: floats ~ N(0,1), integers 0/1 (valid ids and masks).

    ``shapes`` gives whole shapes per input; otherwise symbolic dimensions take
    ``dims[name]`` when given, else 1 for the batch axis and 32 elsewhere.
    """
    specs = input_specs(model)
    unknown = sorted(set(shapes or {}) - {s.name for s in specs})
    if unknown:
        raise ConfigError(f"--calibration-shapes names unknown input(s) {', '.join(unknown)}")
    arrays = {}
    for spec in specs:
        if shapes and spec.name in shapes:
            shape = _check_shape(spec, shapes[spec.name])
        else:
            shape = [_concrete(d, i, dims or {}) for i, d in enumerate(spec.shape)]
        shape[0] = shape[0] * n_samples if shape else n_samples
        if np.issubdtype(spec.dtype, np.floating):
            arrays[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            arrays[spec.name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
    return Dataset(arrays, "random")


def batches(dataset: Dataset, model: onnx.ModelProto, batch_size: int = 32) -> Iterator[dict[str, np.ndarray]]:
    """Feed dicts for onnxruntime: batches along the sample axis, or one sample when the batch dim is fixed."""
    specs = {s.name: s for s in input_specs(model)}
    fixed = any(specs[n].fixed_batch for n in dataset.arrays)
    step = min(specs[n].shape[0] for n in dataset.arrays) if fixed else batch_size
    for start in range(0, dataset.n_samples, step):
        yield {k: v[start : start + step] for k, v in dataset.arrays.items()}
