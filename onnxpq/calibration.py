"""Sample inputs for a model: read from the files users already have, checked against the model's inputs.

A dataset is a dict from input name to an array whose first axis is the
sample (ModelOpt's ``.npz`` convention). Supported sources: ``.npz`` keyed by
input name, ``.npy`` for single-input models, a folder of
``test_data_set_*/input_*.pb`` (ONNX model zoo), any object with ``get_next()``
(onnxruntime's ``CalibrationDataReader``) or an iterable of feed dicts.

What a sample is, per input, decided from its declared shape and the data given:

1. *Batched*: the declared leading dim is symbolic (or the rank is unknown), or it
   is fixed at ``d`` and the data holds a multiple of ``d`` rows. Axis 0 is the
   sample axis; a run gets ``d`` rows (fixed) or up to ``batch_size`` (symbolic).
2. *Shared*: a fixed-leading-dim input whose data has its declared shape (symbolic
   dims any size) while another input is batched (``x[1,128]`` with ``s[64]``; Silero
   VAD's ``state[2,batch,128]`` given once), or a 0-d array for
   a scalar or unknown-rank input (Silero VAD's ``sr``). It is fed whole, the same
   in every run, and is not cut by ``head``/``skip``. Synthetic data shares the
   inputs whose fixed leading dim is not the smallest one, and every scalar.
3. *Per-sample scalar*: a rank-0 input given as a 1-D array, one value per sample;
   each run then holds one sample and feeds the value as a scalar.
4. *Batched on another axis*: a fixed-leading-dim input whose batch is a later axis,
   named like the batched inputs' leading dim (Silero VAD's ``state[2,batch,128]``),
   given with one slice per sample on that axis (``(2, n, 128)`` beside ``input (n, 576)``):
   the recurrent state each sample saw in a stream. Stored with that axis first, fed
   back in the model's order (``Dataset.sample_axes``). A reader's feed dicts of
   such an input are joined along that axis too. A model that runs one sample per
   call (every batched input's leading dim fixed at 1) may declare that axis as a
   fixed 1 instead (Silero's OpenVINO export: ``state[2,1,128]``, ``input[1,576]``).

All batched inputs must agree on the number of samples; those with a fixed
leading dim must agree on ``d`` (a per-sample scalar forces ``d = 1``, and a shared
input's dim named like the batched inputs' leading dim forces its size).

Reads are bounded: a ``.npy``/``.npz`` member's shape and dtype are read from its
header and checked against ``data_budget()`` before anything is inflated, only
the first ``max_samples`` rows are read, and a reader stops once it has enough.
Samples holding NaN, Inf or values whose square overflows float32 are refused.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from onnxpq.errors import ConfigError, InputModelError
from onnxpq.model.files import serialized
from onnxpq.model.session import run_feeds, session
from onnxpq.model.tensors import check_tensor

__all__ = [
    "DATA_MEMORY_FRACTION",
    "MAX_ABS_SAMPLE",
    "Dataset",
    "InputSpec",
    "RandomInputs",
    "batches",
    "check_synthetic",
    "data_budget",
    "input_specs",
    "load_dataset",
    "parse_shapes",
    "per_sample_scalars",
    "random_dataset",
    "run_session",
    "run_size",
]

#: Share of physical memory one dataset may take. The samples sit in memory beside the model,
#: two onnxruntime sessions (validation) and the per-layer statistics, so a quarter leaves room for them.
DATA_MEMORY_FRACTION = 0.25
#: Used when the platform does not report its physical memory (Windows has no ``sysconf``).
FALLBACK_MEMORY_BYTES = 8 << 30
#: Largest magnitude accepted in a float sample: the second-moment statistics (``X^T X``) of a larger
#: value overflow float32 to Inf, and the quantizer would silently fall back to data-free results.
MAX_ABS_SAMPLE = float(np.sqrt(np.finfo(np.float32).max))
#: Names listed in one error message before the rest are counted; keeps a 10 000-member file to one line.
_LISTED = 8


def data_budget() -> int:
    """Bytes one dataset may occupy: ``DATA_MEMORY_FRACTION`` of physical memory."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        total = FALLBACK_MEMORY_BYTES
    return int(total * DATA_MEMORY_FRACTION)


