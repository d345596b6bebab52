"""``compress()``: load -> select -> quantize -> encode -> save -> validate -> report, one direction only."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxpq.allocate import allocate_bits, probe_split
from onnxpq.bias import bias_targets, corrected_biases
from onnxpq.calibration import Dataset, RandomInputs, load_dataset, random_dataset
from onnxpq.config import CompressConfig
from onnxpq.encode import FOLD_LIMIT_BYTES, FOLD_LIMIT_KEY, METADATA_CONFIG, METADATA_VERSION, encode_weights
from onnxpq.errors import ConfigError, InputModelError, UnsupportedGraphError, ValidationFailedError
from onnxpq.finetune import finetune
from onnxpq.graph import check_output_path, load_model, materialized, save_model, subgraph_initializer_count
from onnxpq.parallel import Workers
from onnxpq.permute import consumer_distortion, permute_model
from onnxpq.quantize import LayerResult, quantize_sequential, quantize_weights
from onnxpq.report import layer_rows, pqf_sizes, sha256_file, versions, write_json
from onnxpq.selection import Candidate, find_candidates
from onnxpq.stats import collect_stats
from onnxpq.validate import check_gate, default_metric, file_bytes, validate_compressed
from onnxpq.version import __version__

__all__ = [
    "CompressResult",
    "ValidationSettings",
    "calibration_dataset",
    "compress",
    "prepare_validation",
    "run_validation",
    "validation_dataset",
]

SYNTHETIC_SAMPLES = 8


@dataclass(frozen=True, kw_only=True)
class ValidationSettings:
    """How to check the compressed model; separate from ``CompressConfig`` because it never changes the bytes.

    Parameters
    ----------
    enabled : run the validation at all.
    data : path or reader of samples; None means synthetic inputs (with a warning).
    labels : class labels aligned with ``data`` for accuracy (first logits output).
    max_samples : use at most this many samples.
    metric, max_degradation : the accuracy gate; no gate when ``max_degradation`` is None.
    measure : also measure load time, peak RSS and latency in fresh processes.
    """

    enabled: bool = True
    data: str | os.PathLike[str] | Any | None = None
    labels: str | os.PathLike[str] | np.ndarray | None = None
    max_samples: int | None = None
    metric: str | None = None
    max_degradation: float | None = None
    measure: bool = True


@dataclass(frozen=True)
class CompressResult:
    """What a run produced: files written and the report (also saved as JSON)."""

    output_paths: list[Path]
    report_path: Path
    report: dict[str, Any]


def _refuse_recompress(model: onnx.ModelProto, path: Path) -> None:
    if any(p.key == METADATA_VERSION for p in model.metadata_props):
        raise InputModelError(f"{path}: already compressed by onnxpq; compress the original model instead")


#: Operators of models that are already quantized: their integer weights are left exactly as they are.
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "QGemm",
        "ConvInteger",
        "MatMulInteger",
        "DynamicQuantizeMatMul",
        "MatMulNBits",
        "MatMulIntegerToFloat",
        "GatherBlockQuantized",
    }
)


def _selection_notes(model: onnx.ModelProto, candidates: list[Candidate]) -> list[str]:
    """Say when the input is already quantized, and when nothing at all will be compressed."""
    notes = []
    found = sorted({n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS})
    if found:
        notes.append(
            f"the model is already quantized ({', '.join(found)}): its integer weights are left as they are; "
            "compress the float model instead for the full gain"
        )
    if not any(c.compressed for c in candidates):
        notes.append("no weight was compressed: every candidate was skipped (see skip_reason in the layer table)")
    return notes


def _fold_warnings(candidates: list[Candidate]) -> list[str]:
    out = []
    for c in candidates:
        nbytes = c.size * onnx.helper.tensor_dtype_to_np_dtype(c.dtype).itemsize
        if c.compressed and nbytes > FOLD_LIMIT_BYTES:
            out.append(
                f"decoded weight {c.name!r} is {nbytes / 2**30:.2f} GiB: onnxruntime >= 1.27 does not fold outputs "
                f"over 1 GiB by default, so it would decode on every run; raise the limit with "
                f"SessionOptions.add_session_config_entry('{FOLD_LIMIT_KEY}', '{nbytes}') or exclude the node"
            )
    return out


def _save_checked(compressed: onnx.ModelProto, original: onnx.ModelProto, target: Path, notes: list[str]) -> list[Path]:
    """Save with ``onnx.checker`` (full_check); tolerate only failures the input model already had."""
    try:
        return save_model(compressed, target, check=True)
    except onnx.checker.ValidationError as err:
        try:
            # In memory with its data: the checker rejects the absolute data locations load_model sets.
            onnx.checker.check_model(materialized(original), full_check=True)
        except onnx.checker.ValidationError as input_err:
            notes.append(f"the input model does not pass onnx.checker either, so neither does the output: {input_err}")
            return save_model(compressed, target, check=False)
        raise UnsupportedGraphError(f"the compressed model fails onnx.checker ({err}); nothing was written") from None


def calibration_dataset(model: onnx.ModelProto, source: Any, config: CompressConfig) -> Dataset | None:
    """The samples whose layer inputs steer the quantizer; synthetic only when the user asks for ``random``."""
    if source is None:
        return None
    if isinstance(source, RandomInputs) or (isinstance(source, str) and source == "random"):
        shapes = source.shapes if isinstance(source, RandomInputs) else None
        return random_dataset(model, SYNTHETIC_SAMPLES, np.random.default_rng(config.seed), shapes=shapes)
    return load_dataset(source, model, max_samples=config.calibration_samples)


def validation_dataset(model: onnx.ModelProto, settings: ValidationSettings, seed: int) -> Dataset:
    """The user's samples (already loaded, or to load), or synthetic ones from the declared input shapes."""
    if isinstance(settings.data, Dataset):
        return settings.data.head(settings.max_samples) if settings.max_samples else settings.data
    if settings.data is None or settings.data == "random":
        return random_dataset(model, settings.max_samples or SYNTHETIC_SAMPLES, np.random.default_rng(seed))
    return load_dataset(settings.data, model, max_samples=settings.max_samples)


