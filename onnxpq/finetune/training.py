"""Fine-tune a compressed model by distillation from the original: PQF's F step, without labels.

With the codes fixed, the codebooks, biases, normalisation parameters and the
layers left in float are trained so the compressed model reproduces the
original's outputs on the calibration samples. Each codeword's gradient is the
sum over the subvectors that use it (``index_select`` in the executor does
that). The teacher is the original model run by onnxruntime: on every training
batch when the inputs can be blended (``_Mixup``), else once, up front.

Rules, in order:

1. A slice of the calibration samples (``holdout``) is never trained on; the
   step with the lowest held-out loss (step 0, the untuned model, included) is
   the one exported, so tuning cannot make the held-out loss worse. What is
   evaluated and exported at a step is the moving average of the trained values
   (``_Average``), unless ``ema`` is 0.
2. Trained values are cast back to their ONNX types (fp16 codebooks rounded),
   and the held-out loss is measured again after rounding.
3. Only values change: the exported graph has the same nodes, names and size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxpq.calibration import Dataset, per_sample_scalars, run_session, run_size
from onnxpq.config import FinetuneConfig
from onnxpq.encode import layer_outputs
from onnxpq.errors import ConfigError, UnsupportedGraphError
from onnxpq.model.files import serialized
from onnxpq.model.graph import constant_tensors, readers, replace_constants
from onnxpq.model.session import session
from onnxpq.model.tensors import FLOAT_TYPES

try:  # The ``finetune`` extra; compression works without it.
    import torch
    import torch.nn.functional as F

    from onnxpq.finetune.codes import MovingCodes, decode_chains
    from onnxpq.finetune.executor import OnnxModule
except ImportError:  # pragma: no cover - exercised only without torch
    torch = None

__all__ = ["FinetuneResult", "finetune", "loss_kinds", "trainable_constants"]

#: Inputs of these ops that hold statistics, not parameters: re-estimated, never trained.
_STATISTICS = {"BatchNormalization": (3, 4)}
_PROBABILITY_OPS = {"Softmax"}
#: Largest relative difference between the torch executor and onnxruntime accepted before training.
_EXECUTOR_TOLERANCE = 1e-3
#: Share of the budget spent warming the learning rate up from zero (Adam's first steps are its largest).
_WARMUP = 0.05
#: Row sums within this of 1 (and no negatives) make an output a probability distribution.
_SUM_TOLERANCE = 1e-3
#: Steps between re-assignments of moving codes (``FinetuneConfig.codes``).
CODE_STEPS = 10


@dataclass(frozen=True)
class FinetuneResult:
    """The tuned model, the values it tuned or re-estimated by constant name, and what the tuning did."""

    model: onnx.ModelProto
    report: dict[str, Any]
    constants: dict[str, np.ndarray]


def _require_torch() -> None:
    if torch is None:
        raise ConfigError("fine-tuning needs torch: pip install 'onnxpq[finetune]' (CPU: torch==2.13.0)")


def trainable_constants(model: onnx.ModelProto) -> list[str]:
    """Float constants of two or more values that a node reads, except normalisation statistics.

    That covers codebooks, biases, norm scales and shifts, per-channel constants
    and the weights left in float. Scalars (epsilons, the 6 of a ReLU6) stay fixed.
    """
    graph = model.graph
    consumers = readers(graph)
    statistics = {
        node.input[i] for node in graph.node for i in _STATISTICS.get(node.op_type, ()) if i < len(node.input)
    }
    return sorted(
        name
        for name, const in constant_tensors(graph).items()
        if const.tensor.data_type in FLOAT_TYPES
        and math.prod(const.tensor.dims) >= 2
        and name in consumers
        and name not in statistics
    )


def _is_distribution(model: onnx.ModelProto, name: str, teacher: np.ndarray) -> bool:
    producer = next((n for n in model.graph.node if name in n.output), None)
    if producer is not None and producer.op_type in _PROBABILITY_OPS:
        return True
    sums = teacher.sum(axis=-1)
    return teacher.ndim >= 2 and bool(teacher.min() >= 0) and bool(np.all(np.abs(sums - 1) < _SUM_TOLERANCE))


def _is_unit_norm(teacher: np.ndarray) -> bool:
    if teacher.ndim < 2 or teacher.shape[-1] < 2:
        return False
    norms = np.linalg.norm(teacher.reshape(-1, teacher.shape[-1]), axis=-1)
    return bool(np.all(np.abs(norms - 1) < _SUM_TOLERANCE))


def loss_kinds(
    model: onnx.ModelProto, teacher: Sequence[np.ndarray], choice: str = "auto", samples: int | None = None
) -> list[str | None]:
    """Per graph output: ``kl-probs``, ``kl-logits``, ``cosine``, ``mse`` or None (ignored: not float, or,
    given the number of ``samples``, without one row per sample on its first axis, as Silero VAD's next
    state [2, batch, 128], whose rows the loss could not pair with the samples).

    ``auto`` reads the output: a Softmax (or rows of non-negative values summing
    to 1) is a distribution; unit-norm rows are an embedding; a [samples, classes]
    float output is logits; anything else (feature maps, boxes) gets the MSE.
    """
    kinds: list[str | None] = []
    for out, values in zip(model.graph.output, teacher, strict=True):
        floating = np.issubdtype(values.dtype, np.floating)
        distribution = floating and _is_distribution(model, out.name, values)
        if not floating or (samples is not None and (values.ndim == 0 or len(values) != samples)):
            kinds.append(None)
        elif choice == "kl" or (choice == "auto" and distribution):
            kinds.append("kl-probs" if distribution else "kl-logits")
        elif choice == "cosine" or (choice == "auto" and _is_unit_norm(values)):
            kinds.append("cosine")
        elif choice == "auto" and values.ndim == 2 and values.shape[-1] > 1:
            kinds.append("kl-logits")
        else:
            kinds.append("mse")
    if not any(kinds):
        raise UnsupportedGraphError(
            "no floating-point output with one row per sample to distil: fine-tuning has nothing to match"
        )
    return kinds


def _term(kind: str, student: torch.Tensor, teacher: torch.Tensor, scale: float) -> torch.Tensor:
    """One output's distillation loss, normalised so each output counts about equally."""
    if kind == "kl-probs":
        log_s = torch.log(student.clamp_min(1e-12))
        return (teacher * (torch.log(teacher.clamp_min(1e-12)) - log_s)).sum(-1).mean()
    if kind == "kl-logits":
        return (
            F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="none")
            .sum(-1)
            .mean()
        )
    if kind == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    return (student - teacher).square().mean() / scale