def _names(items: Iterable[str]) -> str:
    """A sorted, bounded list of names for a one-line message."""
    items = sorted(items)
    shown = ", ".join(repr(n) for n in items[:_LISTED])
    return shown + (f" and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


@dataclass(frozen=True)
class InputSpec:
    """A graph input: name, numpy dtype, and shape with None (or a name) for symbolic dimensions.

    ``shape`` is None when the model declares no shape at all (unknown rank).
    """

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None

    @property
    def fixed_batch(self) -> bool:
        return bool(self.shape) and isinstance(self.shape[0], int) and self.shape[0] > 0


@dataclass(frozen=True)
class Dataset:
    """Samples for every model input (first axis = sample), with where they came from.

    ``shared`` names the inputs fed whole in every run (see the module docstring);
    0-d arrays are always shared. ``sample_axes`` gives, for an input whose samples
    sit on a later axis in the model's feeds, that axis: its array here has the
    samples first like every other, and ``feed`` puts them back.
    """

    arrays: dict[str, np.ndarray]
    source: str
    shared: frozenset[str] = field(default_factory=frozenset)
    sample_axes: Mapping[str, int] = field(default_factory=dict)

    def is_shared(self, name: str) -> bool:
        return name in self.shared or np.ndim(self.arrays[name]) == 0

    @property
    def n_samples(self) -> int:
        return next((len(v) for k, v in self.arrays.items() if not self.is_shared(k)), 1)

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for name in sorted(self.arrays):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(self.arrays[name]).tobytes())
        return digest.hexdigest()

    def head(self, n: int) -> Dataset:
        return self.rows(slice(None, n))

    def skip(self, n: int) -> Dataset:
        """The samples after the first ``n`` (``head``'s complement)."""
        return self.rows(slice(n, None))

    def rows(self, index: slice | np.ndarray) -> Dataset:
        """The samples at ``index`` (a slice or an index array); shared inputs stay whole."""
        arrays = {k: v if self.is_shared(k) else v[index] for k, v in self.arrays.items()}
        return Dataset(arrays, self.source, self.shared, self.sample_axes)

    def feed(self, name: str, rows: np.ndarray) -> np.ndarray:
        """``rows`` of input ``name`` (samples first) in the layout the model reads."""
        axis = self.sample_axes.get(name)
        return np.moveaxis(rows, 0, axis) if axis else rows


def _np_dtype(elem_type: int) -> np.dtype:
    """numpy's dtype for an ONNX element type; float32 when the model leaves the type undefined."""
    if elem_type == onnx.TensorProto.UNDEFINED:
        return np.dtype(np.float32)
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def _declared_shape(value: onnx.ValueInfoProto) -> tuple[int | str | None, ...] | None:
    ttype = value.type.tensor_type
    if not ttype.HasField("shape"):
        return None
    dims: list[int | str | None] = []
    for axis, d in enumerate(ttype.shape.dim):
        if d.HasField("dim_value") and d.dim_value < 0:
            raise InputModelError(f"input {value.name!r} declares size {d.dim_value} at axis {axis}; sizes are >= 0")
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return tuple(dims)


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The real inputs of the graph: initializers listed as inputs (old exporters) are not inputs."""
    inits = {t.name for t in model.graph.initializer}
    return [
        InputSpec(v.name, _np_dtype(v.type.tensor_type.elem_type), _declared_shape(v))
        for v in model.graph.input
        if v.name not in inits
    ]


def _is_float(dtype: np.dtype) -> bool:
    """numpy floats and ml_dtypes' (bfloat16, float8 ...), whose numpy kind is 'V'."""
    return dtype.kind == "f" or "float" in dtype.name


def _kind(dtype: np.dtype) -> str:
    if _is_float(dtype):
        return "f"
    return "i" if dtype.kind in "iu" or dtype.name in ("int4", "uint4") else dtype.kind


def _refuse_unfeedable(spec: InputSpec) -> None:
    """onnxruntime's Python API takes only numpy's own dtypes: ml_dtypes arrays (bfloat16, float8, int4)
    fail inside ``run`` with "Numpy_type 256 can't be converted to MLDataType"."""
    if spec.dtype.kind == "V":
        raise ConfigError(
            f"input {spec.name!r} is {spec.dtype}: onnxruntime's Python API cannot be fed {spec.dtype} arrays, so "
            "onnxpq cannot run this model on samples; compress it data-free with --no-validate"
        )