def _load_labels(
    labels: str | os.PathLike[str] | np.ndarray | None,
    n_samples: int,
    *,
    limit: int | None = None,
    of: str = "calibration",
) -> np.ndarray | None:
    """Class labels from an array or ``.npy``, cut to ``limit`` and checked against the sample count."""
    if labels is None:
        return None
    if not isinstance(labels, np.ndarray):
        path = Path(labels)
        if not path.is_file():
            raise ConfigError(f"{path}: labels file not found")
        labels = np.load(path, allow_pickle=False)
    labels = np.asarray(labels)
    if limit is not None:
        labels = labels[:limit]
    if len(labels) != n_samples:
        raise ConfigError(f"{len(labels)} labels for {n_samples} {of} samples")
    return labels


def _finetune(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    calib: Dataset,
    config: CompressConfig,
    labels: np.ndarray | None,
    notes: list[str],
    progress: bool,
) -> tuple[onnx.ModelProto, dict[str, Any] | None]:
    """Distil, or keep the untuned model with a warning when the torch executor cannot run the graph."""
    if calib.source == "random":
        notes.append("fine-tuned on synthetic random inputs: the tuned model may fit noise, not your data")
    try:
        result = finetune(
            original, compressed, calib, config.finetune, seed=config.seed, labels=labels, progress=progress
        )
    except UnsupportedGraphError as err:
        notes.append(f"fine-tuning skipped, the model is saved untuned: {err}")
        return compressed, None
    return result.model, result.report


def prepare_validation(
    model: onnx.ModelProto, settings: ValidationSettings, seed: int
) -> tuple[Dataset, np.ndarray | None]:
    """Read and check the validation samples and labels, before any work, so bad data fails fast."""
    dataset = validation_dataset(model, settings, seed)
    return dataset, _load_labels(settings.labels, dataset.n_samples, limit=settings.max_samples, of="validation")


