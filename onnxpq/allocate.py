"""Bit allocation: give each layer the (d, k) or float setting that meets a size budget at the least error.

The model's output error is estimated as additive over layers,
``Σ_l s_l · e_l(setting)``, where ``e_l`` is layer l's relative output error
‖X(W - Ŵ)‖²/‖XW‖² at that setting (measured on the calibration statistics, or
the weight error without data) and ``s_l`` is how much of it reaches the model
outputs: the relative output MSE onnxruntime measures with only layer l
quantized, divided by ``e_l`` at the default setting. A Lagrangian sweep picks
the settings, then a greedy pass spends what is left of the budget.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx

from onnxpq.bias import BiasTarget, corrected_biases
from onnxpq.calibration import Dataset
from onnxpq.config import CompressConfig
from onnxpq.encode import replace_constants
from onnxpq.errors import ConfigError
from onnxpq.graph import serialized
from onnxpq.quantize import LayerResult, decoded_weight, quantize_layer
from onnxpq.report import float_parameters, layer_bits
from onnxpq.selection import Candidate, variants
from onnxpq.stats import LayerStats

__all__ = ["Allocation", "Option", "allocate_bits", "budget_bits", "choose", "sensitivities"]

#: Samples used to measure each layer's sensitivity: enough for a stable mean, cheap per layer.
SENSITIVITY_SAMPLES = 32


@dataclass(frozen=True)
class Option:
    """One setting of one layer: its candidate layout (``skip_reason`` set for float), size and estimated cost."""

    candidate: Candidate
    bits: int
    cost: float
    result: LayerResult | None


def float_option(c: Candidate) -> Option:
    """Keeping the layer in float: 32 bits per weight in PQF's accounting, no error."""
    kept = replace(c, subvector_dim=0, n_codewords=0, skip_reason="kept in float by the bit allocation")
    return Option(kept, 32 * c.size, 0.0, None)


def budget_bits(
    model: onnx.ModelProto,
    candidates: Sequence[Candidate],
    *,
    target_bpw: float | None = None,
    target_mib: float | None = None,
) -> float:
    """Bits left for the compressible layers once every other float parameter is counted at 32 bits."""
    total = float_parameters(model)
    budget = target_bpw * total if target_bpw is not None else float(target_mib) * 8 * 2**20
    fixed = 32 * (total - sum(c.size for c in candidates if c.compressed))
    return budget - fixed


def _infeasible(model: onnx.ModelProto, config: CompressConfig, budget: float, smallest: float) -> str:
    """Say how small this model can get, in the unit the user asked in."""
    if config.target_bpw is not None:
        least = config.target_bpw + (smallest - budget) / float_parameters(model)
        return (
            f"--target-bpw {config.target_bpw} is below the smallest size this model reaches, {least:.3f} bits/weight"
        )
    least = config.target_mib + (smallest - budget) / 8 / 2**20
    return f"--target-size {config.target_mib} MiB is below the smallest size this model reaches, {least:.3f} MiB"


def _pick(options: Mapping[str, Sequence[Option]], lam: float) -> dict[str, Option]:
    return {name: min(opts, key=lambda o: o.cost + lam * o.bits) for name, opts in options.items()}


def _size(chosen: Mapping[str, Option]) -> int:
    return sum(o.bits for o in chosen.values())


def choose(options: Mapping[str, Sequence[Option]], budget: float) -> dict[str, Option]:
    """Settings that fit ``budget`` bits with the least total cost.

    Bisection on the Lagrange multiplier gives the cheapest point of the convex
    hull that fits; greedy upgrades (most cost saved per extra bit first) then
    use the remaining bits. If even the smallest settings do not fit, they are
    returned and the caller reports the overshoot.
    """
    if _size(_pick(options, 0.0)) <= budget:
        return _pick(options, 0.0)
    hi = 1.0
    while _size(_pick(options, hi)) > budget and hi < 1e12:
        hi *= 4.0
    lo = hi * 1e-18
    for _ in range(80):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if _size(_pick(options, mid)) > budget else (lo, mid)
    return _fill(options, _pick(options, hi), budget)


def _fill(options: Mapping[str, Sequence[Option]], chosen: dict[str, Option], budget: float) -> dict[str, Option]:
    """Spend leftover bits on the upgrades that save the most cost per bit."""
    chosen = dict(chosen)
    while True:
        room = budget - _size(chosen)
        best, best_rate = None, 0.0
        for name, opts in options.items():
            now = chosen[name]
            for o in opts:
                extra = o.bits - now.bits
                if 0 < extra <= room and o.cost < now.cost and (now.cost - o.cost) / extra > best_rate:
                    best, best_rate = (name, o), (now.cost - o.cost) / extra
        if best is None:
            return chosen
        chosen[best[0]] = best[1]