def _per_sample(weight: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``weight`` (one value per sample) shaped to broadcast over ``like``'s trailing axes."""
    return weight.reshape(-1, *[1] * (like.dim() - 1)).to(like.device, like.dtype)


def _label_term(kind: str, student: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample negative log-likelihood of the labels (shape of ``labels``)."""
    log_p = torch.log(student.clamp_min(1e-12)) if kind == "kl-probs" else F.log_softmax(student, -1)
    nll = F.nll_loss(log_p.reshape(-1, log_p.shape[-1]), labels.reshape(-1), reduction="none")
    return nll.reshape(labels.shape)


@dataclass(frozen=True)
class _Batch:
    """What one forward pass trains on: the inputs, the teacher's outputs for them, and labels.

    ``labels`` pairs class indices with their per-sample weights: one pair for
    plain samples, two (weights lambda and 1 - lambda) for a mixup blend.
    """

    feeds: dict[str, torch.Tensor]
    teacher: list[torch.Tensor | None]
    labels: list[tuple[torch.Tensor, torch.Tensor]] | None


@dataclass(frozen=True)
class _Targets:
    """Teacher outputs (cached, one per calibration sample) and labels, with the loss kind and scale per output."""

    outputs: list[torch.Tensor | None]
    kinds: list[str | None]
    scales: list[float]
    labels: torch.Tensor | None

    def teacher_at(self, index: torch.Tensor) -> list[torch.Tensor | None]:
        return [t[index] if t is not None else None for t in self.outputs]

    def labels_at(self, index: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        return None if self.labels is None else [(self.labels[index], torch.ones(len(index)))]

    def loss(self, student: Sequence[torch.Tensor], batch: _Batch) -> torch.Tensor:
        total = torch.zeros((), device=student[0].device)
        for s, t, kind, scale in zip(student, batch.teacher, self.kinds, self.scales, strict=True):
            if kind is not None:
                total = total + _term(kind, s.float(), t.to(s.device), scale)
        if batch.labels is not None:
            first = next(i for i, k in enumerate(self.kinds) if k in ("kl-probs", "kl-logits"))
            for labels, weight in batch.labels:
                nll = _label_term(self.kinds[first], student[first].float(), labels.to(student[0].device))
                total = total + (nll * _per_sample(weight, nll)).mean()
        return total


def _teacher_tensors(outputs: Sequence[np.ndarray], kinds: Sequence[str | None]) -> list[torch.Tensor | None]:
    """The teacher's outputs as float32 tensors; None for the outputs the loss ignores."""
    return [torch.from_numpy(np.asarray(o)).float() if k else None for o, k in zip(outputs, kinds, strict=True)]


def _targets(
    model: onnx.ModelProto,
    teacher: list[np.ndarray],
    choice: str,
    labels: np.ndarray | None,
    train: np.ndarray,
    samples: int | None = None,
) -> _Targets:
    kinds = loss_kinds(model, teacher, choice, samples)
    if labels is not None and not any(k in ("kl-probs", "kl-logits") for k in kinds):
        raise ConfigError("labels given, but no output looks like class scores (logits or probabilities)")
    scales = [float(np.var(t[train])) or 1.0 if k == "mse" else 1.0 for t, k in zip(teacher, kinds, strict=True)]
    outputs = _teacher_tensors(teacher, kinds)
    tensor_labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)) if labels is not None else None
    return _Targets(outputs, kinds, scales, tensor_labels)


