"""Bit allocation: give each layer the (d, k) or float setting that meets a size budget at the least error.

The model's output error is estimated as additive over layers, ``Σ_l E_l(setting)``,
where ``E_l`` is the relative output MSE onnxruntime measures on a few calibration
samples with only layer l quantized at that setting (without data: the layer's
relative weight error). Additivity held on MobileNetV2: the summed estimate of a
whole allocation was within 20% of its measured output error. A Lagrangian sweep
picks the settings, then a greedy pass spends what is left of the budget.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from onnxpq.calibration import Dataset
from onnxpq.config import CompressConfig
from onnxpq.errors import ConfigError
from onnxpq.model.graph import constant_tensors
from onnxpq.operators import OP_TYPES
from onnxpq.parallel import Workers, map_tasks
from onnxpq.quantize.bias import BiasTarget, result_biases
from onnxpq.quantize.kmeans import coarsened
from onnxpq.quantize.layer import LayerResult, decoded_weight, layer_rng, quantize_layer
from onnxpq.quantize.layout import input_order
from onnxpq.quantize.probe import OutputProbe
from onnxpq.quantize.selection import Candidate, find_candidates, variants
from onnxpq.quantize.size import float_parameters, layer_bits, pqf_sizes
from onnxpq.quantize.stats import LayerStats

__all__ = [
    "Allocation",
    "Option",
    "Pricing",
    "allocate",
    "budget_bits",
    "budget_candidates",
    "choose",
    "fixed_layout_budget",
    "output_errors",
    "price_settings",
    "probe_split",
]

#: With at least this many times ``probe_samples`` calibration samples, the probe samples are held out of the
#: statistics.
HOLD_OUT_FACTOR = 4
#: Floor for errors on a log scale: an exact setting has zero error.
_TINY = 1e-12
#: Output error below which even a layer's coarsest setting counts as not moving the outputs at all
#: (the samples never reach the layer; see ``_default_option``). 8-bit rounding of a real layer measures 1e-6 and up.
_UNEXERCISED = 1e-10
#: Estimate codes from this size on wait on disk (``_Spill``).
SPILL_BYTES = 1 << 20


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


#: Smallest weights offered to the allocator, tried in turn while a budget is out of reach and the user
#: set no ``--min-elements``: a small UNet (every conv 512-576 weights) could not reach 2.5 bits/weight
#: at the default floor of 1024, although codebooks of its convs cost a tenth of their float bits.
BUDGET_FLOORS = (256, 64, 1)


def _least_bits(model: onnx.ModelProto, candidates: Sequence[Candidate], config: CompressConfig) -> float:
    """The budget's shortfall at every layer's smallest setting (<= 0: reachable), known before any statistics."""
    budget = budget_bits(model, candidates, target_bpw=config.target_bpw, target_mib=config.target_mib)
    return sum(min(layer_bits(v) for v in variants(c)) for c in candidates if c.compressed) - budget


def _widened(config: CompressConfig) -> Iterator[tuple[CompressConfig, str]]:
    """Wider selections for an unreachable budget, narrowest first, each with the note that says so.

    1. Smaller weights (``BUDGET_FLOORS``), when ``min_elements`` was left to its default.
    2. Then every float constant at the last floor (``--op-types all``: an Einsum's, a contrib operator's weights), when
       ``op_types`` was left to its default; the allocator still keeps in float what costs too much error.
    """
    floor = config.min_size
    if config.min_elements is None:
        for floor in BUDGET_FLOORS:
            yield replace(config, min_elements=floor), f"weights of {floor} elements and more (--min-elements {floor})"
    if config.op_types == OP_TYPES:
        every = f"every float constant of 2 or more axes and {floor} elements or more (--op-types all)"
        yield replace(config, min_elements=floor, op_types=("all",)), every


def fixed_layout_budget(model: onnx.ModelProto, config: CompressConfig) -> CompressConfig:
    """``config`` with the budget its fixed layout would spend (``CompressConfig.auto_budget``): PQF's size of
    the model with every selected layer at its ``block_size``/``subvector_dim``/``n_codewords`` layout, as bits
    per weight. Unchanged when that layout compresses nothing: there is nothing to spread."""
    candidates = find_candidates(model, config)
    if not any(c.compressed for c in candidates):
        return config
    return replace(config, target_bpw=pqf_sizes(model, candidates)["bits_per_weight_all_parameters"])


def budget_candidates(
    model: onnx.ModelProto, config: CompressConfig
) -> tuple[list[Candidate], CompressConfig, str | None]:
    """The candidates for ``config``, with the selection widened when its size budget is otherwise out of reach.

    Returns the candidates, the config that selected them (recorded in the output's metadata) and a note
    naming the widening, or None. Only defaults are widened (``_widened``): an explicit ``--min-elements``
    or ``--op-types`` is kept, and a budget that even the widest selection misses fails in ``allocate``
    with the layers kept in float. A budget search (``AUTO``) searches the default selection's sizes.
    """
    candidates = find_candidates(model, config)
    if not config.has_budget or config.searches_budget or _least_bits(model, candidates, config) <= 0:
        return candidates, config, None
    for wider, what in _widened(config):
        candidates, config = find_candidates(model, wider), wider
        if _least_bits(model, candidates, config) <= 0:
            return candidates, config, f"the size budget is out of reach at the default selection: compressing {what}"
    return candidates, config, None


#: Layers named in the unreachable-budget message, largest first.
INFEASIBLE_SHOWN = 5


def _kept_in_float(candidates: Sequence[Candidate]) -> str:
    """The largest layers the selection keeps in float, each with its size, reason and the option that changes it."""
    kept = sorted((c for c in candidates if not c.compressed), key=lambda c: (-c.size, c.name))
    if not kept:
        return ""
    parts = []
    for c in kept[:INFEASIBLE_SHOWN]:
        nbytes = c.size * onnx.helper.tensor_dtype_to_np_dtype(c.dtype).itemsize
        change = f"; change with {c.fix}" if c.fix else ""
        parts.append(f"{c.node_names[0] if c.uses else c.name} ({nbytes / 1024:.1f} KiB, {c.skip_reason}{change})")
    more = f" and {len(kept) - INFEASIBLE_SHOWN} more" if len(kept) > INFEASIBLE_SHOWN else ""
    return f"; layers kept in float, largest first: {', '.join(parts)}{more}"


def _infeasible(
    model: onnx.ModelProto, config: CompressConfig, candidates: Sequence[Candidate], budget: float, smallest: float
) -> str:
    """Say how small this model can get, in the unit the user asked in, and which float layers stop it."""
    if config.target_bpw is not None:
        least = config.target_bpw + (smallest - budget) / float_parameters(model)
        head = (
            f"--target-bpw {config.target_bpw} is below the smallest size this model reaches, {least:.3f} bits/weight"
        )
    else:
        least = config.target_mib + (smallest - budget) / 8 / 2**20
        head = f"--target-size {config.target_mib} MiB is below the smallest size this model reaches, {least:.3f} MiB"
    other = float_parameters(model) - sum(c.size for c in candidates)
    rest = f"; {other} other float parameters (biases, norms ...) stay at 32 bits" if other > 0 else ""
    return head + _kept_in_float(candidates) + rest


def _least(options: Mapping[str, Sequence[Option]]) -> int:
    """Bits of every layer at its smallest option: the least the budget must hold."""
    return sum(min(o.bits for o in opts) for opts in options.values())


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


def layer_error(result: LayerResult) -> float:
    """A layer's own relative error: on its outputs with data, on its weights without."""
    e = result.error
    return e.output_rel if e.output_rel is not None else e.rel_l2**2


def probe_split(dataset: Dataset, samples: int) -> tuple[Dataset, Dataset]:
    """(samples the allocator measures errors on, samples the quantizer fits its statistics to).

    Measured on the samples a layer was fitted to, a setting looks better than it
    is wherever the fit can overfit, as in a layer with fewer input rows than
    inputs (a classifier after global pooling sees one row per sample). Held-out
    samples give an unbiased estimate for new samples from the same source, so
    they are kept out of the statistics when there are enough to spare. (On
    MobileNetV2 the bias was small: the classifier's estimate rose by 4 %.)
    """
    fit = dataset if dataset.n_samples < HOLD_OUT_FACTOR * samples else dataset.skip(samples)
    return dataset.head(samples), fit


def output_errors(
    model: onnx.ModelProto,
    tried: Mapping[str, Sequence[LayerResult]],
    dataset: Dataset,
    targets: Mapping[str, BiasTarget],
    config: CompressConfig,
    *,
    progress: bool = False,
) -> dict[str, list[float]]:
    """Per layer and setting: the model's relative output MSE with only that layer quantized at that setting.

    Measured rather than scaled from one setting: on MobileNetV2 the error
    reaching the outputs grows faster than the layer's own error once the
    subvectors get long (up to 2.8x more than a linear scaling predicted), which
    made the allocator starve its two largest layers. Only ``config.measured_settings``
    settings per layer are run, on ``config.probe_samples`` samples; the others are read off the curve through them
    (see ``_through``).
    """
    from tqdm.auto import tqdm

    layers = {n: {n, targets[n].tensor} if n in targets else {n} for n in tried}
    probe = OutputProbe(model, layers, dataset, config.probe_samples)
    out = {}
    for name in tqdm(probe.order, desc="measure settings", unit="layer", disable=not progress, leave=False):
        results = tried[name]
        own = np.array([layer_error(r) for r in results])
        anchors = _anchors(own, config.measured_settings)
        measured = [probe.error(name, _decoded_values(model, name, results[i], targets)) for i in anchors]
        out[name] = _through(own[anchors], np.array(measured), own).tolist()
    return out


def _anchors(own: np.ndarray, count: int) -> np.ndarray:
    """The settings to measure: the least and largest own error and evenly spaced ranks between."""
    order = np.argsort(own, kind="stable")
    ranks = np.round(np.linspace(0, len(own) - 1, min(count, len(own)))).astype(int)
    return np.unique(order[ranks])


def _through(own_at: np.ndarray, measured: np.ndarray, own: np.ndarray) -> np.ndarray:
    """Output error at every setting, piecewise linear in log-log through the measured points.

    A layer's output error rises monotonically with its own error; between
    measured points the log-log curve is close to straight.
    """
    x, order = np.unique(np.log(np.maximum(own_at, _TINY)), return_index=True)
    y = np.log(np.maximum(measured[order], _TINY))
    return np.exp(np.interp(np.log(np.maximum(own, _TINY)), x, y))


def _decoded_values(
    model: onnx.ModelProto, name: str, result: LayerResult, targets: Mapping[str, BiasTarget]
) -> dict[str, np.ndarray]:
    """The decoded weight with the corrected bias that goes with it."""
    return {name: decoded_weight(result.quantized), **result_biases(model, targets, {name: result})}


@dataclass(frozen=True)
class Allocation:
    """What the allocator chose: the candidates with their final layouts, the budget, and per compressed layer
    the error its chosen setting alone puts on the model outputs (relative MSE; weight error without data)."""

    candidates: list[Candidate]
    budget_bits: float
    output_error: dict[str, float]
    unexercised: list[str]
    chosen: dict[str, Option]


@dataclass(frozen=True)
class Pricing:
    """Every setting of every compressed layer with its size and estimated cost: what the allocator chooses
    from, whatever the budget (``allocate`` fits one budget; a budget search fits many from one pricing)."""

    candidates: list[Candidate]
    options: dict[str, list[Option]]
    unexercised: list[str]

    def bits_range(self) -> tuple[int, int]:
        """(the fewest bits the compressed layers can take, the most they take with none kept in float)."""
        least = _least(self.options)
        most = sum(max(o.bits for o in opts if o.result is not None) for opts in self.options.values())
        return least, most


def price_settings(
    model: onnx.ModelProto,
    candidates: Sequence[Candidate],
    config: CompressConfig,
    *,
    stats: Mapping[str, LayerStats],
    calibration: Dataset | None,
    targets: Mapping[str, BiasTarget],
    progress: bool = False,
    workers: Workers | None = None,
) -> Pricing:
    """Quantize every layer at each of its ``variants`` and measure each setting's output error.

    The settings are only estimated here, with a cheaper quantizer (no error
    feedback, fewer iterations, no shrinkage grid); the caller quantizes the chosen
    ones for real. Layers are independent, so ``workers`` may estimate them anywhere.
    """
    constants = constant_tensors(model.graph)
    quick = replace(
        config,
        error_feedback=False,
        kmeans_iters=min(config.kmeans_iters, config.estimate_iters),
        refit_tolerance=max(config.refit_tolerance, config.estimate_refit_tolerance),
    )
    todo = [c for c in candidates if c.compressed]

    # One task per (layer, subvector length), largest first: the chains of one large layer (MobileNetV2's
    # classifier holds a third of its weights) then run side by side instead of keeping one worker busy alone.
    chains = sorted(((c, chain) for c in todo for chain in _chains(variants(c))), key=lambda t: -t[0].size * len(t[1]))

    def tasks() -> Iterator[tuple]:
        for c, chain in chains:  # read lazily: one weight per task in flight, not the whole model
            correct = config.bias_correction and c.name in targets and c.name in stats
            yield constants[c.name].to_array(), chain, quick, stats.get(c.name), correct

    with tempfile.TemporaryDirectory(prefix="onnxpq-estimates-", ignore_cleanup_errors=True) as folder:
        estimated = map_tasks(
            _estimate_task,
            tasks(),
            workers or Workers(),
            total=len(chains),
            desc="estimate settings",
            progress=progress,
            then=_Spill(Path(folder)),
        )
    tried: dict[str, list[tuple[Candidate, LayerResult]]] = {c.name: [] for c in todo}
    for (c, chain), rs in zip(chains, estimated, strict=True):
        tried[c.name] += zip(chain, rs, strict=True)
    for c in todo:  # back in ``variants`` order, whatever order the chains ran in
        order = {(v.subvector_dim, v.n_codewords): i for i, v in enumerate(variants(c))}
        tried[c.name].sort(key=lambda vr: order[vr[0].subvector_dim, vr[0].n_codewords])
    results = {n: [r for _, r in t] for n, t in tried.items()}
    if calibration is not None:
        costs = output_errors(model, results, calibration, targets, config, progress=progress)
    else:
        costs = {n: [layer_error(r) for r in rs] for n, rs in results.items()}
    options = {
        c.name: [Option(v, layer_bits(v), cost, r) for (v, r), cost in zip(tried[c.name], costs[c.name], strict=True)]
        + [float_option(c)]
        for c in todo
    }
    unexercised = [c.name for c in todo if calibration is not None and max(costs[c.name]) <= _UNEXERCISED]
    return Pricing(list(candidates), options, unexercised)


def allocate(model: onnx.ModelProto, pricing: Pricing, config: CompressConfig, budget: float) -> Allocation:
    """The settings that fit ``budget`` bits (for the compressed layers) at the least summed cost; a
    ``ConfigError`` naming how small the model can get when even the smallest settings do not fit."""
    by_name = {c.name: c for c in pricing.candidates if c.compressed}
    options = _price_unexercised(pricing.options, pricing.unexercised, by_name, budget)
    smallest = _least(options)
    if smallest > budget:
        raise ConfigError(_infeasible(model, config, pricing.candidates, budget, smallest))
    chosen = choose(options, budget)
    final = [chosen[c.name].candidate if c.name in chosen else c for c in pricing.candidates]
    return Allocation(final, budget, {n: o.cost for n, o in chosen.items()}, pricing.unexercised, chosen)


def _chains(settings: Sequence[Candidate]) -> list[list[Candidate]]:
    """``settings`` cut into runs of one subvector length (``variants`` lists each from the most codewords down)."""
    chains: list[list[Candidate]] = []
    for v in settings:
        if chains and chains[-1][-1].subvector_dim == v.subvector_dim:
            chains[-1].append(v)
        else:
            chains.append([v])
    return chains


class _Spill:
    """Moves each estimate's codes to a file in ``folder`` and maps it back, read-only, as it arrives.

    Every setting of every layer is estimated before any is chosen, and their codes add up to about
    9 bytes per weight (a 108 M-parameter BERT: 1 GB); only a few settings per layer are ever read again
    (the measured ones, the chosen ones), and only their pages come back into memory. The folder is
    deleted as soon as every estimate is in: a mapped file stays readable until its arrays are gone.
    Windows cannot delete a mapped file, so there the codes stay in memory, as they do once a write fails
    (a full disk). Where ``tempfile`` puts the folder is where the codes go (``TMPDIR``; on a tmpfs they
    are in memory again, outside the process).
    """

    def __init__(self, folder: Path) -> None:
        self.folder: Path | None = folder if os.name != "nt" else None
        self.count = 0

    def __call__(self, results: list[LayerResult]) -> list[LayerResult]:
        return [self._spilled(r) for r in results]

    def _spilled(self, result: LayerResult) -> LayerResult:
        book = result.quantized.codebook
        if self.folder is None or book.codes.nbytes < SPILL_BYTES:
            return result
        path = self.folder / f"{self.count}.npy"
        self.count += 1
        try:
            np.save(path, book.codes)
        except OSError:
            self.folder = None
            return result
        codes = np.load(path, mmap_mode="r")
        return replace(result, quantized=replace(result.quantized, codebook=replace(book, codes=codes)))


def _estimate_task(
    array: np.ndarray, chain: Sequence[Candidate], quick: CompressConfig, stats: LayerStats | None, correct: bool
) -> list[LayerResult]:
    """One layer quantized by the allocator's cheaper quantizer at a chain of settings of one subvector
    length, from the most codewords down.

    Each smaller codebook starts from the one before it, coarsened (``kmeans.coarsened``),
    instead of a fresh k-means++ seeding and Lloyd's iterations over the whole layer.
    """
    if stats is not None:  # every setting of the chain reads the inputs in one order (the layout's)
        stats = stats.working(input_order(chain[0]))
        stats = None if stats is None else stats.with_covariance()
    results: list[LayerResult] = []
    for v in chain:
        init = (
            coarsened(results[-1].quantized.codebook, v.n_codewords, layer_rng(quick.seed, v.name)) if results else None
        )
        results.append(
            quantize_layer(
                array, v, quick, stats, correct_bias=correct, shrinkage=False, init=init, fit_units=quick.estimate_units
            )
        )
    return results


def _price_unexercised(
    options: Mapping[str, list[Option]], unexercised: Sequence[str], by_name: Mapping[str, Candidate], budget: float
) -> dict[str, list[Option]]:
    """The options of the layers the calibration samples never move: their default setting alone, or, when
    those defaults would break the budget, every setting priced at a typical layer's sensitivity.

    That typical sensitivity is the median, over the layers the data does price, of measured output error per
    unit of own (weight-space) error: with nothing known about a layer, its own error times that ratio is the
    best guess of what it would cost, and it lets the budget be met by the layers where bits buy least. (A
    small ReLU6 CNN with random weights, permuted, had ten such layers whose defaults alone overshot 2.5
    bits/weight, a budget it reached unpermuted.)
    """
    defaults = {n: [_default_option(by_name[n], options[n])] for n in unexercised}
    fixed = {**options, **defaults}
    if not unexercised or _least(fixed) <= budget:
        return fixed
    ratios = [
        o.cost / layer_error(o.result)
        for name, opts in options.items()
        if name not in defaults
        for o in opts
        if o.result is not None and layer_error(o.result) > 0
    ]
    scale = float(np.median(ratios)) if ratios else 1.0
    guessed = {
        n: [replace(o, cost=scale * layer_error(o.result)) if o.result is not None else o for o in options[n]]
        for n in unexercised
    }
    return {**options, **guessed}


def _default_option(c: Candidate, options: Sequence[Option]) -> Option:
    """The option at the layer's default setting (``selection``'s d and k), for a layer the data cannot price.

    When no setting moves the outputs on the calibration samples, not even the
    coarsest, the samples never exercise the layer: an ``If`` branch that did not
    run, a recurrent state that is always zero (Silero VAD calibrated from a zero
    state put its LSTM's recurrent weights at 0.5 bits/weight, and its speech
    probabilities moved by up to 0.96 on streamed audio). Pricing it at zero would
    give it the fewest bits; it keeps the default setting instead.
    """
    same = [o for o in options if o.candidate.subvector_dim == c.subvector_dim and o.result is not None]
    exact = [o for o in same if o.candidate.n_codewords == c.n_codewords]
    return (exact or same or [o for o in options if o.result is not None])[0]