def _relative_mse(ref: Sequence[np.ndarray], test: Sequence[np.ndarray]) -> float:
    signal = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in ref)
    noise = sum(float(np.sum((r.astype(np.float64) - t) ** 2)) for r, t in zip(ref, test, strict=True))
    return noise / signal if signal > 0 else noise


def layer_error(result: LayerResult) -> float:
    """The error the allocator trades: relative output error with data, relative weight error without."""
    e = result.error
    return e.output_rel if e.output_rel is not None else e.rel_l2**2


def sensitivities(
    model: onnx.ModelProto,
    results: Mapping[str, LayerResult],
    dataset: Dataset,
    biases: Mapping[str, Mapping[str, np.ndarray]],
    *,
    progress: bool = False,
) -> dict[str, float]:
    """Per layer: the model's relative output MSE with only that layer quantized, over its own output error.

    ``biases`` holds the corrected bias values that go with each layer's result.
    """
    from tqdm.auto import tqdm

    from onnxpq.validate import run_session, session

    sample = dataset.head(SENSITIVITY_SAMPLES)
    reference = run_session(session(serialized(model)), sample, model)
    out = {}
    for name, result in tqdm(results.items(), desc="sensitivity", unit="layer", disable=not progress, leave=False):
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(result.quantized.candidate.dtype)
        replace_constants(probe.graph, {name: decoded_weight(result.quantized).astype(dtype), **biases.get(name, {})})
        mse = _relative_mse(reference, run_session(session(serialized(probe)), sample, model))
        error = layer_error(result)
        out[name] = mse / error if error > 0 else 0.0
    return out


#: Lloyd and output-aware iterations when quantizing a setting only to estimate its error.
ESTIMATE_ITERS = 8


@dataclass(frozen=True)
class Allocation:
    """What the allocator chose: the candidates with their final layouts, the budget and the sensitivities."""

    candidates: list[Candidate]
    budget_bits: float
    sensitivity: dict[str, float]


def allocate_bits(
    model: onnx.ModelProto,
    candidates: Sequence[Candidate],
    config: CompressConfig,
    *,
    stats: Mapping[str, LayerStats],
    calibration: Dataset | None,
    targets: Mapping[str, BiasTarget],
    progress: bool = False,
) -> Allocation:
    """Quantize every layer at each of its ``variants``, measure sensitivities, choose settings to fit the budget.

    The settings are only estimated here, with a cheaper quantizer (no error
    feedback, fewer iterations); the caller quantizes the chosen ones for real.
    """
    from tqdm.auto import tqdm

    from onnxpq.graph import constant_tensors

    constants = constant_tensors(model.graph)
    quick = replace(config, error_feedback=False, kmeans_iters=min(config.kmeans_iters, ESTIMATE_ITERS))
    todo = [c for c in candidates if c.compressed]
    tried: dict[str, list[tuple[Candidate, LayerResult]]] = {}
    for c in tqdm(todo, desc="estimate settings", unit="layer", disable=not progress, leave=False):
        array = constants[c.name].to_array()
        correct = config.bias_correction and c.name in targets and c.name in stats
        tried[c.name] = [
            (v, quantize_layer(array, v, quick, stats.get(c.name), correct_bias=correct)) for v in variants(c)
        ]
    default = {c.name: next(r for v, r in tried[c.name] if v == c) for c in todo}
    if calibration is not None:
        biases = {n: corrected_biases(model, targets, {n: r.shift}) for n, r in default.items() if r.shift is not None}
        sens = sensitivities(model, default, calibration, biases, progress=progress)
    else:
        sens = {n: 1.0 for n in default}
    options = {
        c.name: [Option(v, layer_bits(v), sens[c.name] * layer_error(r), r) for v, r in tried[c.name]]
        + [float_option(c)]
        for c in todo
    }
    budget = budget_bits(model, candidates, target_bpw=config.target_bpw, target_mib=config.target_mib)
    smallest = sum(min(o.bits for o in opts) for opts in options.values())
    if smallest > budget:
        raise ConfigError(_infeasible(model, config, budget, smallest))
    chosen = choose(options, budget)
    final = [chosen[c.name].candidate if c.name in chosen else c for c in candidates]
    return Allocation(final, budget, sens)
