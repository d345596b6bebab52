"""Typed, validated settings for one compression run."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from onnxpq.errors import ConfigError
from onnxpq.operators import OP_TYPES

__all__ = ["DEFAULT_EMA", "DEFAULT_FINETUNE_STEPS", "LOSSES", "CompressConfig", "FinetuneConfig"]


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
#: over the onnxruntime session of the original: the statistics of all layers together may hold half
#: of this, and one layer at most a sixteenth, so its quantization (about eight float64 copies of its
#: H) fits in the other half. A layer whose full H is larger (R = 4096 is 128 MiB) is quantized from
#: a block-diagonal H instead.
STATISTICS_MEMORY_MIB = 2048


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

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"finetune steps={self.steps} must be >= 1")
        if self.time_s is not None and self.time_s <= 0:
            raise ConfigError(f"finetune time={self.time_s} must be positive seconds")
        if self.batch_size < 1:
            raise ConfigError(f"finetune batch_size={self.batch_size} must be >= 1")
        if not self.lr > 0:
            raise ConfigError(f"finetune lr={self.lr} must be positive")
        if not 0 <= self.holdout < 1:
            raise ConfigError(f"finetune holdout={self.holdout} must be in [0, 1)")
        if self.eval_every < 1:
            raise ConfigError(f"finetune eval_every={self.eval_every} must be >= 1")
        if self.features < 0:
            raise ConfigError(f"finetune features={self.features} must be >= 0")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"finetune ema={self.ema} must be in [0, 1)")
        if self.loss not in LOSSES:
            raise ConfigError(f"finetune loss={self.loss!r}; choose from {', '.join(LOSSES)}")

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
        with the least estimated output error (see ``allocate``). At most one of the two.
    finetune : distil the original model into the compressed one (needs calibration data and
        torch); None skips it.
    statistics_memory_mib : memory for the layer statistics H and their use, MiB (see
        ``STATISTICS_MEMORY_MIB``); layers whose full H does not fit their share use a
        block-diagonal H, and if even the smallest blocks do not fit the run stops with a ``ConfigError``.
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
    target_bpw: float | None = None
    target_mib: float | None = None
    finetune: FinetuneConfig | None = None
    statistics_memory_mib: float = STATISTICS_MEMORY_MIB

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
        if self.min_elements is not None and self.min_elements < 1:
            raise ConfigError(f"min_elements={self.min_elements} must be >= 1")
        if self.block_size not in ("small", "large"):
            raise ConfigError(f"block_size={self.block_size!r} must be 'small' or 'large'")
        if self.subvector_dim is not None and not 1 <= self.subvector_dim <= 64:
            raise ConfigError(f"subvector_dim={self.subvector_dim} must be between 1 and 64")
        if not 2 <= self.n_codewords <= 256:
            raise ConfigError(f"n_codewords={self.n_codewords} must be between 2 and 256 (uint8 indices)")
        if self.kmeans_iters < 0:
            raise ConfigError(f"kmeans_iters={self.kmeans_iters} must be >= 0")
        if self.target_bpw is not None and self.target_mib is not None:
            raise ConfigError("give either target_bpw or target_mib, not both")
        if self.target_bpw is not None and not 0 < self.target_bpw <= 32:
            raise ConfigError(f"target_bpw={self.target_bpw} must be in (0, 32] bits per weight")
        if self.target_mib is not None and self.target_mib <= 0:
            raise ConfigError(f"target_mib={self.target_mib} must be positive")
        if self.permute_iters < 0:
            raise ConfigError(f"permute_iters={self.permute_iters} must be >= 0")
        if self.sequential < 0:
            raise ConfigError(f"sequential={self.sequential} must be >= 0")
        if not self.statistics_memory_mib > 0:
            raise ConfigError(f"statistics_memory_mib={self.statistics_memory_mib} must be positive")
        if self.calibration_samples < 1:
            raise ConfigError(f"calibration_samples={self.calibration_samples} must be >= 1")

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
    def all_op_types(self) -> bool:
        return "all" in self.op_types

    def to_json(self) -> dict[str, Any]:
        """The settings as plain JSON values, for the report and ``metadata_props``."""
        return asdict(self)