class _Runner:
    """Runs a module over index sets of the dataset in micro-batches of ``micro`` samples (``run_size``).

    Its feeds follow ``calibration.batches``: shared inputs whole, a per-sample scalar as a scalar,
    an input batched on a later axis (a recurrent state) with its samples put back on that axis.
    """

    def __init__(
        self,
        module: OnnxModule,
        dataset: Dataset,
        micro: int,
        device: torch.device,
        scalars: frozenset[str] = frozenset(),
    ) -> None:
        self.module, self.micro, self.device = module, micro, device
        self.dataset, self.scalars = dataset, scalars
        self.inputs = {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in dataset.arrays.items()}

    def chunks(self, index: np.ndarray) -> list[torch.Tensor]:
        return [torch.from_numpy(index[i : i + self.micro]) for i in range(0, len(index), self.micro)]

    def sampled(self, name: str) -> bool:
        """Whether input ``name`` has one value per sample (not shared by every run)."""
        return not self.dataset.is_shared(name)

    def laid_out(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rows of each sampled input (samples first) in the layout the model reads; shared inputs whole."""
        out = {}
        for name, whole in self.inputs.items():
            value = rows[name] if self.sampled(name) else whole
            if name in self.scalars:
                value = value.reshape(())
            elif name in self.dataset.sample_axes:
                value = value.movedim(0, self.dataset.sample_axes[name])
            out[name] = value
        return out

    def feeds(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.laid_out({n: a[index] for n, a in self.inputs.items() if self.sampled(n)})

    def forward(self, feeds: dict[str, torch.Tensor], outputs: Sequence[str] | None = None) -> list[torch.Tensor]:
        used = {n: a.to(self.device) for n, a in feeds.items() if n in self.module.input_names}
        return self.module(outputs, **used)

    def cached(self, targets: _Targets, index: torch.Tensor) -> _Batch:
        """The calibration samples themselves, with the teacher outputs computed up front."""
        return _Batch(self.feeds(index), targets.teacher_at(index), targets.labels_at(index))

    def mean_loss(self, targets: _Targets, index: np.ndarray) -> float:
        total = 0.0
        with torch.no_grad():
            for chunk in self.chunks(index):
                batch = self.cached(targets, chunk)
                total += float(targets.loss(self.forward(batch.feeds), batch)) * len(chunk)
        return total / len(index)


@dataclass(frozen=True)
class _Mixup:
    """Fresh inputs every step: two calibration samples blended, the teacher run on the blend.

    A few hundred samples with their outputs cached are soon memorised; the
    compressed model then matches the original there and drifts elsewhere.
    Blends x = lam * a + (1 - lam) * b with lam ~ U(0, 1) keep the inputs on
    the segments between real samples and give the teacher's answer on each
    (function matching, Beyer et al. 2022), so every step brings new targets.
    Only for models whose inputs are all floating point: token ids cannot blend.
    """

    teacher: Any  # onnxruntime.InferenceSession of the original model
    rng: np.random.Generator

    def batch(self, runner: _Runner, targets: _Targets, index: torch.Tensor, partner: torch.Tensor) -> _Batch:
        lam = torch.from_numpy(self.rng.uniform(size=len(index)).astype(np.float32))
        rows = {}
        for name, a in runner.inputs.items():
            if runner.sampled(name):
                weight = _per_sample(lam, a)
                rows[name] = weight * a[index] + (1 - weight) * a[partner]
        feeds = runner.laid_out(rows)
        outputs = self.teacher.run(None, {n: v.numpy() for n, v in feeds.items()})
        teacher = _teacher_tensors(outputs, targets.kinds)
        labels = None
        if targets.labels is not None:
            labels = [(targets.labels[index], lam), (targets.labels[partner], 1 - lam)]
        return _Batch(feeds, teacher, labels)


def _can_mix(dataset: Dataset) -> bool:
    return all(np.issubdtype(a.dtype, np.floating) for a in dataset.arrays.values())


@dataclass(frozen=True)
class _FeatureMatch:
    """Pull each compressed layer's output towards the original's: relative squared error, averaged."""

    teacher: _Runner
    names: list[str]
    weight: float

    def loss(self, student: Sequence[torch.Tensor], feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            targets = self.teacher.forward(feeds, self.names)
        terms = [
            (s - t).square().sum() / t.square().sum().clamp_min(1e-12) for s, t in zip(student, targets, strict=True)
        ]
        return self.weight * torch.stack(terms).mean()


def _check_executor(runner: _Runner, model: onnx.ModelProto, dataset: Dataset) -> None:
    """Refuse to train a graph the executor computes differently from onnxruntime (first micro-batch)."""
    first = np.arange(min(runner.micro, dataset.n_samples))
    expected = run_session(session(serialized(model)), dataset.rows(first), model)
    with torch.no_grad():
        got = runner.forward(runner.feeds(torch.from_numpy(first)))
    for name, want, have in zip(runner.module.output_names, expected, got, strict=True):
        # onnxruntime's runs are joined on axis 0: an output without a row per sample (a recurrent state
        # [2, batch, 128]) comes back in another shape when the micro-batch spans several runs.
        if not np.issubdtype(want.dtype, np.floating) or tuple(want.shape) != tuple(have.shape):
            continue
        error = float(np.abs(have.float().cpu().numpy() - want).max() / max(float(np.abs(want).max()), 1e-12))
        if error > _EXECUTOR_TOLERANCE:
            raise UnsupportedGraphError(
                f"the torch executor's output {name!r} differs from onnxruntime's by {error:.1e} (relative); "
                "please report the model"
            )


def _moments(runner: _Runner, names: list[str], index: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-channel mean and variance of the named tensors (axis 1) over the samples."""
    sums = [0.0] * len(names)
    squares = [0.0] * len(names)
    count = [0] * len(names)
    with torch.no_grad():
        for chunk in runner.chunks(index):
            for i, x in enumerate(runner.forward(runner.feeds(chunk), names)):
                dims = [d for d in range(x.dim()) if d != 1]
                x = x.double()
                sums[i] = sums[i] + x.sum(dims)
                squares[i] = squares[i] + x.square().sum(dims)
                count[i] += x.numel() // x.shape[1]
    out = []
    for s, q, n in zip(sums, squares, count, strict=True):
        mean = s / n
        out.append((mean.cpu().numpy(), (q / n - mean.square()).clamp_min(0).cpu().numpy()))
    return out


def _batchnorms(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """BatchNormalization nodes whose running statistics are constants (so they can be re-estimated)."""
    constants = constant_tensors(model.graph)
    return [
        n
        for n in model.graph.node
        if n.op_type == "BatchNormalization" and n.input[3] in constants and n.input[4] in constants
    ]


def _recalibrated_statistics(
    student: _Runner, teacher: _Runner, model: onnx.ModelProto, index: np.ndarray
) -> dict[str, np.ndarray]:
    """New BatchNorm running statistics under which the compressed model normalises as the original did.

    The same samples go through both models. With the input's statistics m, v
    (original: m_t, v_t; compressed: m_s, v_s) and r = sqrt(v_s / v_t), choosing
    sigma' = r * sigma and mu' = m_s - r * (m_t - mu) gives the compressed
    model's normalised values exactly the per-channel mean and variance the
    original's have. Only the shift is taken from the calibration data, so the
    original's training-set statistics survive narrow calibration data.
    """
    constants = constant_tensors(model.graph)
    nodes = _batchnorms(model)
    names = [n.input[0] for n in nodes]
    ours, theirs = _moments(student, names, index), _moments(teacher, names, index)
    new = {}
    for node, (m_s, v_s), (m_t, v_t) in zip(nodes, ours, theirs, strict=True):
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        mean, var = constants[node.input[3]].to_array(), constants[node.input[4]].to_array()
        ratio = np.sqrt(np.where(v_t > 1e-12, v_s / np.maximum(v_t, 1e-12), 1.0))
        new[node.input[3]] = (m_s - ratio * (m_t - mean)).astype(mean.dtype)
        new[node.input[4]] = np.maximum(ratio**2 * (var + eps) - eps, 0).astype(var.dtype)
    return new


def _split(n: int, holdout: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    n_hold = round(holdout * n) if n >= 2 else 0
    train, held = order[n_hold:], order[:n_hold]
    if not len(train):
        raise ConfigError(f"{n} calibration sample(s) leave none to train on after the held-out slice")
    return np.sort(train), np.sort(held)


def _schedule_fraction(step: int, elapsed: float, config: FinetuneConfig) -> float:
    """How far through the budget we are: steps or seconds, whichever is further along."""
    done = [step / config.max_steps] if config.max_steps else []
    if config.time_s is not None:
        done.append(elapsed / config.time_s)
    return max(done)


def _learning_rate(fraction: float) -> float:
    """Multiplier of the base rate: linear warm-up, then cosine decay to zero at the end of the budget."""
    if fraction < _WARMUP:
        return fraction / _WARMUP
    return 0.5 * (1 + math.cos(math.pi * (fraction - _WARMUP) / (1 - _WARMUP)))


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def finetune(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    dataset: Dataset,
    config: FinetuneConfig,
    *,
    seed: int = 0,
    labels: np.ndarray | None = None,
    progress: bool = False,
    tunable: Collection[str] | None = None,
) -> FinetuneResult:
    """Tune ``compressed`` so its outputs match ``original``'s on ``dataset``; returns a new model.

    ``tunable``: the only constants that may change (None: every trainable one). A graph with its ``If``
    branches inlined holds constants the written model keeps inside the branches, which the caller cannot
    write back: those stay as they are, BatchNorm statistics included.

    ``labels`` (class indices aligned with the samples) add a cross-entropy term
    on the first class-score output. Raises ``UnsupportedGraphError`` when the
    executor cannot run the graph, so callers can keep the untuned model.
    """
    _require_torch()
    if labels is not None and len(labels) != dataset.n_samples:
        raise ConfigError(f"{len(labels)} labels for {dataset.n_samples} calibration samples")
    started = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = _device()
    names = [n for n in trainable_constants(compressed) if tunable is None or n in tunable]
    student = OnnxModule(compressed, names).to(device)
    micro = run_size(dataset, compressed, config.batch_size)
    teacher_session = session(serialized(original))
    teacher_out = run_session(teacher_session, dataset, original)
    train, held = _split(dataset.n_samples, config.holdout, rng)
    # Without held-out samples nothing would keep moved codes that make the model worse from being exported.
    moving = MovingCodes(student, decode_chains(compressed), tunable) if config.codes and len(held) else None
    targets = _targets(compressed, teacher_out, config.loss, labels, train, dataset.n_samples)
    scalars = per_sample_scalars(dataset, compressed)
    runner = _Runner(student, dataset, micro, device, scalars)
    _check_executor(runner, compressed, dataset)
    statistics = {}
    recalibrate = config.recalibrate_bn and bool(_batchnorms(compressed))
    # The original as a torch module costs a second copy of the weights: only when something reads it.
    teacher = (
        _Runner(OnnxModule(original).to(device), dataset, micro, device, scalars)
        if recalibrate or config.features
        else None
    )
    features = _FeatureMatch(teacher, layer_outputs(compressed.graph), config.features) if config.features else None
    if recalibrate:
        statistics = _recalibrated_statistics(runner, teacher, compressed, train)
        statistics = {n: v for n, v in statistics.items() if tunable is None or n in tunable}
        for name, value in statistics.items():
            student.set_constant(name, value)
    mixup = _Mixup(teacher_session, rng) if config.mixup and _can_mix(dataset) else None
    history = _train(runner, targets, features, mixup, moving, train, held, config, rng, progress)
    codes = history.pop("best_codes")
    if moving is not None:
        moving.load(codes)
    tuned, history["loss_exported"] = _export(runner, history.pop("best_state"), targets, held if len(held) else train)
    tuned.update(codes)
    out = onnx.ModelProto()
    out.CopyFrom(compressed)
    constants = {**tuned, **statistics}
    replace_constants(out.graph, constants)
    report = {
        "device": str(device),
        "samples": {"train": len(train), "holdout": len(held)},
        "loss_kinds": dict(zip([o.name for o in compressed.graph.output], targets.kinds, strict=True)),
        "trainable": {"tensors": len(names), "values": int(sum(p.numel() for p in student.params))},
        "moving_codes": _moving_report(config, moving, codes),
        "batchnorm_recalibrated": len(statistics) // 2,
        "mixup": mixup is not None,
        "ema": config.ema,
        "seconds": time.perf_counter() - started,
        **history,
    }
    return FinetuneResult(out, report, constants)


def _moving_report(config: FinetuneConfig, moving: MovingCodes | None, codes: dict[str, np.ndarray]) -> object:
    """The report's ``moving_codes``: None when not asked, why not when asked and skipped, else the chains."""
    if not config.codes:
        return None
    if moving is None:
        return "skipped: no held-out samples to check that moved codes do not make the model worse"
    return {"chains": len(moving.chains), "indices": len(codes)}


def _export(
    runner: _Runner, state: list[torch.Tensor], targets: _Targets, index: np.ndarray
) -> tuple[dict[str, np.ndarray], float]:
    """The chosen step's constants in their ONNX types, and the loss measured with those rounded values."""
    module = runner.module
    _assign(module.params, state)
    tuned = module.constants()
    _assign(module.params, [torch.from_numpy(tuned[n].astype(np.float32)) for n in module.parameter_names])
    return tuned, runner.mean_loss(targets, index)


def _assign(params: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    """Copy ``values`` into the parameters in place, so the optimiser's references stay valid."""
    with torch.no_grad():
        for p, v in zip(params, values, strict=True):
            p.copy_(v)


class _Average:
    """Exponential moving average of the trained values: what is evaluated and exported.

    A few hundred calibration samples leave Adam's steps noisy: on MobileNetV2
    the raw values' eval KL and confident agreement jumped between consecutive
    checks, so which step the held-out loss happened to pick decided the result.
    The average over the last ~1 / (1 - decay) steps sits near the middle of
    that noise. Its decay starts small ((1 + t) / (10 + t)), so short runs and
    the first steps are not pinned to the untuned start.
    """

    def __init__(self, params: Sequence[torch.Tensor], decay: float) -> None:
        self.params, self.decay, self.updates = list(params), decay, 0
        self.values = [p.detach().clone() for p in self.params]

    def update(self) -> None:
        self.updates += 1
        weight = 1 - min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            for v, p in zip(self.values, self.params, strict=True):
                v.lerp_(p, weight)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The average in the parameters for the block; the raw values, which training goes on from, after it."""
        saved = [p.detach().clone() for p in self.params]
        _assign(self.params, self.values)
        try:
            yield
        finally:
            _assign(self.params, saved)


def _train(
    runner: _Runner,
    targets: _Targets,
    features: _FeatureMatch | None,
    mixup: _Mixup | None,
    moving: MovingCodes | None,
    train: np.ndarray,
    held: np.ndarray,
    config: FinetuneConfig,
    rng: np.random.Generator,
    progress: bool,
) -> dict[str, Any]:
    """Adam with a cosine schedule over the budget; keeps the parameters (and codes) of the best held-out step.

    Moving codes' latent weights train with the rest; the averaged values are evaluated with the
    current codes, which are the ones kept with them.
    """
    from tqdm.auto import tqdm

    params = list(runner.module.params)
    n_outputs = len(runner.module.output_names)
    names = runner.module.output_names + (features.names if features else [])
    optimiser = torch.optim.Adam(params + (list(moving.latent) if moving else []), lr=config.lr)
    saved_codes = moving.codes if moving is not None else dict
    best_codes, moved = saved_codes(), 0
    average = _Average(params, config.ema) if config.ema else None
    evaluate = (lambda: runner.mean_loss(targets, held)) if len(held) else None
    start_loss = evaluate() if evaluate else None
    best_loss, best_step = start_loss, 0
    best_state = [p.detach().clone() for p in params]
    curve: list[tuple[int, float]] = [(0, start_loss)] if start_loss is not None else []
    order: list[int] = []
    step, began, train_loss = 0, time.perf_counter(), float("nan")
    bar = tqdm(total=config.max_steps, desc="fine-tune", unit="step", disable=not progress)
    while (fraction := _schedule_fraction(step, time.perf_counter() - began, config)) < 1:
        for group in optimiser.param_groups:
            group["lr"] = config.lr * _learning_rate(fraction)
        if len(order) < config.batch_size:
            order.extend(rng.permutation(train).tolist())
        batch, order = np.array(order[: config.batch_size]), order[config.batch_size :]
        optimiser.zero_grad(set_to_none=True)
        train_loss = 0.0
        for chunk in runner.chunks(batch):
            if mixup is not None:
                sample = mixup.batch(runner, targets, chunk, torch.from_numpy(rng.choice(train, len(chunk))))
            else:
                sample = runner.cached(targets, chunk)
            outputs = runner.forward(sample.feeds, names)
            loss = targets.loss(outputs[:n_outputs], sample)
            if features is not None:
                loss = loss + features.loss(outputs[n_outputs:], sample.feeds)
            loss = loss * (len(chunk) / len(batch))
            loss.backward()
            train_loss += float(loss.detach())
        optimiser.step()
        if average is not None:
            average.update()
        step += 1
        if moving is not None and step % CODE_STEPS == 0:
            moved += moving.reassign()
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.4g}")
        ends = _schedule_fraction(step, time.perf_counter() - began, config) >= 1
        if evaluate and (step % config.eval_every == 0 or ends):
            with average.applied() if average is not None else nullcontext():
                held_loss = evaluate()
                if held_loss < best_loss:
                    best_loss, best_step = held_loss, step
                    best_state, best_codes = [p.detach().clone() for p in params], saved_codes()
            curve.append((step, held_loss))
    bar.close()
    if not evaluate:  # No held-out samples: the last step (or the average up to it) is all there is.
        best_state, best_step = [v.detach().clone() for v in (average.values if average else params)], step
        best_codes = saved_codes()
    return {
        "codes_moved": moved,
        "best_codes": best_codes,
        "steps": step,
        "best_step": best_step,
        "loss_start": start_loss,
        "loss_best": best_loss,
        "loss_train_last": train_loss,
        "holdout_curve": curve,
        "best_state": best_state,
    }