def run_validation(
    original: Path, compressed: Path, data: tuple[Dataset, np.ndarray | None], settings: ValidationSettings
) -> tuple[dict[str, Any], list[str]]:
    """Validation section and warnings; the gate result is recorded, not raised, so the report is complete."""
    dataset, labels = data
    notes = []
    if dataset.source == "random":
        notes.append(
            "validated on synthetic random inputs: pass --calibration-data or --validation-data for "
            "real samples; the numbers say little about accuracy"
        )
    section = validate_compressed(original, compressed, dataset, labels=labels, measure=settings.measure)
    for out in section["outputs"]:
        if out["nonfinite_original"]:
            notes.append(
                f"the original model outputs NaN or Inf in {out['nonfinite_original']} value(s) of {out['name']!r} "
                "on these samples; the metrics compare the finite values"
            )
        if out["nonfinite_mismatch"]:
            notes.append(
                f"output {out['name']!r}: {out['nonfinite_mismatch']} value(s) are NaN/Inf in one model and "
                "finite in the other"
            )
    if not section["decode_folded"]:
        notes.append(
            f"onnxruntime did not fold {len(section['unfolded_nodes'])} decode node(s): they will run "
            "on every inference"
        )
    if settings.max_degradation is not None:
        metric = settings.metric or default_metric(section["outputs"])
        section["gate"] = {
            "metric": metric,
            "max_degradation": settings.max_degradation,
            "failure": check_gate(section["outputs"], metric, settings.max_degradation),
        }
    return section, notes


def _calibration_section(dataset: Dataset | None, quantized: _Quantized) -> dict[str, Any] | None:
    if dataset is None:
        return None
    return {
        "source": dataset.source,
        "samples": dataset.n_samples,
        "samples_fitted": quantized.fitted_samples,
        "sha256": dataset.sha256(),
        "layers_with_statistics": len(quantized.stats),
    }


@dataclass(frozen=True)
class _Quantized:
    """What the quantization stage learned, for encoding and the report."""

    candidates: list[Candidate]
    results: dict[str, LayerResult]
    biases: dict[str, np.ndarray]
    stats: dict[str, Any]
    allocation: dict[str, Any] | None
    fitted_samples: int | None


def _quantize(
    model: onnx.ModelProto,
    candidates: list[Candidate],
    config: CompressConfig,
    calib: Dataset | None,
    progress: bool,
    workers: Workers,
) -> _Quantized:
    """Statistics -> per-layer quantization (or bit allocation) -> bias correction.

    When allocating, the samples the allocator measures on are kept out of the statistics (see ``probe_split``).
    """
    probe, fit = probe_split(calib) if config.has_budget and calib is not None else (calib, calib)
    stats = collect_stats(model, candidates, fit, progress=progress) if fit is not None else {}
    targets = bias_targets(model, candidates) if config.bias_correction and stats else {}
    allocation = None
    if config.has_budget:
        found = allocate_bits(
            model, candidates, config, stats=stats, calibration=probe, targets=targets, progress=progress
        )
        candidates = found.candidates
        allocation = {"budget_bits": found.budget_bits, "output_error": found.output_error}
        targets = {n: t for n, t in targets.items() if any(c.name == n and c.compressed for c in candidates)}
    if config.sequential and fit is not None:
        results = quantize_sequential(model, candidates, config, fit, targets, first_stats=stats, progress=progress)
    else:
        results = quantize_weights(
            model,
            candidates,
            config,
            stats=stats,
            bias_weights=frozenset(targets),
            progress=progress,
            workers=workers,
        )
    shifts = {n: r.shift for n, r in results.items() if r.shift is not None}
    fitted = fit.n_samples if fit is not None else None
    return _Quantized(candidates, results, corrected_biases(model, targets, shifts), stats, allocation, fitted)