def _check_names(keys: Iterable[str], specs: list[InputSpec], source: str) -> None:
    keys, names = set(keys), {s.name for s in specs}
    if names - keys:
        raise ConfigError(f"{source}: no data for model input(s) [{_names(names - keys)}]; it holds [{_names(keys)}]")
    if keys - names:
        raise ConfigError(
            f"{source}: key(s) [{_names(keys - names)}] are not inputs of the model (inputs: [{_names(names)}])"
        )


def _conform(spec: InputSpec, value: Any, source: str, free_axis: int | None = None) -> np.ndarray:
    """One input's data with the model's dtype; rank and fixed sizes checked (see the module docstring),
    except on ``free_axis``, a fixed 1 that may hold one slice per sample (rule 4)."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{source}: input {spec.name!r} is not an array: {err}") from None
    _refuse_unfeedable(spec)
    if arr.dtype.hasobject or arr.dtype.names:
        raise ConfigError(f"{source}: input {spec.name!r} holds {arr.dtype} values; give a numeric array")
    if spec.shape == () and arr.ndim > 1:
        raise ConfigError(
            f"{source}: input {spec.name!r} is a scalar; give one value, or one value per sample (shape {arr.shape})"
        )
    if spec.shape and arr.ndim != len(spec.shape):
        raise ConfigError(
            f"{source}: input {spec.name!r} has rank {arr.ndim} (shape {arr.shape}), the model expects "
            f"rank {len(spec.shape)} {spec.shape} with samples on the first axis"
        )
    if arr.dtype != spec.dtype:
        # float64 -> float32 or int32 -> int64 is harmless; uint8 pixels into a float model are not.
        if _kind(arr.dtype) != _kind(spec.dtype):
            raise ConfigError(f"{source}: input {spec.name!r} is {arr.dtype}, the model expects {spec.dtype}")
        arr = arr.astype(spec.dtype)
    for axis, (got, want) in enumerate(zip(arr.shape[1:], (spec.shape or ())[1:], strict=False), start=1):
        if isinstance(want, int) and got != want and axis != free_axis:
            raise ConfigError(f"{source}: input {spec.name!r} axis {axis} is {got}, the model expects {want}")
    return arr


def _check(arrays: Mapping[str, Any], specs: list[InputSpec], source: str, cut: int | None = None) -> Dataset:
    """Names, dtypes and ranks must match the model; the batched inputs must agree on the samples."""
    _check_names(arrays, specs, source)
    ones = _fixed_one_axes(specs, arrays)
    checked = {s.name: _conform(s, arrays[s.name], source, ones.get(s.name)) for s in specs}
    exact = {s.name for s in specs if _at_declared_shape(s, checked[s.name])}
    batched = {n for n, a in checked.items() if a.ndim} - exact - set(ones)
    axes = _later_sample_axes(specs, checked, exact, batched, cut, ones)
    unplaced = sorted(set(ones) - set(axes))
    if unplaced:
        name = unplaced[0]
        raise ConfigError(
            f"{source}: input {name!r} holds {checked[name].shape[ones[name]]} slices on axis {ones[name]}, "
            f"declared 1 there (one per sample for a model that runs one sample per call), but the other inputs "
            f"hold {', '.join(str(c) for c in sorted({len(checked[n]) for n in batched})) or 'no'} samples"
        )
    samples = len(checked[next(iter(batched))]) if axes else 0  # every batched input holds this many (checked)
    for name, axis in axes.items():
        checked[name] = np.moveaxis(checked[name], axis, 0)[:samples]
    exact -= set(axes)
    dataset = Dataset(checked, source, frozenset(exact) if batched else frozenset(), axes)
    _run_size(dataset, specs, 1)
    return dataset


def _leading_names(batched: Iterable[InputSpec]) -> set[str | None]:
    """The names of the batched inputs' symbolic leading dims (None for an unnamed one)."""
    return {s.shape[0] for s in batched if s.shape and not isinstance(s.shape[0], int)}


def _single_sample_axis(spec: InputSpec, specs: list[InputSpec]) -> int | None:
    """Where a model that runs one sample per call (every other fixed leading dim is 1) keeps the sample of
    an input whose leading dim is fixed above 1: its only later axis declared 1 (rule 4)."""
    if not spec.fixed_batch or spec.shape[0] == 1:
        return None
    if {s.shape[0] for s in specs if s.fixed_batch and s is not spec} != {1}:
        return None
    ones = [a for a, d in enumerate(spec.shape) if a and d == 1]
    return ones[0] if len(ones) == 1 else None


