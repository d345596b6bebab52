"""``compress()``: load -> select -> quantize -> encode -> save -> validate -> report, one direction only."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxpq.calibration import Dataset, RandomInputs, batches, check_synthetic, load_dataset, random_dataset
from onnxpq.config import AUTO, SYNTHETIC_SAMPLES, CompressConfig
from onnxpq.encode import (
    FOLD_LIMIT_BYTES,
    FOLD_LIMIT_KEY,
    METADATA_CONFIG,
    METADATA_VERSION,
    encode_weights,
    row_reshapes,
)
from onnxpq.errors import (
    ConfigError,
    InputModelError,
    OutputPathError,
    UnsupportedGraphError,
    ValidationFailedError,
)
from onnxpq.heap import trim_heap
from onnxpq.model.files import (
    IN_MEMORY,
    Staging,
    check_distinct,
    check_input_path,
    check_output_path,
    checked_model,
    data_file_path,
    external_data_files,
    load_model,
    materialized,
    name_fits,
    serialized,
    stage_model,
    staging,
)
from onnxpq.model.graph import check_conv_channels, constant_tensors, replace_constants
from onnxpq.model.session import session
from onnxpq.model.subgraphs import lift_subgraph_weights, subgraph_weight_count
from onnxpq.parallel import Workers
from onnxpq.permute.search import consumer_distortion, permute_model
from onnxpq.quantize.allocate import (
    Allocation,
    allocate,
    budget_bits,
    budget_candidates,
    fixed_layout_budget,
    price_settings,
    probe_split,
)
from onnxpq.quantize.bias import BiasTarget, bias_targets, result_biases
from onnxpq.quantize.layer import LayerResult
from onnxpq.quantize.selection import Candidate, pattern_counts, with_uses_in
from onnxpq.quantize.size import MIB, float_parameters, pqf_sizes
from onnxpq.quantize.stats import LAYER_SHARE, collect_stats, inline_taken
from onnxpq.quantize.weights import quantize_sequential, quantize_weights
from onnxpq.report import DATA_FREE_NOTE, Report, Stopwatch, layer_rows, sha256_file, versions, write_json
from onnxpq.search import Search, Try, search_allocation
from onnxpq.validate import Gate, check_gate, default_metric, file_bytes, same_fusions, validate_compressed
from onnxpq.version import __version__

#: Where a run logs what it does as it goes (a budget search's tries); the CLI prints it.
LOG = logging.getLogger("onnxpq")

__all__ = [
    "CompressResult",
    "ValidationSettings",
    "calibration_dataset",
    "compress",
    "prepare_validation",
    "run_validation",
    "validation_dataset",
]


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

    def __post_init__(self) -> None:
        if self.max_degradation is not None and not (math.isfinite(self.max_degradation) and self.max_degradation >= 0):
            raise ConfigError(f"max_degradation={self.max_degradation} must be a finite number >= 0")
        if self.enabled and self.metric == "accuracy" and self.labels is None:
            raise ConfigError("--metric accuracy needs --labels (class labels aligned with the validation data)")


@dataclass(frozen=True)
class CompressResult:
    """What a run produced: the compressed model, the files written (none in memory) and the report (also saved
    as JSON when the model was written to a file)."""

    output_paths: list[Path]
    report_path: Path | None
    report: dict[str, Any]
    model: onnx.ModelProto


def _refuse_recompress(model: onnx.ModelProto, path: Path | str) -> None:
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


def _unexercised_notes(allocation: dict[str, Any] | None) -> list[str]:
    """Name the layers the calibration samples never exercised: their size was not chosen from data."""
    names = (allocation or {}).get("unexercised") or []
    if not names:
        return []
    shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return [
        f"{len(names)} layer(s) never moved the outputs on the calibration samples ({shown}): an If branch "
        "that did not run, or an input that is always zero (a recurrent state?); they keep the default "
        "setting (or, where those defaults alone would break the size budget, one priced like a typical layer's) "
        "instead of one priced by the data. Calibrate with inputs that exercise them"
    ]


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


def _save_checked(
    compressed: onnx.ModelProto, original: onnx.ModelProto, stage: Staging, target: Path, notes: list[str]
) -> list[Path]:
    """Stage with ``onnx.checker`` (full_check); tolerate only failures the input model already had."""
    try:
        return stage_model(compressed, stage, target, check=True)
    except onnx.checker.ValidationError as err:
        _tolerate_checker_failure(original, err, notes)
        return stage_model(compressed, stage, target, check=False)


def _tolerate_checker_failure(original: onnx.ModelProto, err: onnx.checker.ValidationError, notes: list[str]) -> None:
    """A compressed model that fails ``onnx.checker`` is refused unless the input fails it too (then noted)."""
    try:
        # In memory with its data: the checker rejects the absolute data locations load_model sets.
        onnx.checker.check_model(materialized(original), full_check=True)
    except onnx.checker.ValidationError as input_err:
        notes.append(f"the input model does not pass onnx.checker either, so neither does the output: {input_err}")
        return
    raise UnsupportedGraphError(f"the compressed model fails onnx.checker ({err}); nothing was written") from None


def default_report_path(target: Path) -> Path:
    """``OUT.report.json`` beside the model."""
    return target.with_name(target.name + ".report.json")


def check_paths(
    source: Path | None,
    model: onnx.ModelProto,
    target: Path,
    report: Path,
    *,
    force: bool,
    data: Sequence[Any] = (),
) -> None:
    """Refuse, before any work, every output path that would destroy a file or could not be written.

    None of the model, its data file (written past 2 GB) and the report may be the
    input or one of its external data files, under any spelling, nor each other, nor
    one of the ``data`` files (calibration and validation samples, labels; even with ``--force``). ``source``
    None: the input model is in memory.
    """
    protected = {**(input_files(source, model) if source is not None else {}), **data_files(data)}
    data = data_file_path(target)
    check_output_path(target, protected=protected, force=force)
    check_output_path(report, protected=protected, force=force, what="report")
    if name_fits(data):  # else it cannot exist; a model that needs one fails to write, leaving nothing
        # Whether it is written is known only when saving: an existing one is refused then, without --force.
        check_output_path(data, protected=protected, force=True, what="output's data file")
    check_distinct({"output": target, "output's data file": data, "report": report})


def data_files(sources: Sequence[Any]) -> dict[Path, str]:
    """The sample and label files among ``sources`` (paths; readers, arrays and ``random`` are not files)."""
    paths = [Path(s) for s in sources if isinstance(s, (str, os.PathLike)) and s != "random"]
    return dict.fromkeys((p for p in paths if p.exists()), "a data or labels file")


def input_files(source: Path, model: onnx.ModelProto) -> dict[Path, str]:
    """The files of an input model no output may replace, each with how an error names it."""
    return {source: "the input model", **dict.fromkeys(external_data_files(model), "the input's external data file")}


def check_runtime_loads(path: Path | None, model: onnx.ModelProto | None = None, data: Dataset | None = None) -> None:
    """Refuse a model onnxruntime cannot load: its output could be neither validated nor checked.
    With ``data`` (the validation samples), also run the first sample through it.

    This runs before quantizing, so a custom-domain operator, a cycle, an IR version
    onnxruntime does not know or a channel count that does not match costs seconds, not a
    whole run. ``path`` None: the in-memory ``model``.
    """
    label = path if path is not None else IN_MEMORY
    try:
        sess = session(path if path is not None else serialized(model))
    except Exception as err:  # onnxruntime raises its own exception types, not a common base
        raise InputModelError(f"{label}: onnxruntime cannot load this model: {_one_line(err)}") from None
    if model is None:
        return
    check_conv_channels(model, Path(label))
    if data is None:
        return
    try:
        sess.run(None, next(batches(data, model, batch_size=1)))
    except Exception as err:  # as above
        raise InputModelError(
            f"{label}: onnxruntime cannot run this model on the validation samples: {_one_line(err)}"
        ) from None


def _check_output_loads(staged: Path | bytes) -> None:
    """The compressed model must load in onnxruntime before it is published: the original did."""
    try:
        session(staged)
    except Exception as err:  # onnxruntime raises its own exception types, not a common base
        raise UnsupportedGraphError(
            f"onnxruntime loads the input but not the compressed model, an onnxpq bug (please report it); "
            f"nothing was written: {_one_line(err)}"
        ) from None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def calibration_dataset(model: onnx.ModelProto, source: Any, config: CompressConfig) -> Dataset | None:
    """The samples whose layer inputs steer the quantizer; synthetic only when the user asks for ``random``."""
    if source is None:
        return None
    if isinstance(source, RandomInputs) or (isinstance(source, str) and source == "random"):
        shapes = source.shapes if isinstance(source, RandomInputs) else None
        rng = np.random.default_rng(config.seed)
        dataset = random_dataset(model, config.synthetic_samples, rng, shapes=shapes)
        check_synthetic(model, dataset, "give the real sizes with --calibration-shapes NAME:DxD...")
        return dataset
    return load_dataset(source, model, max_samples=config.calibration_samples)


def validation_dataset(model: onnx.ModelProto, settings: ValidationSettings, seed: int) -> Dataset:
    """The user's samples (already loaded, or to load), or synthetic ones from the declared input shapes."""
    if settings.max_samples is not None and settings.max_samples < 1:
        raise ConfigError(f"--max-samples {settings.max_samples}: give at least 1 sample")
    if isinstance(settings.data, Dataset):
        return settings.data.head(settings.max_samples) if settings.max_samples else settings.data
    if settings.data is None or isinstance(settings.data, RandomInputs) or settings.data == "random":
        shapes = settings.data.shapes if isinstance(settings.data, RandomInputs) else None
        rng = np.random.default_rng(seed)
        dataset = random_dataset(model, settings.max_samples or SYNTHETIC_SAMPLES, rng, shapes=shapes)
        check_synthetic(
            model, dataset, "pass --validation-data (or --no-validate), or --calibration-shapes with random"
        )
        return dataset
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
        try:
            labels = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise ConfigError(f"{path}: not a readable .npy of labels: {err}") from None
    labels = _class_labels(np.asarray(labels))
    if limit is not None:
        labels = labels[:limit]
    if len(labels) != n_samples:
        raise ConfigError(f"{len(labels)} labels for {n_samples} {of} samples")
    return labels