def compress(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    config: CompressConfig | None = None,
    *,
    calibration: str | os.PathLike[str] | Any | None = None,
    calibration_labels: str | os.PathLike[str] | np.ndarray | None = None,
    validation: ValidationSettings | None = None,
    force: bool = False,
    report_path: str | os.PathLike[str] | None = None,
    progress: bool = False,
    workers: Workers | None = None,
) -> CompressResult:
    """Compress the ONNX model at ``input_path`` into ``output_path`` and report on it.

    ``calibration`` (a path, reader or iterable of feeds; ``"random"`` for
    synthetic inputs) makes the quantizer minimise each layer's output error on
    those samples; without it the quantization is data-free. With
    ``config.finetune`` the same samples distil the original into the compressed
    model (``calibration_labels`` add a cross-entropy term). Validation uses
    ``validation.data``, or the calibration samples when none is given.

    The input is never modified. The output (and its ``.report.json``) is
    written atomically. Raises ``ValidationFailedError`` after writing both when
    the accuracy gate fails, so the user can inspect what failed.

    ``workers`` runs the per-layer quantization and permutation search in local
    processes or on a Ray cluster; the output bytes are the same as a serial run's.
    """
    config = config or CompressConfig()
    validation = validation or ValidationSettings()
    workers = workers or Workers()
    source, target = Path(input_path), Path(output_path)
    check_output_path(source, target, force=force)
    model = load_model(source)
    _refuse_recompress(model, source)
    calib = calibration_dataset(model, calibration, config)
    if calib is None and (config.finetune is not None or calibration_labels is not None):
        raise ConfigError("fine-tuning and calibration labels need calibration samples: pass --calibration-data")
    # Labels for the whole file are fine: the samples may have been cut to --calibration-samples.
    tune_labels = (
        _load_labels(calibration_labels, calib.n_samples, limit=calib.n_samples) if calib is not None else None
    )
    if validation.data is None and calib is not None and calib.source != "random":
        # The samples already in memory: a reader or generator could not be read a second time anyway.
        validation = replace(validation, data=calib)
    data = prepare_validation(model, validation, config.seed) if validation.enabled else None
    candidates = find_candidates(model, config)
    permutation = None
    if config.permute:
        # Same names and shapes afterwards: the candidates stay valid, only the values move.
        unpermuted = model
        model, permutation = permute_model(
            model, candidates, iters=config.permute_iters, seed=config.seed, progress=progress, workers=workers
        )
        permutation["consumer_distortion"] = consumer_distortion(unpermuted, model, candidates, config)
    q = _quantize(model, candidates, config, calib, progress, workers)
    candidates = q.candidates
    metadata = {METADATA_VERSION: __version__, METADATA_CONFIG: config.to_json()}
    quantized = [r.quantized for r in q.results.values()]
    compressed = encode_weights(model, quantized, metadata=metadata, constants=q.biases)
    notes = _selection_notes(model, candidates) + _fold_warnings(candidates)
    tuned = None
    if config.finetune is not None:
        compressed, tuned = _finetune(model, compressed, calib, config, tune_labels, notes, progress)
    if calib is not None and calib.source == "random":
        notes.append("calibrated on synthetic random inputs (--calibration-data random): layer statistics are not real")
    if validation.enabled and validation.data is not None and validation.data is calib:
        notes.append("validated on the calibration samples: pass --validation-data for an unbiased measurement")
    written = _save_checked(compressed, model, target, notes)
    left = subgraph_initializer_count(model.graph)
    if left:
        notes.append(f"{left} weight(s) inside If/Loop/Scan subgraphs were left in float")
    original_bytes, compressed_bytes = file_bytes(source), file_bytes(target)
    report: dict[str, Any] = {
        "versions": versions(),
        "config": config.to_json(),
        "input": {"path": str(source), "sha256": sha256_file(source), "bytes": original_bytes},
        "output": {"path": str(target), "sha256": sha256_file(target), "bytes": compressed_bytes},
        "files": {
            "original_bytes": original_bytes,
            "compressed_bytes": compressed_bytes,
            "ratio": original_bytes / compressed_bytes,
        },
        "pqf": pqf_sizes(model, candidates),
        "calibration": _calibration_section(calib, q),
        "permutation": permutation,
        "bias_corrected": sorted(q.biases),
        "allocation": q.allocation,
        "finetune": tuned,
        "layers": layer_rows(candidates, {n: r.error for n, r in q.results.items()}),
        "subgraph_weights_left": left,
        "validation": None,
        "warnings": notes,
    }
    if data is not None:
        report["validation"], more = run_validation(source, target, data, validation)
        notes.extend(more)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    report_file = Path(report_path) if report_path else target.with_name(target.name + ".report.json")
    write_json(report, report_file)
    gate = (report["validation"] or {}).get("gate") or {}
    if gate.get("failure"):
        raise ValidationFailedError(f"{gate['failure']} (model and report kept: {target}, {report_file})")
    return CompressResult(written, report_file, report)