def _fixed_one_axes(specs: list[InputSpec], arrays: Mapping[str, Any]) -> dict[str, int]:
    """Inputs whose data hold several slices on their ``_single_sample_axis``, every other fixed dim
    matching: one slice per sample (rule 4)."""
    found = {}
    for s in specs:
        axis, shape = _single_sample_axis(s, specs), getattr(arrays[s.name], "shape", None)
        if axis is None or shape is None or len(shape) != len(s.shape) or shape[axis] < 2:
            continue
        dims = enumerate(zip(s.shape, shape, strict=True))
        if all(not isinstance(d, int) or d == n for a, (d, n) in dims if a != axis):
            found[s.name] = axis
    return found


def _later_sample_axes(
    specs: list[InputSpec],
    arrays: Mapping[str, np.ndarray],
    exact: set[str],
    batched: set[str],
    cut: int | None,
    ones: Mapping[str, int],
) -> dict[str, int]:
    """Inputs whose batch is a later axis holding one slice per sample (rule 4).

    The axis must be the input's only symbolic dim named like the batched inputs' leading dim (two
    unnamed dims count as the same), or a fixed 1 of a model that runs one sample per call (``ones``),
    and hold as many slices as the batched inputs hold samples, more than one: a state given once (size 1
    there) stays shared. ``cut``: the samples the reader stopped at (``max_samples``); when the batched
    inputs were cut there, such an input may hold more slices, and the caller keeps the first ones.
    """
    counts = {len(arrays[n]) for n in batched}
    if len(counts) != 1 or (n := counts.pop()) < 2:
        return {}
    leading = _leading_names(s for s in specs if s.name in batched)
    axes = {}
    for s in specs:
        axis = _batch_axis(s, leading) if s.name in exact else ones.get(s.name)
        size = arrays[s.name].shape[axis] if axis is not None else None
        if size is not None and (size == n or (n == cut and size > n)):
            axes[s.name] = axis
    return axes


def _batch_axis(spec: InputSpec, leading: set[str | None]) -> int | None:
    """The axis past the first that is ``spec``'s only symbolic dim named like a batched input's leading dim."""
    found = [a for a, d in enumerate((spec.shape or ())[1:], start=1) if not isinstance(d, int) and d in leading]
    return found[0] if len(found) == 1 else None


def _at_declared_shape(spec: InputSpec, arr: np.ndarray) -> bool:
    """One copy of a fixed-leading-dim input: its declared shape, symbolic dims taking any size
    (Silero VAD's ``state`` [2, batch, 128] given once as (2, 1, 128))."""
    return (
        spec.fixed_batch
        and arr.ndim == len(spec.shape)
        and all(not isinstance(d, int) or d == n for d, n in zip(spec.shape, arr.shape, strict=True))
    )


def _shared_batch(dataset: Dataset, specs: list[InputSpec], batched: list[InputSpec]) -> set[int]:
    """Sizes a shared input fixes for every run: its dim named like the batched inputs' leading dim
    (two unnamed dims count as the same) is the batch, so runs hold that many samples."""
    leading = _leading_names(batched)
    return {
        dataset.arrays[s.name].shape[axis]
        for s in specs
        if s.name in dataset.shared and s.shape
        for axis, dim in enumerate(s.shape)
        if not isinstance(dim, int) and dim in leading
    }


def _run_size(dataset: Dataset, specs: list[InputSpec], batch_size: int) -> int:
    """Samples per onnxruntime run: the fixed leading dim of the batched inputs, 1 with per-sample
    scalars, else ``batch_size``; refuses inputs that cannot be run together."""
    batched = [s for s in specs if s.name in dataset.arrays and not dataset.is_shared(s.name)]
    counts = {s.name: len(dataset.arrays[s.name]) for s in batched}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{n!r}: {c}" for n, c in list(counts.items())[:_LISTED])
        raise ConfigError(f"{dataset.source}: inputs disagree on the number of samples ({listed})")
    if 0 in counts.values():
        raise ConfigError(f"{dataset.source}: input(s) [{_names(counts)}] hold 0 samples")
    fixed = {s.shape[0] for s in batched if s.fixed_batch and s.name not in dataset.sample_axes}
    sizes = fixed | ({1} if any(s.shape == () for s in batched) else set())
    sizes |= _shared_batch(dataset, specs, batched)
    if len(sizes) > 1:
        raise ConfigError(
            f"{dataset.source}: batched inputs have different fixed batch sizes {sorted(sizes)} (a scalar given "
            "per sample counts as 1); give an input at exactly its declared shape to share it across samples"
        )
    if not sizes:
        return batch_size
    step = sizes.pop()
    if dataset.n_samples % step:
        raise ConfigError(
            f"{dataset.source}: {dataset.n_samples} samples do not fill runs of the fixed batch size {step}"
        )
    return step