def _class_labels(labels: np.ndarray) -> np.ndarray:
    """Integer class indices, one row per sample; (n, 1), as many tools save (n,) labels, is squeezed."""
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim == 0:
        raise ConfigError("labels are a single number; expected one class index per sample, shape (n,)")
    if np.issubdtype(labels.dtype, np.integer):
        return labels
    if np.issubdtype(labels.dtype, np.floating) and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
        return labels.astype(np.int64)
    raise ConfigError(f"labels are {labels.dtype}; expected integer class indices")


def _finetune(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    calib: Dataset,
    config: CompressConfig,
    labels: np.ndarray | None,
    notes: list[str],
    progress: bool,
) -> tuple[onnx.ModelProto, dict[str, Any] | None]:
    """Distil, or keep the untuned model with a warning when the torch executor cannot run the graph.

    The executor runs no ``If``: both models are tuned with the branches every calibration sample takes
    inlined (``stats.inline_taken``), and the tuned values are written into the model that keeps them all.
    """
    # Imported here: torch costs seconds to import, and every --jobs worker process imports this module.
    from onnxpq.finetune.training import finetune

    if calib.source == "random":
        notes.append("fine-tuned on synthetic random inputs: the tuned model may fit noise, not your data")
    teacher, student = inline_taken(original, calib)[0], inline_taken(compressed, calib)[0]
    # Only what the written model holds in its main graph can be written back (codebooks, lifted weights).
    tunable = set(constant_tensors(compressed.graph))
    try:
        settings = {"seed": config.seed, "labels": labels, "progress": progress, "tunable": tunable}
        result = finetune(teacher, student, calib, config.finetune, **settings)
    except UnsupportedGraphError as err:
        notes.append(f"fine-tuning skipped, the model is saved untuned: {err}")
        return compressed, None
    if student is compressed:
        return result.model, result.report
    tuned = onnx.ModelProto()
    tuned.CopyFrom(compressed)
    replace_constants(tuned.graph, result.constants)
    return tuned, result.report


