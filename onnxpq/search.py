"""The smallest size budget whose compressed model passes the accuracy gate (``--target-bpw auto``).

Everything a ``--target-bpw`` run spends before its final quantization (statistics, and the allocator's quick
estimate of every setting of every layer with its measured output error) does not depend on the budget, so
the pipeline does it once; a try then costs choosing the settings for its budget, building the model and one
validation run. There are two kinds of tries:

- ``estimate``: the model built from the allocator's quick quantizations of the chosen settings. Nearly free,
  and pessimistic: the real quantizer (error feedback, exact refit, shrinkage) is better on every layer.
- ``final``: the chosen settings quantized for real (the pipeline quantizes each layer and setting once for
  the whole search), the model the user gets.

The search brackets the gate's threshold with estimates, then with finals, each time trying the budget the
measured rate-degradation curve predicts (log-degradation interpolated between the bracket's ends, kept away
from them so the bracket always shrinks). The finals start at the smallest budget whose estimate passed, then
step to where the estimate curve, scaled through the last final (the measured ratio of final to estimate
degradation), predicts the threshold. The search stops when the final bracket is ``tolerance`` wide, at the
smallest budget passing, or when its tries are spent (``converged`` says which); the winner is the smallest
budget whose final passed, so it always passed. With a degradation that is not monotone in the budget, a
smaller budget than the winner may pass too, and a larger one may fail.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import onnx

from onnxpq.config import CompressConfig
from onnxpq.encode import encode_weights
from onnxpq.model.files import serialized
from onnxpq.quantize.allocate import Allocation, Pricing, allocate, budget_bits
from onnxpq.quantize.bias import BiasTarget, result_biases
from onnxpq.quantize.layer import LayerResult
from onnxpq.quantize.selection import Candidate
from onnxpq.quantize.size import float_parameters
from onnxpq.validate import Gate

__all__ = [
    "ESTIMATE_TRIES",
    "FINAL_TRIES",
    "RESCUE_TRIES",
    "TOLERANCE_BPW",
    "Search",
    "Try",
    "find_budget",
    "search_allocation",
]

#: Width in bits/weight at which a bracket stops shrinking: the winner is then at most this far above the
#: smallest passing budget (for a degradation monotone in the budget).
TOLERANCE_BPW = 0.1
#: Tries of each kind. Estimates cost one validation run each; finals also quantize the layers whose setting
#: no earlier final had, so their number bounds the search's cost against one ``--target-bpw`` run.
ESTIMATE_TRIES = 8
FINAL_TRIES = 4
#: Finals allowed beyond ``FINAL_TRIES`` while none has passed (see ``_finals``).
RESCUE_TRIES = 3
#: Where in a bracket the next try may fall, as fractions of its width: a prediction near an end would shrink
#: it by almost nothing.
_SAFE = (0.15, 0.85)
#: Budgets on which the predicted final curve is searched for its first passing point.
_GRID = 400


@dataclass(frozen=True)
class Try:
    """One budget tried: its size, which quantizer built it, its gate degradation and whether it passed."""

    bits_per_weight: float
    kind: str
    degradation: float
    passed: bool
    seconds: float

    def line(self, metric: str, threshold: float) -> str:
        """The try as the line printed while searching."""
        verdict = "pass" if self.passed else "fail"
        return (
            f"search: {self.bits_per_weight:.3f} bits/weight ({self.kind}): {metric} degradation "
            f"{self.degradation:.4g} {'<=' if self.passed else '>'} {threshold:g} {verdict} ({self.seconds:.1f} s)"
        )


@dataclass(frozen=True)
class Search:
    """The tries in the order they ran, the winner (smallest passing final; None when no final passed) and,
    without a winner, the budget whose final degraded least (the model kept for inspection) and why."""

    range_bpw: tuple[float, float]
    threshold: float
    tries: list[Try]
    winner: float | None
    best: float
    reason: str | None
    converged: bool
    metric: str = ""

    def to_json(self) -> dict[str, object]:
        """The report's ``search`` section: the gate, the range searched, the outcome and every try."""
        return {
            "metric": self.metric,
            "max_degradation": self.threshold,
            "range_bits_per_weight": list(self.range_bpw),
            "winner_bits_per_weight": self.winner,
            "converged": self.converged,
            "kept_bits_per_weight": self.best,
            "reason": self.reason,
            "tries": [asdict(t) for t in self.tries],
        }


Measure = Callable[[float, str], float]
#: Quantizes the compressed ones of a list of candidates for real, by weight name.
Quantizer = Callable[[Sequence[Candidate]], dict[str, LayerResult]]