def _refuse_nonfinite(dataset: Dataset) -> None:
    """NaN, Inf or a value over ``MAX_ABS_SAMPLE`` would turn the statistics into Inf/NaN silently."""
    for name, arr in dataset.arrays.items():
        if not _is_float(arr.dtype):
            continue
        shared = dataset.is_shared(name)
        rows = arr.reshape(1, -1) if shared else arr.reshape(len(arr), -1)
        for start in range(0, len(rows), 1024):  # bounded temporaries for large datasets
            bad = ~(np.abs(rows[start : start + 1024]) <= MAX_ABS_SAMPLE).all(axis=1)
            if bad.any():
                index = start + int(np.argmax(bad))
                where = "in the value shared by every sample" if shared else f"sample {index}"
                raise ConfigError(
                    f"{dataset.source}: input {name!r} {where} holds NaN, Inf or a magnitude over "
                    f"{MAX_ABS_SAMPLE:.3g} (its statistics would overflow); fix or drop it"
                )


def _merge(parts: Mapping[str, list[np.ndarray]], specs: list[InputSpec], source: str) -> dict[str, np.ndarray]:
    """Join per-sample pieces along the sample axis. A scalar, or a value at exactly its fixed declared
    shape, that is the same in every piece while another input varies, is kept once (shared)."""
    declared = {s.name: s for s in specs}
    leading = _leading_names(s for s in specs if not s.fixed_batch)
    same = {k: all(v.shape == vs[0].shape and np.array_equal(v, vs[0]) for v in vs[1:]) for k, vs in parts.items()}
    varies = not all(same.values())
    out = {}
    for key, values in parts.items():
        first, spec = values[0], declared.get(key)
        if varies and same[key] and (first.ndim == 0 or (spec is not None and first.shape == spec.shape)):
            out[key] = first
            continue
        later = None
        if spec and all(_at_declared_shape(spec, v) for v in values):
            later = _batch_axis(spec, leading) or _single_sample_axis(spec, specs)
        try:
            out[key] = np.concatenate(values, axis=later or 0) if first.ndim else np.stack(values)
        except ValueError as err:
            raise ConfigError(f"{source}: the pieces of input {key!r} do not fit together: {err}") from None
    return out


_PB_NAME = re.compile(r"input_(\d+)\.pb")


def _read_pb(file: Path, budget: int) -> onnx.TensorProto:
    size = file.stat().st_size
    if size > budget:
        raise ConfigError(f"{file}: {size} bytes, over the data memory budget of {budget} bytes")
    tensor = onnx.TensorProto()
    try:
        tensor.ParseFromString(file.read_bytes())
        check_tensor(tensor)
    except (DecodeError, RuntimeWarning, ValueError, InputModelError) as err:
        raise ConfigError(f"{file}: not a valid TensorProto sample: {err}") from None
    if onnx.external_data_helper.uses_external_data(tensor):
        raise ConfigError(f"{file}: sample tensors with external data are not supported; store the values inline")
    return tensor


def _from_pb_dir(path: Path, specs: list[InputSpec], max_samples: int | None) -> dict[str, np.ndarray]:
    """Stack ``test_data_set_*/input_<n>.pb`` folders into arrays, one sample per folder."""
    sets = sorted(p for p in path.iterdir() if p.is_dir() and p.name.startswith("test_data_set_"))
    if not sets:
        raise ConfigError(f"{path}: no test_data_set_* folders")
    budget = data_budget()
    parts: dict[str, list[np.ndarray]] = {}
    for folder in sets[:max_samples]:
        files = sorted(folder.glob("input_*.pb"))
        bad = [f.name for f in files if not _PB_NAME.fullmatch(f.name)]
        if bad:
            raise ConfigError(f"{folder}: file(s) [{_names(bad)}] are not named input_<number>.pb")
        if not files:
            raise ConfigError(f"{folder}: no input_<number>.pb files")
        for i, file in enumerate(sorted(files, key=lambda p: int(_PB_NAME.fullmatch(p.name)[1]))):
            tensor = _read_pb(file, budget)
            budget -= file.stat().st_size
            name = tensor.name or (specs[i].name if i < len(specs) else f"input_{i}")
            try:
                parts.setdefault(name, []).append(numpy_helper.to_array(tensor))
            except (ValueError, TypeError, KeyError) as err:
                raise ConfigError(f"{file}: cannot read its values: {err}") from None
    return _merge(parts, specs, str(path))


