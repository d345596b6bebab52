"""Typed, validated settings for one compression run."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from onnxpq.errors import ConfigError
from onnxpq.operators import OP_TYPES

__all__ = [
    "CALIBRATION",
    "COMPRESS",
    "DEFAULT_EMA",
    "DEFAULT_FINETUNE_STEPS",
    "FINETUNE",
    "FINETUNING",
    "LOSSES",
    "QUANTIZATION",
    "WHAT",
    "CompressConfig",
    "FinetuneConfig",
    "Setting",
    "check_settings",
]


BlockSize = Literal["small", "large"]
#: Distillation losses; ``auto`` picks one per output from what the output is (see ``finetune``).
LOSSES = ("auto", "kl", "mse", "cosine")
#: Steps when fine-tuning is asked for without a budget.
DEFAULT_FINETUNE_STEPS = 300
#: Fine-tuning exports the moving average of the trained values over about 1 / (1 - decay) steps.
#: On MobileNetV2 the last step's eval KL swung by ±0.03 between checks 25 steps apart, and its
#: confident-view agreement between 0.79 and 1.0; the average held both steady.
DEFAULT_EMA = 0.99
#: Default smallest weight to compress; under a size budget smaller ones are offered to the allocator,
#: which may keep them in float: on MobileNetV2 at 3 bits/weight that moved KL from 0.58 to 0.34.
MIN_ELEMENTS = 4096
MIN_ELEMENTS_BUDGET = 1024
#: Default memory for the layer statistics, MiB (see ``stats``). Issue 21 allows the compression 1 GB
#: over the onnxruntime session of the original: the statistics of all layers together, held in float32,
#: may take half of this, and one layer's float64 H at most a sixteenth, so its quantization (about eight
#: float64 copies of its H) fits in the other half. A layer whose full H is larger (R = 4096 is 128 MiB
#: in float64) is quantized from a block-diagonal H instead.
STATISTICS_MEMORY_MIB = 2048


#: Shrinkage weights tried besides OAS's on a layer whose statistics are rank-deficient (``quantize.layer``).
SHRINKAGE_GRID = (0.1, 0.25, 0.5)
#: GPTQ's damping: a fraction of the mean diagonal added to H so it stays invertible (``output_aware.damped``).
DAMPING = 0.01
#: Lloyd (and the output-aware refinement) stops once at most this fraction of codes changes in an iteration:
#: the last iterations of a big layer move a handful of subvectors and cost as much as the first.
KMEANS_TOLERANCE = 1e-3
#: The codebook refit (conjugate gradients) stops once its squared residual is this fraction of the right-hand
#: side's: a relative residual of 1e-5, where the output error has stopped moving in its sixth digit.
REFIT_TOLERANCE = 1e-10
#: The same for the allocator's estimates, which rank settings whose errors differ by tens of percent: on
#: MiniLM's largest layers it halved the refit's iterations and moved the estimated output error by at most
#: 0.04 % (measured by re-running the refits of one MiniLM allocation at both tolerances; CHANGELOG 0.6.0).
ESTIMATE_REFIT_TOLERANCE = 1e-6
#: Input rows per layer (or ``ROWS_PER_INPUT`` per input of a group, if more) beyond which the statistics use
#: a random subset of them, the same share from every batch. MobileNetV2's first layers see 224 x 12 544
#: patches for an H of 9 x 9 to 32 x 32, and PP-OCRv4 rec's 5 x 5 depthwise convs 320 000 for 240 H of 25 x 25:
#: it spent 40 of its 48 s of statistics copying and multiplying patches. Every layer of MNIST, MiniLM and the
#: golden models stays under it, so their statistics are unchanged.
MAX_ROWS = 1 << 16
ROWS_PER_INPUT = 1024
#: Samples on which the bit allocator measures each setting's output error: enough for a stable mean, cheap
#: per setting (with at least four times as many calibration samples, they are held out of the statistics).
PROBE_SAMPLES = 32
#: Settings per layer whose output error the allocator measures. On MobileNetV2 at 2.64 bits/weight, reading
#: the rest off the curve through 2-5 measured settings chose allocations as good as measuring all 20; each
#: costs one onnxruntime pass over the probe samples per layer (a third of the allocation's time at 3).
MEASURED_SETTINGS = 2
#: Lloyd iterations of the allocator's quick estimates (no error feedback).
ESTIMATE_ITERS = 8
#: Units (output channels, columns) an estimate fits its codebook on before coding all of them: the
#: classifier of MobileNetV2 (1000 units) took half of the allocator's time when fitted on all.
ESTIMATE_UNITS = 256
#: Subvectors per codeword such a sampled fit keeps at least (faiss warns below 39 training points per centroid).
SAMPLE_PER_CODEWORD = 64
#: Synthetic samples for ``--calibration-data random`` (validation without data draws as many; the field
#: ``synthetic_samples`` sets the calibration's only).
SYNTHETIC_SAMPLES = 8
#: The value of ``target_bpw``/``target_mib`` that asks for the smallest budget passing the accuracy gate.
AUTO = "auto"


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """How the codebooks, biases and norms are tuned after quantization (see ``finetune``).

    Parameters
    ----------
    steps : optimiser steps; None means ``DEFAULT_FINETUNE_STEPS`` unless ``time_s`` is given.
    time_s : wall-clock budget in seconds; the cosine schedule is fitted to the steps that
        fit in it, so the bytes then depend on the machine's speed (use ``steps`` for
        reproducible output). With both, whichever ends first.
    batch_size : samples per step.
    lr : Adam's peak learning rate: reached after a linear warm-up over the first 5 % of the
        budget, then cosine-annealed to zero.
    holdout : fraction of the calibration samples kept out of training to pick the best step.
    eval_every : steps between held-out evaluations.
    loss : ``auto``, or one loss for every output: ``kl`` (on logits or probabilities),
        ``mse`` (normalised by the teacher's variance) or ``cosine``.
    recalibrate_bn : move BatchNorm running statistics by the shift quantization caused
        (measured on the calibration data against the original model) before training.
    features : weight of intermediate-feature matching: the output of every layer with a
        codebook is pulled towards the original's (relative squared error); 0 turns it off.
        Selection of the best step still uses the model outputs only.
    ema : decay of the exponential moving average of the trained values: the average, not the
        last step, is evaluated and exported; 0 turns it off (see ``DEFAULT_EMA``).
    mixup : train on blends of two calibration samples (a random weight per pair), with the
        original run on each blend, instead of on the samples with their outputs cached; only
        when every model input is floating point (token ids cannot blend).
    codes : let the codes move too: each decode chain trains a latent copy of its weight by the
        straight-through gradient, and every few steps (``training.CODE_STEPS``) each subvector
        takes its latent copy's nearest codeword (``finetune.codes``).
    """

    steps: int | None = None
    time_s: float | None = None
    batch_size: int = 16
    lr: float = 1e-4
    holdout: float = 0.1
    eval_every: int = 25
    loss: str = "auto"
    recalibrate_bn: bool = True
    features: float = 0.0
    mixup: bool = True
    ema: float = DEFAULT_EMA
    codes: bool = False

    def __post_init__(self) -> None:
        check_settings(self, FINETUNE, "finetune ")

    @property
    def max_steps(self) -> int | None:
        """The step budget: None when only the time bounds it."""
        if self.steps is not None:
            return self.steps
        return None if self.time_s is not None else DEFAULT_FINETUNE_STEPS


@dataclass(frozen=True, kw_only=True)
class CompressConfig:
    """Everything that decides the bytes of the compressed model.

    Parameters
    ----------
    op_types : operator types to compress; ``("all",)`` adds every other large
        float initializer (e.g. LSTM weights).
    nodes_to_exclude, nodes_to_include : node names or regular expressions: a pattern equal to a
        node name matches that node only (as onnxruntime's exact names), any other is searched
        (``re.search``) in every node name; a pattern that matches no node is an error.
    min_elements : weights with fewer elements stay in float; None means 4096, or 1024 under a
        size budget (the allocator then keeps any of them in float that is not worth its codebook);
        codebooks would
        cost more than they save.
    keep_first : keep the first Conv in float (True), compress it (False), or None: keep it
        only when it is small, as PQF's ImageNet first conv is (at most 4 input channels per
        group and 1 % of the weights; see ``selection``).
    block_size : PQF's block sizes: ``small`` (d=9 for 3x3 kernels, 4 otherwise)
        or ``large`` (18 and 8).
    subvector_dim : a fixed d for every layer, overriding ``block_size``.
    n_codewords : codebook size k, clamped per layer to ``2**floor(log2(n_subvectors / 4))``.
    kmeans_iters : Lloyd iterations after k-means++ initialisation.
    anneal : PQF's stochastic relaxation of k-means (noisy codewords, cooling to zero).
    seed : seeds every random choice; same seed and input give identical bytes.
    permute : PQF's channel permutation before quantization (see ``permute``); free at run time.
    permute_iters : pair swaps tried per channel group.

    With calibration data (see ``stats``) these choose how the output error
    ‖X(W - Ŵ)‖² is minimised; without data they are ignored:

    output_aware : assign and update codewords in the metric of each subvector's H block (BGD).
    error_feedback : GPTQ's sequential assignment, later subvectors compensating earlier ones.
    refit : exact least-squares codebook for the final codes (full H).
    bias_correction : put the mean output shift back into the layer's bias, and
        quantize in the centred statistics the correction leaves.
    calibration_samples : use at most this many calibration samples for the statistics.
    sequential : 0 (statistics of the original model for every layer) or N >= 1: split the
        layers into N groups in graph order and collect each group's statistics on the
        model whose earlier groups are already quantized (GPTQ/BGD's sequential mode).
    target_bpw, target_mib : a size budget (bits per weight over all parameters, or MiB, in
        PQF's accounting); each layer then gets the (d, k) or float setting that meets it
        with the least estimated output error (see ``allocate``). At most one of the two. ``AUTO``: the
        smallest budget whose model passes the accuracy gate on the validation data (``search``); the
        config the output records holds the budget found.
    auto_budget : with calibration data and neither target, the budget is the size the fixed layout
        (``block_size``, ``subvector_dim``, ``n_codewords``, ``min_elements``) would have, and the allocator
        spreads it over the layers: the same size, less output error. False keeps every layer at the fixed
        layout.
    finetune : distil the original model into the compressed one (needs calibration data and
        torch); None skips it.
    statistics_memory_mib : memory for the layer statistics H and their use, MiB (see
        ``STATISTICS_MEMORY_MIB``); layers whose full H does not fit their share use a
        block-diagonal H, and if even the smallest blocks do not fit the run stops with a ``ConfigError``.

    The remaining fields are the algorithm's tunable constants (see each default's comment above), fields so
    that a model's ``metadata_props`` records them and experiments can vary them (numerical-repair and
    memory-plan constants stay in their modules; the version in the metadata identifies those):

    shrinkage_grid, damping : the statistics' shrinkage weights tried on rank-deficient layers, and GPTQ's
        damping of H.
    kmeans_tolerance : the fraction of changed codes at which Lloyd and the refinement stop.
    refit_tolerance, estimate_refit_tolerance : the squared relative residual at which the codebook refit
        stops, in the final quantization and in the allocator's estimates.
    max_rows, rows_per_input : the row sample of the statistics.
    probe_samples, measured_settings, estimate_iters, estimate_units, sample_per_codeword : the bit
        allocator's measurements and quick estimates.
    synthetic_samples : the number of samples ``random`` calibration data draws.
    """

    op_types: tuple[str, ...] = OP_TYPES
    nodes_to_exclude: tuple[str, ...] = ()
    nodes_to_include: tuple[str, ...] = ()
    min_elements: int | None = None
    keep_first: bool | None = None
    block_size: BlockSize = "small"
    subvector_dim: int | None = None
    n_codewords: int = 256
    kmeans_iters: int = 20
    anneal: bool = False
    seed: int = 0
    permute: bool = False
    permute_iters: int = 2000
    output_aware: bool = True
    error_feedback: bool = True
    refit: bool = True
    bias_correction: bool = True
    calibration_samples: int = 512
    sequential: int = 0
    target_bpw: float | str | None = None
    target_mib: float | str | None = None
    auto_budget: bool = True
    finetune: FinetuneConfig | None = None
    statistics_memory_mib: float = STATISTICS_MEMORY_MIB
    shrinkage_grid: tuple[float, ...] = SHRINKAGE_GRID
    damping: float = DAMPING
    kmeans_tolerance: float = KMEANS_TOLERANCE
    refit_tolerance: float = REFIT_TOLERANCE
    estimate_refit_tolerance: float = ESTIMATE_REFIT_TOLERANCE
    max_rows: int = MAX_ROWS
    rows_per_input: int = ROWS_PER_INPUT
    probe_samples: int = PROBE_SAMPLES
    measured_settings: int = MEASURED_SETTINGS
    estimate_iters: int = ESTIMATE_ITERS
    estimate_units: int = ESTIMATE_UNITS
    sample_per_codeword: int = SAMPLE_PER_CODEWORD
    synthetic_samples: int = SYNTHETIC_SAMPLES

    def __post_init__(self) -> None:
        unknown = [t for t in self.op_types if t not in OP_TYPES and t != "all"]
        if unknown:
            raise ConfigError(f"unknown op type(s) {', '.join(unknown)}; choose from {', '.join(OP_TYPES)} or 'all'")
        if not self.op_types:
            raise ConfigError("op_types is empty: nothing would be compressed")
        for pattern in self.nodes_to_exclude + self.nodes_to_include:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"invalid node pattern {pattern!r}: {err}") from None
        if self.target_bpw is not None and self.target_mib is not None:
            raise ConfigError("give either target_bpw or target_mib, not both")
        check_settings(self, COMPRESS, "")

    @property
    def searches_budget(self) -> bool:
        """The budget is ``AUTO``: the smallest that passes the accuracy gate (``search``)."""
        return AUTO in (self.target_bpw, self.target_mib)

    @property
    def has_budget(self) -> bool:
        """A size target is given, so the allocator chooses each layer's settings."""
        return self.target_bpw is not None or self.target_mib is not None

    @property
    def min_size(self) -> int:
        """The smallest weight considered for compression (``min_elements`` resolved)."""
        if self.min_elements is not None:
            return self.min_elements
        return MIN_ELEMENTS_BUDGET if self.has_budget else MIN_ELEMENTS

    @property
    def statistics_rows(self) -> tuple[int, int]:
        """(rows per layer, rows per input) beyond which the statistics sample their rows (``stats``)."""
        return self.max_rows, self.rows_per_input

    @property
    def all_op_types(self) -> bool:
        return "all" in self.op_types

    def to_json(self) -> dict[str, Any]:
        """The settings as plain JSON values, for the report and ``metadata_props``."""
        return asdict(self)


@dataclass(frozen=True)
class Setting:
    """One field of ``CompressConfig`` or ``FinetuneConfig``: the constraint on its value, and its command-line
    option and help.

    ``COMPRESS`` and ``FINETUNE`` are the one place these are declared: the dataclasses check their values
    against them, ``cli`` builds ``onnxpq compress``'s options from them (defaults read from the dataclasses,
    so they are not repeated), and the README's option table is rendered from that parser. ``flags`` empty:
    Python API only. Booleans are ``--x/--no-x``; ``low``/``high`` bound a number (``*_open``: the bound
    itself is refused); ``exclusive`` names settings of which at most one may be given on the command line.
    """

    field: str
    section: str
    help: str
    flags: tuple[str, ...] = ()
    kind: type = int
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    default_text: str | None = None
    unit: str = ""
    exclusive: str | None = None
    auto: bool = False

    def check(self, value: Any, prefix: str) -> None:
        """Refuse a value outside the declared choices or bounds (NaN included), naming the field."""
        if value is None or (self.auto and value == AUTO):
            return
        name = f"{prefix}{self.field}={value!r}" if isinstance(value, str) else f"{prefix}{self.field}={value}"
        if self.choices is not None and self.kind is str and value not in self.choices:
            raise ConfigError(f"{name}; choose from {', '.join(self.choices)}")
        if self.low is None and self.high is None:
            return
        if self.kind is tuple:  # bounds apply to each element
            for item in value:
                self._check_bounds(item, f"each of {prefix}{self.field}={value!r}")
            return
        self._check_bounds(value, name)

    def _check_bounds(self, value: Any, name: str) -> None:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        if not (above and below):
            raise ConfigError(f"{name} must be {self.bounds}{self.unit}")

    @property
    def bounds(self) -> str:
        """The allowed range in words: ``>= 1``, ``positive``, ``in (0, 32]``."""
        if self.high is None:
            if self.low_open:
                return "positive" if self.low == 0 else f"> {self.low:g}"
            return f">= {self.low:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


WHAT = "what to compress"
QUANTIZATION = "quantization"
CALIBRATION = "calibration (data-aware quantization)"
FINETUNING = "fine-tuning (distillation from the original on the calibration data; needs torch)"

INTERNALS = "algorithm constants (Python API only)"
#: The algorithm's constants as settings: validated and recorded, not command-line options.
_INTERNAL_SETTINGS = (
    Setting(
        "shrinkage_grid", INTERNALS, "shrinkage weights tried on rank-deficient statistics", kind=tuple, low=0, high=1
    ),
    Setting("damping", INTERNALS, "GPTQ's damping of H", kind=float, low=0, low_open=True),
    Setting("kmeans_tolerance", INTERNALS, "changed-code fraction that stops Lloyd", kind=float, low=0, high=1),
    Setting("refit_tolerance", INTERNALS, "squared relative residual that stops the refit", kind=float, low=0),
    Setting("estimate_refit_tolerance", INTERNALS, "the same in the allocator's estimates", kind=float, low=0),
    Setting("max_rows", INTERNALS, "statistics rows per layer before sampling", kind=int, low=1),
    Setting("rows_per_input", INTERNALS, "statistics rows per input before sampling", kind=int, low=1),
    Setting("probe_samples", INTERNALS, "samples of the allocator's error probe", kind=int, low=1),
    Setting("measured_settings", INTERNALS, "settings per layer the allocator measures", kind=int, low=1),
    Setting("estimate_iters", INTERNALS, "Lloyd iterations of the allocator's estimates", kind=int, low=0),
    Setting("estimate_units", INTERNALS, "units an estimate fits its codebook on", kind=int, low=1),
    Setting("sample_per_codeword", INTERNALS, "subvectors per codeword of a sampled fit", kind=int, low=1),
    Setting("synthetic_samples", INTERNALS, "samples of random calibration data", kind=int, low=1),
)
#: ``CompressConfig``'s settings, in the order ``onnxpq compress --help`` shows them.
COMPRESS = (
    Setting(
        "op_types",
        WHAT,
        "operator types to compress, or 'all' (adds every other large float constant)",
        ("--op-types", "--op_types_to_quantize"),
        tuple,
        metavar="OP",
        default_text=" ".join(OP_TYPES),
    ),
    Setting(
        "nodes_to_exclude",
        WHAT,
        "nodes to keep in float: a pattern equal to a node name matches that node only (as in onnxruntime), "
        "any other is a regular expression searched in every node name; the report's selection.patterns says how "
        "many nodes each matched, and one that matches none is an error listing close names",
        ("--nodes-to-exclude", "--nodes_to_exclude"),
        tuple,
        metavar="PATTERN",
    ),
    Setting(
        "nodes_to_include",
        WHAT,
        "compress only these nodes (patterns as for --nodes-to-exclude)",
        ("--nodes-to-include",),
        tuple,
        metavar="PATTERN",
    ),
    Setting(
        "min_elements",
        WHAT,
        "smaller weights stay in float",
        ("--min-elements",),
        int,
        low=1,
        metavar="N",
        default_text=f"{MIN_ELEMENTS}; {MIN_ELEMENTS_BUDGET} with --target-bpw/--target-size",
    ),
    Setting(
        "keep_first",
        WHAT,
        "keep the first Conv in float, or compress it",
        ("--keep-first",),
        bool,
        default_text="keep it only when it is small: at most 4 input channels per group and 1% of the weights, "
        "like an image CNN's first conv",
    ),
    Setting(
        "block_size",
        QUANTIZATION,
        "PQF blocks: small (d=9 for 3x3 kernels, 4 otherwise) or large (18 and 8)",
        ("--block-size",),
        str,
        choices=("small", "large"),
    ),
    Setting(
        "subvector_dim",
        QUANTIZATION,
        "use d=D for every layer",
        ("--subvector-dim",),
        int,
        low=1,
        high=64,
        metavar="D",
    ),
    Setting(
        "n_codewords",
        QUANTIZATION,
        "codebook size k (uint8 indices), clamped per layer to a quarter of its subvectors",
        ("-k", "--n-codewords"),
        int,
        low=2,
        high=256,
        metavar="K",
    ),
    Setting(
        "kmeans_iters", QUANTIZATION, "Lloyd iterations after k-means++", ("--kmeans-iters",), int, low=0, metavar="N"
    ),
    Setting("anneal", QUANTIZATION, "PQF's annealed (stochastically relaxed) k-means", ("--anneal",), bool),
    Setting(
        "permute",
        QUANTIZATION,
        "reorder channels so subvectors quantize better (PQF's P; no runtime cost)",
        ("--permute",),
        bool,
    ),
    Setting(
        "permute_iters",
        QUANTIZATION,
        "pair swaps tried per channel group",
        ("--permute-iters",),
        int,
        low=0,
        metavar="N",
    ),
    Setting("seed", QUANTIZATION, "seeds every random choice: same input and seed, same bytes", ("--seed",), int),
    Setting(
        "calibration_samples",
        CALIBRATION,
        "use at most N calibration samples (the statistics are streamed: memory does not grow with N)",
        ("--calibration-samples",),
        int,
        low=1,
        metavar="N",
    ),
    Setting(
        "output_aware",
        CALIBRATION,
        "assign and update codewords in each subvector's output metric",
        ("--output-aware",),
        bool,
    ),
    Setting(
        "error_feedback",
        CALIBRATION,
        "GPTQ-style sequential assignment with error feedback",
        ("--error-feedback",),
        bool,
    ),
    Setting("refit", CALIBRATION, "exact least-squares codebook refit", ("--refit",), bool),
    Setting("bias_correction", CALIBRATION, "fold the mean output shift into the bias", ("--bias-correction",), bool),
    Setting(
        "sequential",
        CALIBRATION,
        "re-collect statistics N times on the partly quantized model (GPTQ's sequential mode; 0: off)",
        ("--sequential",),
        int,
        low=0,
        metavar="N",
    ),
    Setting(
        "statistics_memory_mib",
        CALIBRATION,
        "memory for the layer statistics, MiB; a layer whose full input "
        "covariance does not fit its share keeps block-diagonal statistics, named in the report",
        ("--statistics-memory",),
        float,
        low=0,
        low_open=True,
        metavar="MIB",
    ),
    Setting(
        "target_bpw",
        CALIBRATION,
        "choose each layer's (d, k), or float, to meet B bits/weight over all parameters (PQF accounting) with "
        "the least estimated output error; auto: the smallest B whose model passes the accuracy gate "
        "(--max-degradation, --metric) on the validation data",
        ("--target-bpw",),
        float,
        low=0,
        high=32,
        low_open=True,
        metavar="B",
        unit=" bits per weight",
        exclusive="size",
        auto=True,
    ),
    Setting(
        "target_mib",
        CALIBRATION,
        "... or a size in MiB (auto: as for --target-bpw)",
        ("--target-size",),
        float,
        low=0,
        low_open=True,
        metavar="MIB",
        exclusive="size",
        auto=True,
    ),
    Setting(
        "auto_budget",
        CALIBRATION,
        "with calibration data and no --target-bpw/--target-size, give the model the size its fixed layout "
        "(--block-size, --subvector-dim, -k) would have and let the bit allocation spread it over the layers; "
        "off: every layer at the fixed layout",
        ("--auto-budget",),
        bool,
    ),
    *_INTERNAL_SETTINGS,
)
#: ``FinetuneConfig``'s settings (options ``--finetune-*``; see ``FinetuneConfig`` for what each does).
FINETUNE = (
    Setting(
        "steps",
        FINETUNING,
        "optimiser steps (implies --finetune)",
        ("--finetune-steps",),
        int,
        low=1,
        metavar="N",
        default_text=f"{DEFAULT_FINETUNE_STEPS} with --finetune",
    ),
    Setting(
        "time_s",
        FINETUNING,
        "time budget in seconds (implies --finetune); the output then depends on the machine's speed",
        ("--finetune-time",),
        float,
        low=0,
        low_open=True,
        metavar="SECONDS",
    ),
    Setting("batch_size", FINETUNING, "samples per step", ("--finetune-batch",), int, low=1, metavar="N"),
    Setting("lr", FINETUNING, "peak Adam learning rate", ("--finetune-lr",), float, low=0, low_open=True, metavar="LR"),
    Setting(
        "holdout",
        FINETUNING,
        "share of the samples held out to pick the best step",
        (),
        float,
        low=0,
        high=1,
        high_open=True,
    ),
    Setting("eval_every", FINETUNING, "steps between held-out evaluations", (), int, low=1),
    Setting("loss", FINETUNING, "distillation loss (auto: per output)", ("--finetune-loss",), str, choices=LOSSES),
    Setting("recalibrate_bn", FINETUNING, "move BatchNorm statistics by the shift quantization caused", (), bool),
    Setting(
        "features",
        FINETUNING,
        "also match every compressed layer's output to the original's, with weight W (0: off)",
        ("--finetune-features",),
        float,
        low=0,
        metavar="W",
    ),
    Setting(
        "mixup",
        FINETUNING,
        "train on blends of two calibration samples (float inputs only), not on the samples as they are",
        ("--finetune-mixup",),
        bool,
    ),
    Setting(
        "ema",
        FINETUNING,
        "export the moving average of the tuned values with this decay (0: the last step)",
        ("--finetune-ema",),
        float,
        low=0,
        high=1,
        high_open=True,
        metavar="DECAY",
    ),
    Setting(
        "codes",
        FINETUNING,
        "also re-assign codes: subvectors move to another codeword when the gradient carries them there",
        ("--finetune-codes",),
        bool,
    ),
)


def check_settings(config: Any, settings: tuple[Setting, ...], prefix: str) -> None:
    """Check every field of a config dataclass against its ``Setting``."""
    for setting in settings:
        setting.check(getattr(config, setting.field), prefix)