def search_allocation(
    model: onnx.ModelProto,
    pricing: Pricing,
    config: CompressConfig,
    gate: Gate,
    quantize: Quantizer,
    targets: Mapping[str, BiasTarget],
    on_try: Callable[[Try], None] | None = None,
) -> tuple[Allocation, Search]:
    """The allocation of the smallest budget whose model passes ``gate`` (or, when none does, of the budget
    that degraded least), with the search that found it. ``quantize`` builds the finals; ``targets`` are the
    biases that absorb each layer's mean output shift."""
    total = float_parameters(model)
    uncompressed = -budget_bits(model, pricing.candidates, target_bpw=0.0)  # the float parameters' bits
    least, most = pricing.bits_range()
    lo, hi = (least + uncompressed) / total, (most + uncompressed) / total
    while budget_bits(model, pricing.candidates, target_bpw=lo) < least:  # round-off: lo must be reachable
        lo = math.nextafter(lo, math.inf)
    allocations: dict[float, Allocation] = {}

    def measure(bpw: float, kind: str) -> float:
        if bpw not in allocations:
            budget = budget_bits(model, pricing.candidates, target_bpw=bpw)
            numeric = replace(config, target_bpw=bpw, target_mib=None)  # what --target-bpw FOUND will say
            allocations[bpw] = allocate(model, pricing, numeric, budget)
        found = allocations[bpw]
        if kind == "estimate":
            results = {n: o.result for n, o in found.chosen.items() if o.result is not None}
        else:
            results = quantize(found.candidates)
        return gate.degradation(serialized(built_model(model, results, targets)))

    search = replace(find_budget((lo, max(lo, hi)), measure, gate.max_degradation, on_try=on_try), metric=gate.metric)
    return allocations[search.best], search


def built_model(
    model: onnx.ModelProto, results: Mapping[str, LayerResult], targets: Mapping[str, BiasTarget]
) -> onnx.ModelProto:
    """The compressed model of a try: the decode chains and the corrected biases, without metadata."""
    biases = result_biases(model, targets, results)
    return encode_weights(model, [r.quantized for r in results.values()], metadata={}, constants=biases)


class _Bracket:
    """The tries of one kind so far: the largest failing and the smallest passing budget."""

    def __init__(self) -> None:
        self.fail: tuple[float, float] | None = None
        self.passed: tuple[float, float] | None = None

    def add(self, bpw: float, degradation: float, ok: bool) -> None:
        """Keep the try if it narrows the bracket (a larger failing or a smaller passing budget)."""
        if ok and (self.passed is None or bpw < self.passed[0]):
            self.passed = (bpw, degradation)
        if not ok and (self.fail is None or bpw > self.fail[0]):
            self.fail = (bpw, degradation)

    def width(self) -> float:
        """Bits/weight between the largest failing and the smallest passing try; infinite until both exist."""
        if self.fail is None or self.passed is None:
            return math.inf
        return self.passed[0] - self.fail[0]

    def closed(self, tolerance: float) -> bool:
        """At most ``tolerance`` wide, round-off aside (a step of exactly the tolerance closes it)."""
        return self.width() <= tolerance * (1 + 1e-9)


def find_budget(
    bounds: tuple[float, float],
    measure: Measure,
    threshold: float,
    *,
    tolerance: float = TOLERANCE_BPW,
    estimate_tries: int = ESTIMATE_TRIES,
    final_tries: int = FINAL_TRIES,
    on_try: Callable[[Try], None] | None = None,
) -> Search:
    """Search ``bounds`` (bits/weight: the smallest reachable, the largest without float layers) for the
    smallest budget whose ``measure(bpw, "final")`` degradation is at most ``threshold``."""
    lo, hi = bounds
    tries: list[Try] = []

    def run(bpw: float, kind: str) -> Try:
        start = time.perf_counter()
        degradation = measure(bpw, kind)
        if not math.isfinite(degradation):  # NaN or Inf outputs: the worst a try can be, and ordered
            degradation = math.inf
        done = Try(bpw, kind, degradation, degradation <= threshold, time.perf_counter() - start)
        tries.append(done)
        if on_try is not None:
            on_try(done)
        return done

    estimates = _bracket(lo, hi, lambda b: run(b, "estimate"), threshold, tolerance, estimate_tries)
    curve = sorted((t.bits_per_weight, t.degradation) for t in tries)
    start = estimates.passed[0] if estimates.passed is not None else hi
    finals = _finals(lo, hi, start, curve, lambda b: run(b, "final"), threshold, tolerance, final_tries)
    done = [t for t in tries if t.kind == "final"]
    if finals.passed is not None:
        winner = finals.passed[0]
        converged = finals.closed(tolerance) or winner <= lo
        return Search(bounds, threshold, tries, winner, winner, None, converged)
    best = min(done, key=lambda t: (t.degradation, -t.bits_per_weight))
    largest = max(t.bits_per_weight for t in done)
    what = "every layer compressed at its largest setting" if largest >= hi else f"the largest tried; up to {hi:.3f}"
    reason = (
        f"no budget up to {largest:.3f} bits/weight ({what}) passes: the least degradation "
        f"{best.degradation:.4g} at {best.bits_per_weight:.3f} bits/weight"
    )
    return Search(bounds, threshold, tries, None, best.bits_per_weight, reason, largest >= hi)