def _from_feeds(feeds: Iterable[Any], specs: list[InputSpec], max_samples: int | None) -> dict[str, np.ndarray]:
    """Join feed dicts (each a batch with samples on the first axis), reading no more than needed."""
    parts: dict[str, list[np.ndarray]] = {}
    rows = 0
    for feed in feeds:
        if not isinstance(feed, Mapping):
            raise ConfigError(f"the calibration reader produced a {type(feed).__name__}, not a dict of arrays")
        arrays = {str(k): np.asarray(v) for k, v in feed.items()}
        for key, value in arrays.items():
            parts.setdefault(key, []).append(value)
        rows += min((len(v) for v in arrays.values() if v.ndim), default=1)
        if max_samples and rows >= max_samples:
            break  # a reader over 50k images is not drained for 512 samples
    if not parts:
        raise ConfigError("the calibration reader produced no samples")
    return _merge(parts, specs, "calibration reader")


def _reader_feeds(reader: Any) -> Iterator[Mapping[str, Any]]:
    """Read an onnxruntime ``CalibrationDataReader``, rewinding it first when it can."""
    if hasattr(reader, "rewind"):
        reader.rewind()
    while (feed := reader.get_next()) is not None:
        yield feed


def _read_npy(
    stream: BinaryIO, label: str, size: int, keep: tuple[Any, ...] | None, max_rows: int | None
) -> np.ndarray:
    """One ``.npy`` array from an open stream, checked against its size and the budget before inflating.

    Only the first ``max_rows`` rows are read (C order), unless the header's shape is ``keep``
    (an input given at exactly its declared shape is shared, so it is read whole).
    """
    try:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(stream)
        available = size - stream.tell()
    except (ValueError, EOFError, OSError, zipfile.BadZipFile, zlib.error) as err:
        raise ConfigError(f"{label}: not a readable .npy array ({err})") from None
    if any(d < 0 for d in shape):
        raise ConfigError(f"{label}: header declares negative sizes {shape}")
    if dtype.hasobject or dtype.itemsize == 0:
        raise ConfigError(f"{label}: holds {dtype} values; onnxpq reads numeric arrays and never unpickles")
    declared = math.prod(shape) * dtype.itemsize
    if declared > available:
        raise ConfigError(
            f"{label}: header declares shape {shape} {dtype} ({declared} bytes), but only {available} bytes follow"
        )
    whole = not shape or max_rows is None or shape == keep or fortran
    out_shape = shape if whole else (min(shape[0], max_rows), *shape[1:])
    nbytes = math.prod(out_shape) * dtype.itemsize
    if nbytes > data_budget():
        raise ConfigError(
            f"{label}: shape {shape} {dtype} needs {nbytes / 2**30:.3g} GiB, over the data memory budget of "
            f"{data_budget() / 2**30:.3g} GiB ({DATA_MEMORY_FRACTION:.0%} of physical memory)"
        )
    out = np.empty(math.prod(out_shape), dtype=dtype)
    buffer, got = memoryview(out.view(np.uint8)), 0
    try:
        while got < nbytes and (n := stream.readinto(buffer[got:])):
            got += n
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise ConfigError(f"{label}: cannot read its data ({err})") from None
    if got < nbytes:
        raise ConfigError(f"{label}: data ends after {got} of {nbytes} bytes")
    return out.reshape(shape[::-1]).T[:max_rows] if fortran and shape else out.reshape(out_shape)