def prepare_validation(
    model: onnx.ModelProto, settings: ValidationSettings, seed: int
) -> tuple[Dataset, np.ndarray | None]:
    """Read and check the validation samples and labels, before any work, so bad data fails fast."""
    dataset = validation_dataset(model, settings, seed)
    return dataset, _load_labels(settings.labels, dataset.n_samples, limit=settings.max_samples, of="validation")


def run_validation(
    original: Path,
    compressed: Path,
    data: tuple[Dataset, np.ndarray | None],
    settings: ValidationSettings,
    reference: onnx.ModelProto | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Validation section and warnings; the gate result is recorded, not raised, so the report is complete.
    ``reference``: the original model, when it is already in memory (``validate_compressed``)."""
    dataset, labels = data
    notes = []
    if dataset.source == "random":
        notes.append(
            "validated on synthetic random inputs: pass --calibration-data or --validation-data for "
            "real samples; the numbers say little about accuracy"
        )
    section = validate_compressed(
        original, compressed, dataset, labels=labels, measure=settings.measure, reference=reference
    )
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
        "layers_with_statistics": quantized.layers_with_statistics,
        "branches": quantized.branches,
    }


@dataclass(frozen=True)
class _Quantized:
    """What the quantization stage learned, for encoding and the report."""

    candidates: list[Candidate]
    results: dict[str, LayerResult]
    biases: dict[str, np.ndarray]
    #: How many layers had input statistics. The statistics themselves (on a 108 M-parameter BERT, half a
    #: gigabyte) are let go once the layers are quantized: encoding and validation do not read them.
    layers_with_statistics: int
    allocation: dict[str, Any] | None
    fitted_samples: int | None
    branches: dict[str, str]
    search: Search | None


#: A layer task's working set in units of the largest weight: its settings' codes and decoded copies.
TASK_WEIGHT_COPIES = 24
#: ... and in units of the largest layer's statistics: H, its covariance, the damped metric and its factor.
TASK_STATISTICS_COPIES = 4


def _workers(workers: Workers, candidates: Sequence[Candidate], config: CompressConfig) -> Workers:
    """``workers`` with ``jobs="auto"`` decided for this model: its compressible weights and the most one
    layer task can hold (its weight's copies and, with data, statistics up to their per-layer cap)."""
    todo = [c for c in candidates if c.compressed]
    largest = max((c.size * onnx.helper.tensor_dtype_to_np_dtype(c.dtype).itemsize for c in todo), default=0)
    statistics = config.statistics_memory_mib * 2**20 / LAYER_SHARE
    task = TASK_WEIGHT_COPIES * largest + TASK_STATISTICS_COPIES * statistics
    return workers.resolved(sum(c.size for c in todo), int(task))


def _quantize(
    model: onnx.ModelProto,
    candidates: list[Candidate],
    config: CompressConfig,
    calib: Dataset | None,
    progress: bool,
    workers: Workers,
    clock: Stopwatch,
    gate: Gate | None = None,
) -> _Quantized:
    """Statistics -> per-layer quantization (or bit allocation, or a budget search against ``gate``) -> bias
    correction.

    When allocating, the samples the allocator measures on are kept out of the statistics (see ``probe_split``).
    """
    probe, fit = probe_split(calib, config.probe_samples) if config.has_budget and calib is not None else (calib, calib)
    with clock.stage("statistics"):
        # Statistics run on the graph with the If branches the samples take inlined (their weights get data).
        seen, taken = inline_taken(model, fit) if fit is not None else (model, {})
        stats = (
            collect_stats(
                seen,
                with_uses_in(seen, candidates) if taken else candidates,
                fit,
                progress=progress,
                memory_mib=config.statistics_memory_mib,
                rows=config.statistics_rows,
            )
            if fit is not None
            else {}
        )
        trim_heap()  # the activation batches are freed; give them back before the workers start
    targets = bias_targets(model, candidates) if config.bias_correction and stats else {}
    quantize = _quantizer(model, (seen, taken), config, fit, stats, targets, progress, workers)
    allocation = search = None
    if config.has_budget:
        settings = {"stats": stats, "calibration": probe, "targets": targets, "progress": progress, "workers": workers}
        found, search = _allocated(model, candidates, config, settings, clock, gate, quantize)
        trim_heap()  # the estimates of every setting are gone; give their memory back before quantizing
        candidates = found.candidates
        allocation = {
            "budget_bits": found.budget_bits,
            "output_error": found.output_error,
            "unexercised": found.unexercised,
        }
    with clock.stage("quantization"):
        results = quantize(candidates)
    fitted = fit.n_samples if fit is not None else None
    biases = result_biases(model, targets, results)
    return _Quantized(candidates, results, biases, len(stats), allocation, fitted, taken, search)


def _allocated(
    model: onnx.ModelProto,
    candidates: list[Candidate],
    config: CompressConfig,
    settings: dict[str, Any],
    clock: Stopwatch,
    gate: Gate | None,
    quantize: Callable[[Sequence[Candidate]], dict[str, LayerResult]],
) -> tuple[Allocation, Search | None]:
    """The allocation for the budget (or, with a ``gate``, the budget search's winner) and the search.

    Every setting's estimate (its codes: on MiniLM about 9 bytes per weight over all settings) lives only
    here; the allocation keeps the chosen ones.
    """
    with clock.stage("allocation"):
        pricing = price_settings(model, candidates, config, **settings)
    if gate is not None:
        with clock.stage("search"):
            return search_allocation(model, pricing, config, gate, quantize, settings["targets"], _say(gate))
    budget = budget_bits(model, candidates, target_bpw=config.target_bpw, target_mib=config.target_mib)
    return allocate(model, pricing, config, budget), None


def _compressed_targets(targets: dict[str, BiasTarget], candidates: Sequence[Candidate]) -> dict[str, BiasTarget]:
    """The bias targets of the layers an allocation compresses: the others keep their bias."""
    compressed = {c.name for c in candidates if c.compressed}
    return {n: t for n, t in targets.items() if n in compressed}


def _quantizer(
    model: onnx.ModelProto,
    inlined: tuple[onnx.ModelProto, dict[str, str]],
    config: CompressConfig,
    fit: Dataset | None,
    stats: dict[str, Any],
    targets: dict[str, BiasTarget],
    progress: bool,
    workers: Workers,
) -> Callable[[Sequence[Candidate]], dict[str, LayerResult]]:
    """The real quantizer of a list of candidates (the chosen layouts).

    Per layer, each (weight, d, k) is quantized once however often it is asked for: a budget search asks for
    many allocations that share most of their settings. The sequential mode quantizes every layer on the
    model whose earlier layers are already quantized, so it reuses only whole allocations (the winner of a
    search is not quantized twice).
    """
    seen, taken = inlined
    done: dict[tuple[str, int, int], LayerResult] = {}
    sequential: dict[tuple, dict[str, LayerResult]] = {}

    def quantize(candidates: Sequence[Candidate]) -> dict[str, LayerResult]:
        targeted = _compressed_targets(targets, candidates)
        if config.sequential and fit is not None:
            key = tuple(_setting(c) for c in candidates if c.compressed)  # the whole allocation
            if key not in sequential:
                # On the graph the statistics saw, with these layouts.
                chosen = with_uses_in(seen, list(candidates)) if taken else list(candidates)
                settings = {"first_stats": stats, "progress": progress}
                sequential[key] = quantize_sequential(seen, chosen, config, fit, targeted, **settings)
            return sequential[key]
        todo = [c for c in candidates if c.compressed and _setting(c) not in done]
        settings = {"stats": stats, "bias_weights": frozenset(targets), "progress": progress, "workers": workers}
        new = quantize_weights(model, todo, config, **settings)
        done.update((_setting(c), new[c.name]) for c in todo)
        return {c.name: done[_setting(c)] for c in candidates if c.compressed}

    return quantize


def _setting(c: Candidate) -> tuple[str, int, int]:
    """What a layer's quantization depends on besides the run's fixed statistics and config."""
    return c.name, c.subvector_dim, c.n_codewords


def _say(gate: Gate) -> Callable[[Try], None]:
    """Log each try of a budget search as it ends (the CLI prints onnxpq's log at INFO)."""
    return lambda t: LOG.info(t.line(gate.metric, gate.max_degradation))


@dataclass
class _Run:
    """One compression as its stages fill it in: what the caller asked for, then what each stage learned.

    ``compress`` runs the stages in order (prepare, permute, quantize, encode, fine-tune, publish); each reads
    the fields the stages before it set. ``notes`` are the run's warnings, in the order they arose.
    """

    source: Path | None
    target: Path | None
    report_file: Path | None
    config: CompressConfig
    validation: ValidationSettings
    workers: Workers
    progress: bool
    clock: Stopwatch = field(default_factory=Stopwatch)
    notes: list[str] = field(default_factory=list)
    model: onnx.ModelProto = field(default_factory=onnx.ModelProto)
    calib: Dataset | None = None
    tune_labels: np.ndarray | None = None
    data: tuple[Dataset, np.ndarray | None] | None = None
    candidates: list[Candidate] = field(default_factory=list)
    permutation: dict[str, Any] | None = None
    quantized: _Quantized | None = None
    compressed: onnx.ModelProto = field(default_factory=onnx.ModelProto)
    tuned: dict[str, Any] | None = None


def compress(
    input_path: str | os.PathLike[str] | onnx.ModelProto,
    output_path: str | os.PathLike[str] | None = None,
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

    The input is never modified, and no output path may be the input or one
    of its external data files. Every path is checked and every option and data
    file read before any work; the output and its ``.report.json`` are built in
    a private staging folder, loaded once in onnxruntime, and moved into place
    only at the end, so a failure or a signal leaves nothing behind. Raises
    ``ValidationFailedError`` after publishing both when the accuracy gate
    fails, so the user can inspect what failed.

    ``workers`` runs the per-layer quantization and permutation search in local
    processes or on a Ray cluster; the output bytes are the same as a serial run's.
    """
    target = Path(output_path) if output_path is not None else None
    if target is None and report_path is not None:
        raise ConfigError("a report path needs an output path: in memory, the report is CompressResult.report")
    run = _Run(
        source=Path(input_path) if isinstance(input_path, (str, os.PathLike)) else None,
        target=target,
        report_file=Path(report_path) if report_path else default_report_path(target) if target else None,
        config=config or CompressConfig(),
        validation=validation or ValidationSettings(),
        workers=workers or Workers(),
        progress=progress,
    )
    _prepare(run, input_path if run.source is None else None, calibration, calibration_labels, force)
    for stage in (_permute, _quantize_stage, _encode, _tune, _data_notes):
        stage(run)
    return _publish(run, force) if run.target is not None else _in_memory(run)


def _prepare(run: _Run, given: onnx.ModelProto | None, calibration: Any, calibration_labels: Any, force: bool) -> None:
    """Check every path, option and data file before any work; load the model (or check the ``given`` one), its
    samples and its candidates."""
    if run.source is not None:
        check_input_path(run.source)
        model = load_model(run.source)
    else:
        model = checked_model(given)
    if run.target is not None and run.report_file is not None:
        data_sources = (calibration, calibration_labels, run.validation.data, run.validation.labels)
        check_paths(run.source, model, run.target, run.report_file, force=force, data=data_sources)
    _refuse_recompress(model, run.source or IN_MEMORY)
    calib = run.calib = calibration_dataset(model, calibration, run.config)
    if calib is None and (run.config.finetune is not None or calibration_labels is not None):
        raise ConfigError("fine-tuning and calibration labels need calibration samples: pass --calibration-data")
    # Labels for the whole file are fine: the samples may have been cut to --calibration-samples.
    if calib is not None:
        run.tune_labels = _load_labels(calibration_labels, calib.n_samples, limit=calib.n_samples)
    if run.validation.data is None and calib is not None and calib.source != "random":
        # The samples already in memory: a reader or generator could not be read a second time anyway.
        run.validation = replace(run.validation, data=calib)
    if run.validation.data is None and isinstance(calibration, RandomInputs):
        run.validation = replace(run.validation, data=calibration)  # the sizes the user gave, not guessed ones
    run.data = prepare_validation(model, run.validation, run.config.seed) if run.validation.enabled else None
    _check_search(run.config, calib, run.validation)
    check_runtime_loads(run.source, model, run.data[0] if run.data is not None else None)
    trim_heap()  # glibc kept a third of that session's memory (BERT-base: 350 MB) until told to give it back
    # If/Loop/Scan bodies read their weights from the main graph from here on (same function).
    run.model = lift_subgraph_weights(model)
    if calib is not None and run.config.auto_budget and not run.config.has_budget:
        run.config = fixed_layout_budget(run.model, run.config)
    run.candidates, run.config, widened = budget_candidates(run.model, run.config)
    if widened:
        run.notes.append(widened)
    run.workers = _workers(run.workers, run.candidates, run.config)
    run.clock.seconds["prepare"] = run.clock.section()["total"]


def _check_search(config: CompressConfig, calib: Dataset | None, validation: ValidationSettings) -> None:
    """A budget search needs what it searches with: samples to quantize with, and a gate to pass."""
    if not config.searches_budget:
        return
    flag = "--target-bpw auto" if config.target_bpw == AUTO else "--target-size auto"
    if calib is None:
        raise ConfigError(f"{flag} needs calibration samples (--calibration-data): it searches data-aware budgets")
    if not validation.enabled:
        raise ConfigError(f"{flag} judges each budget on the validation data: drop --no-validate")
    if validation.max_degradation is None:
        raise ConfigError(f"{flag} needs --max-degradation X: it finds the smallest budget within it")


def _permute(run: _Run) -> None:
    """PQF's P, when asked: the same names and shapes afterwards, so the candidates stay valid."""
    if not run.config.permute:
        return
    unpermuted, config = run.model, run.config
    with run.clock.stage("permutation"):
        run.model, run.permutation = permute_model(
            unpermuted, run.candidates, iters=config.permute_iters, seed=config.seed, progress=run.progress,
            workers=run.workers,
        )  # fmt: skip
        run.permutation["consumer_distortion"] = consumer_distortion(unpermuted, run.model, run.candidates, config)


def _original(run: _Run) -> Path | bytes:
    """The original model for a session: the input file when there is one, else the model's bytes.

    The file has the operators of ``run.model`` (permuting and lifting body weights move values, not nodes)
    and spares a serialized copy of every weight held through the session.
    """
    return run.source if run.source is not None else serialized(run.model)


def _quantize_stage(run: _Run) -> None:
    """PQF's Q: statistics, bit allocation (or the budget search) and the per-layer quantizer (``_quantize``)."""
    gate = None
    if run.config.searches_budget:
        assert run.data is not None and run.validation.max_degradation is not None
        gate = Gate(_original(run), run.model, run.data, run.validation.metric, run.validation.max_degradation)
    args = (run.model, run.candidates, run.config, run.calib, run.progress, run.workers, run.clock)
    run.quantized = _quantize(*args, gate=gate)
    trim_heap()  # the statistics are gone: give them back before encoding and validation
    run.candidates = run.quantized.candidates
    search = run.quantized.search
    if search is not None:
        run.config = _with_budget(run.model, run.config, search.best)
        if search.winner is None:
            run.notes.append(f"the budget search found no passing budget: {search.reason}; that model is kept")


def _with_budget(model: onnx.ModelProto, config: CompressConfig, bpw: float) -> CompressConfig:
    """``config`` with the budget a search found, in the unit the user asked in (what the output records)."""
    if config.target_mib == AUTO:
        return replace(config, target_mib=bpw * float_parameters(model) / 8 / MIB)
    return replace(config, target_bpw=bpw)


def _encode(run: _Run) -> None:
    """The Cast -> Gather decode chains, the corrected biases and the metadata; the selection's notes."""
    assert run.quantized is not None
    metadata = {METADATA_VERSION: __version__, METADATA_CONFIG: run.config.to_json()}
    quantized = [r.quantized for r in run.quantized.results.values()]
    with run.clock.stage("encode"):
        run.compressed = encode_weights(run.model, quantized, metadata=metadata, constants=run.quantized.biases)
        reshapes = row_reshapes(run.compressed.graph)
        if reshapes and not same_fusions(_original(run), serialized(run.compressed), reshapes):
            run.compressed = encode_weights(
                run.model, quantized, metadata=metadata, constants=run.quantized.biases, row_lookups=False
            )
        trim_heap()  # the fusion check's two sessions are gone
    run.notes += _selection_notes(run.model, run.candidates) + _fold_warnings(run.candidates)
    run.notes += _unexercised_notes(run.quantized.allocation)


def _tune(run: _Run) -> None:
    """PQF's F, when asked: distil the original into the compressed model on the calibration samples."""
    if run.config.finetune is None:
        return
    assert run.calib is not None
    with run.clock.stage("finetune"):
        run.compressed, run.tuned = _finetune(
            run.model, run.compressed, run.calib, run.config, run.tune_labels, run.notes, run.progress
        )


def _data_notes(run: _Run) -> None:
    """Warnings about the data the run had: synthetic, none, or the same samples for fitting and validating."""
    calib = run.calib
    if calib is not None and calib.source == "random":
        run.notes.append(
            "calibrated on synthetic random inputs (--calibration-data random): layer statistics are not real"
        )
    if calib is None and any(c.compressed for c in run.candidates):
        run.notes.append(DATA_FREE_NOTE)
    if run.validation.enabled and run.validation.data is not None and run.validation.data is calib:
        run.notes.append("validated on the calibration samples: pass --validation-data for an unbiased measurement")


def _sections(run: _Run) -> dict[str, Any]:
    """The report's sections on what the stages did."""
    assert run.quantized is not None
    q = run.quantized
    return {
        "pqf": pqf_sizes(run.model, run.candidates),
        "calibration": _calibration_section(run.calib, q),
        "permutation": run.permutation,
        "bias_corrected": sorted(q.biases),
        "allocation": q.allocation,
        "search": q.search.to_json() if q.search is not None else None,
        "finetune": run.tuned,
        "layers": layer_rows(run.candidates, {n: r.error for n, r in q.results.items()}),
        "selection": {"patterns": pattern_counts(run.model, run.config)},
    }


def _publish(run: _Run, force: bool) -> CompressResult:
    """Stage the model and its report, load the model in onnxruntime, validate it, and move both into place.

    Published last, after every check: a failed gate keeps both for inspection, as documented, and then
    raises ``ValidationFailedError`` carrying the report.
    """
    assert run.target is not None and run.report_file is not None
    original = _original(run)
    with staging() as stage:
        with run.clock.stage("save"):
            written = _save_checked(run.compressed, run.model, stage, run.target, run.notes)
            staged = stage.path(run.target)
            _check_output_loads(staged)
        report = _finished_report(run, original, staged, run.target)
        try:
            write_json(report.to_json(), stage.path(run.report_file))
        except OSError as err:
            raise OutputPathError(f"{run.report_file}: cannot write the report: {err.strerror or err}") from None
        stage.publish(force=force)
    if report.gate_failure:
        message = f"{report.gate_failure} (model and report kept: {run.target}, {run.report_file})"
        raise ValidationFailedError(message, report.to_json())
    return CompressResult(written, run.report_file, report.to_json(), run.compressed)


def _in_memory(run: _Run) -> CompressResult:
    """The compressed model returned, not written: checked by ``onnx.checker`` and loaded by onnxruntime from
    memory. Only validation touches the disk, and only a private temporary folder: onnxruntime's fold check and
    its load-time and memory measurements in fresh processes read model files. A failed gate raises
    ``ValidationFailedError`` whose report and ``model`` hold the result."""
    with run.clock.stage("save"):
        try:
            onnx.checker.check_model(run.compressed, full_check=True)
        except onnx.checker.ValidationError as err:
            _tolerate_checker_failure(run.model, err, run.notes)
        data = serialized(run.compressed)
        _check_output_loads(data)
    original = _original(run)
    report = _finished_report(run, original, data)
    if report.gate_failure:
        message = f"{report.gate_failure} (the compressed model is this error's .model)"
        raise ValidationFailedError(message, report.to_json(), run.compressed)
    return CompressResult([], None, report.to_json(), run.compressed)


def _finished_report(run: _Run, original: Path | bytes, output: Path | bytes, published: Path | None = None) -> Report:
    """The report of a checked output (``published``: where a staged file will be), validated when asked, with
    the run's warnings, each also issued as a Python warning, and its stage times."""
    left = subgraph_weight_count(run.model.graph)
    if left:
        run.notes.append(f"{left} weight(s) returned directly as If/Loop/Scan body outputs were left in float")
    report = _report(run.config, _file_info(original), _file_info(output, published), _sections(run), left)
    if run.data is not None:
        _validate(run, report, original, output)
    report.warnings, report.seconds = list(run.notes), run.clock.section()
    for note in run.notes:
        warnings.warn(note, stacklevel=4)  # at the caller of compress()
    return report


def _validate(run: _Run, report: Report, original: Path | bytes, compressed: Path | bytes) -> None:
    """The report's validation section and its warnings. onnxruntime's fold check and its load-time and memory
    measurements read model files, so a model held in memory is written to a private temporary folder for them."""
    assert run.data is not None
    with run.clock.stage("validation"), tempfile.TemporaryDirectory(prefix="onnxpq-") as folder:
        paths = [
            _as_file(m, Path(folder) / name) for m, name in ((original, "original.onnx"), (compressed, "out.onnx"))
        ]
        report.validation, more = run_validation(paths[0], paths[1], run.data, run.validation, run.model)
    run.notes.extend(more)


def _as_file(model: Path | bytes, path: Path) -> Path:
    """``model`` itself when it is a file, else its bytes written to ``path``."""
    if isinstance(model, Path):
        return model
    path.write_bytes(model)
    return path


def _file_info(model: Path | bytes, published: Path | None = None) -> dict[str, Any]:
    """The report's ``input``/``output`` entry of a model file (``published``: where a staged one will be), or of
    serialized bytes, which have no path."""
    if isinstance(model, bytes):
        return {"path": None, "sha256": hashlib.sha256(model).hexdigest(), "bytes": len(model)}
    return {"path": str(published or model), "sha256": sha256_file(model), "bytes": file_bytes(model)}


def _report(
    config: CompressConfig, source: dict[str, Any], output: dict[str, Any], sections: dict[str, Any], left: int
) -> Report:
    """The report of a run (``source``, ``output``: ``_file_info`` of both models); its ``validation``,
    ``warnings`` and ``seconds`` are filled in by ``_finished_report``."""
    files = {
        "original_bytes": source["bytes"],
        "compressed_bytes": output["bytes"],
        "ratio": source["bytes"] / output["bytes"],
    }
    return Report(
        versions=versions(),
        config=config.to_json(),
        input=source,
        output=output,
        files=files,
        **sections,
        subgraph_weights_left=left,
    )