def _bracket(
    lo: float, hi: float, run: Callable[[float], Try], threshold: float, tolerance: float, budget: int
) -> _Bracket:
    """Bracket the threshold with tries of one kind: the largest budget first (nothing passes if it fails),
    then the smallest, then predictions inside the bracket until it is ``tolerance`` wide."""
    bracket = _Bracket()
    for bpw in (hi, lo):
        t = run(bpw)
        bracket.add(bpw, t.degradation, t.passed)
        if t.passed == (bpw == lo) or hi - lo <= tolerance:  # nothing passes, or everything does
            return bracket
    while not bracket.closed(tolerance) and budget > 2:
        budget -= 1
        t = run(_inside(bracket, threshold))
        bracket.add(t.bits_per_weight, t.degradation, t.passed)
    return bracket


def _finals(
    lo: float,
    hi: float,
    start: float,
    curve: Sequence[tuple[float, float]],
    run: Callable[[float], Try],
    threshold: float,
    tolerance: float,
    budget: int,
) -> _Bracket:
    """Bracket the threshold with finals, from ``start`` (where the estimates first pass), stepping to where
    the estimate ``curve`` scaled by the measured final/estimate ratio predicts the threshold.

    While no final has passed, the steps up at least double and ``RESCUE_TRIES`` more tries are allowed, the
    last at ``hi``: where the degradation sits on a plateau the prediction keeps stepping short of a pass. (A
    two-input zoo model failed at 3.43, 3.65 and 3.80 bits/weight with the same degradation, then got the whole
    range's top, 8.3 bits/weight, as the winner.)
    """
    bracket = _Bracket()
    bpw, step, tried = start, tolerance, 0
    while True:
        t = run(bpw)
        tried += 1
        bracket.add(bpw, t.degradation, t.passed)
        left = (budget if bracket.passed is not None else budget + RESCUE_TRIES) - tried
        if bracket.closed(tolerance) or left <= 0:
            return bracket
        if bracket.fail is not None and bracket.passed is not None:
            bpw = _inside(bracket, threshold)
            continue
        predicted = _predicted(curve, bpw, t.degradation, threshold, lo, hi)
        if t.passed:
            if bpw <= lo:
                return bracket
            bpw = max(lo, min(predicted, bpw - tolerance))
        elif bpw >= hi:
            return bracket
        elif left == 1:  # the last try without a pass: the top, so "nothing passes" holds for the whole range
            bpw = hi
        else:
            bpw, step = min(hi, max(predicted, bpw + step)), 2 * step


#: Ceiling of a degradation on the log scale: an infinite one (NaN outputs) must not make the
#: interpolation NaN.
_CEILING = 1e30


def _log(degradation: float, threshold: float) -> float:
    """A degradation on a log scale, floored (a perfect try has degradation 0) and capped (an infinite one)."""
    return math.log(min(max(degradation, threshold * 1e-3, 1e-30), _CEILING))


def _inside(bracket: _Bracket, threshold: float) -> float:
    """The next budget inside a bracket: where log-degradation, straight between its ends, meets the threshold,
    kept within ``_SAFE`` of the width."""
    assert bracket.fail is not None and bracket.passed is not None
    (b0, d0), (b1, d1) = bracket.fail, bracket.passed
    y0, y1, target = _log(d0, threshold), _log(d1, threshold), _log(threshold, threshold)
    share = (y0 - target) / (y0 - y1) if y0 > y1 else 0.5
    share = min(max(share, _SAFE[0]), _SAFE[1])
    return b0 + share * (b1 - b0)


def _predicted(
    curve: Sequence[tuple[float, float]], bpw: float, degradation: float, threshold: float, lo: float, hi: float
) -> float:
    """The smallest budget at which the estimate curve, scaled so it goes through this final, meets the
    threshold; midway to the end of the range when the curve says nothing."""
    if len(curve) < 2 or degradation <= 0:
        return (lo + bpw) / 2 if degradation <= threshold else (bpw + hi) / 2
    xs = np.array([b for b, _ in curve])
    ys = np.array([_log(d, threshold) for _, d in curve])
    shift = _log(degradation, threshold) - float(np.interp(bpw, xs, ys))
    grid = np.linspace(lo, hi, _GRID)
    ok = np.interp(grid, xs, ys) + shift <= _log(threshold, threshold)
    return float(grid[np.argmax(ok)]) if ok.any() else hi