def _from_npz(path: Path, specs: list[InputSpec], max_rows: int | None) -> dict[str, np.ndarray]:
    """Members of an ``.npz`` keyed by input name; names are checked before any member is read."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise ConfigError(f"{path}: not a valid .npz (zip) file: {err}") from None
    with archive:
        infos = archive.infolist()
        keys = [i.filename.removesuffix(".npy") for i in infos]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"{path}: holds the same member name twice; write it again with numpy.savez")
        _check_names(keys, specs, str(path))
        declared = {s.name: s.shape for s in specs}
        arrays, used = {}, 0
        for key, info in zip(keys, infos, strict=True):
            label = f"{path} member {key!r}"
            try:
                with archive.open(info) as stream:
                    arrays[key] = _read_npy(stream, label, info.file_size, declared[key], max_rows)
            except (RuntimeError, NotImplementedError, zipfile.BadZipFile, zlib.error, OSError) as err:
                raise ConfigError(f"{label}: cannot read it ({err})") from None
            used += arrays[key].nbytes
            if used > data_budget():
                raise ConfigError(f"{path}: its members together pass the data memory budget at {label}")
    return arrays


def _from_npy(path: Path, spec: InputSpec, max_rows: int | None) -> np.ndarray:
    with path.open("rb") as stream:
        return _read_npy(stream, str(path), path.stat().st_size, spec.shape, max_rows)


def _from_path(path: Path, specs: list[InputSpec], max_samples: int | None) -> dict[str, np.ndarray]:
    if not path.exists():
        raise ConfigError(f"{path}: calibration data not found")
    if path.is_dir():
        return _from_pb_dir(path, specs, max_samples)
    if not path.is_file():
        raise ConfigError(f"{path}: not a regular file")
    if path.suffix == ".npz":
        return _from_npz(path, specs, max_samples)
    if path.suffix == ".npy":
        if len(specs) != 1:
            raise ConfigError(
                f"{path}: a .npy file feeds single-input models; this one has {len(specs)} inputs, "
                "use an .npz keyed by input name"
            )
        return {specs[0].name: _from_npy(path, specs[0], max_samples)}
    raise ConfigError(f"{path}: unknown calibration format; use .npz, .npy or a test_data_set_* folder")


def load_dataset(
    source: str | os.PathLike[str] | Any, model: onnx.ModelProto, *, max_samples: int | None = None
) -> Dataset:
    """Read samples from a path or a Python reader and check them against the model's inputs."""
    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"max_samples={max_samples} must be >= 1")
    specs = input_specs(model)
    if isinstance(source, (str, os.PathLike)):
        label = str(source)
        arrays = _from_path(Path(source), specs, max_samples)
    elif hasattr(source, "get_next") or isinstance(source, Iterable):
        label = type(source).__name__
        arrays = _from_feeds(_reader_feeds(source) if hasattr(source, "get_next") else source, specs, max_samples)
    else:
        raise ConfigError(f"calibration data of type {type(source).__name__}: give a path, a reader or feed dicts")
    dataset = _check(arrays, specs, label, cut=max_samples)
    if max_samples:
        step = _run_size(dataset, specs, 1)
        dataset = dataset.head(max(step, max_samples - max_samples % step))
    _refuse_nonfinite(dataset)
    return dataset


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
    if spec.shape is None:
        return list(shape)
    fixed_ok = all(not isinstance(d, int) or d == s for d, s in zip(spec.shape, shape, strict=False))
    if len(shape) != len(spec.shape) or not fixed_ok:
        raise ConfigError(f"shape {shape} for input {spec.name!r} does not match its declared shape {spec.shape}")
    return list(shape)


#: numpy's limit on the number of axes of an array.
_MAX_RANK = 64


def _synthetic_shared(specs: list[InputSpec], shapes: Mapping[str, tuple[int, ...]]) -> frozenset[str]:
    """Inputs synthetic data gives once, at their declared shape: when the fixed leading dims differ
    (``x[1,128]`` and ``s[64]``), only the inputs with the smallest one (or a symbolic one) are batched."""
    fixed = {s.name: s.shape[0] for s in specs if s.fixed_batch and s.name not in shapes}
    if len(set(fixed.values())) <= 1:
        return frozenset()
    return frozenset(n for n, d in fixed.items() if d != min(fixed.values()))


def _synthetic_shape(
    spec: InputSpec, n_samples: int, dims: Mapping[str, int], shapes: Mapping[str, tuple[int, ...]]
) -> list[int]:
    """Rows for ``n_samples`` samples; a scalar input gets one value shared by every sample."""
    if spec.name in shapes:
        shape = _check_shape(spec, shapes[spec.name])
    elif spec.shape is None:
        raise ConfigError(
            f"input {spec.name!r} declares no shape, so no synthetic data can be made for it: give it with "
            f"--calibration-shapes {spec.name}:DxD..., or give real samples"
        )
    else:
        shape = [_concrete(d, i, dims) for i, d in enumerate(spec.shape)]
    if len(shape) > _MAX_RANK:
        raise ConfigError(f"input {spec.name!r} has rank {len(shape)}; numpy arrays hold at most {_MAX_RANK} axes")
    if shape:
        shape[0] *= n_samples
    return shape


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
    The sizes are checked against ``data_budget()`` before anything is allocated.
    """
    specs = input_specs(model)
    unknown = sorted(set(shapes or {}) - {s.name for s in specs})
    if unknown:
        raise ConfigError(f"--calibration-shapes names unknown input(s) {', '.join(unknown)}")
    arrays, left = {}, data_budget()
    shared = _synthetic_shared(specs, shapes or {})
    for spec in specs:
        shape = _synthetic_shape(spec, 1 if spec.name in shared else n_samples, dims or {}, shapes or {})
        nbytes = math.prod(shape) * spec.dtype.itemsize
        if nbytes > left:
            raise ConfigError(
                f"input {spec.name!r}: synthetic data of shape {shape} needs {nbytes / 2**30:.3g} GiB, over the "
                "data memory budget; give smaller sizes with --calibration-shapes"
            )
        left -= nbytes
        arrays[spec.name] = _draw(spec, shape, rng)
    return Dataset(arrays, "random", shared)


def _draw(spec: InputSpec, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    _refuse_unfeedable(spec)
    if _kind(spec.dtype) not in "fib":
        raise ConfigError(f"input {spec.name!r} is a {spec.dtype} tensor: synthetic data cannot fill it; give samples")
    if _is_float(spec.dtype):
        return np.asarray(rng.standard_normal(shape).astype(spec.dtype))
    return np.asarray(rng.integers(0, 2, size=shape).astype(spec.dtype))


def run_size(dataset: Dataset, model: onnx.ModelProto, batch_size: int) -> int:
    """Samples per onnxruntime run of ``model`` on ``dataset``: a fixed batch, 1 with per-sample scalars, else
    ``batch_size`` (see the module docstring)."""
    return _run_size(dataset, [s for s in input_specs(model) if s.name in dataset.arrays], batch_size)


def per_sample_scalars(dataset: Dataset, model: onnx.ModelProto) -> frozenset[str]:
    """The rank-0 inputs given one value per sample: each run holds one sample and feeds it as a 0-d array."""
    return frozenset(s.name for s in input_specs(model) if s.shape == () and not dataset.is_shared(s.name))


def batches(dataset: Dataset, model: onnx.ModelProto, batch_size: int = 32) -> Iterator[dict[str, np.ndarray]]:
    """Feed dicts for onnxruntime, one per run (see the module docstring for what a sample is)."""
    step = run_size(dataset, model, batch_size)
    scalars = per_sample_scalars(dataset, model)
    for start in range(0, dataset.n_samples, step):
        feed = {}
        for name, value in dataset.arrays.items():
            if dataset.is_shared(name):
                feed[name] = value
            elif name in scalars:
                feed[name] = value[start, ...]
            else:
                feed[name] = dataset.feed(name, value[start : start + step])
        yield feed


def check_synthetic(model: onnx.ModelProto, dataset: Dataset, fix: str) -> None:
    """Synthetic inputs guess 32 for symbolic dims past the batch axis; when onnxruntime refuses the guess
    (a symbolic channel dim), say which dims were guessed and how to fix it, in one line.

    Costs one session of the model, and only when such a dim was guessed.
    """
    guessed = [
        f"{s.name!r} axis {axis} ({dim or '?'})"
        for s in input_specs(model)
        if s.shape and dataset.arrays[s.name].ndim == len(s.shape)
        for axis, dim in enumerate(s.shape)
        if axis > 0 and not isinstance(dim, int) and dataset.arrays[s.name].shape[axis] == 32
    ]
    if not guessed:
        return
    try:
        sess = session(serialized(model))
    except Exception:
        return
    try:
        sess.run(None, next(batches(dataset, model, batch_size=1)))
    except Exception as err:  # onnxruntime raises its own exception types, not a common base
        reason = " ".join(str(err).split())[:300]
        raise ConfigError(
            f"synthetic inputs guessed size 32 for the symbolic dim(s) {', '.join(guessed[:_LISTED])} and "
            f"onnxruntime refused them ({reason}); {fix}"
        ) from None


def run_session(sess: ort.InferenceSession, dataset: Dataset, model: onnx.ModelProto) -> list[np.ndarray]:
    """All outputs of an open session over the dataset, concatenated along the sample axis."""
    return run_feeds(sess, batches(dataset, model))
