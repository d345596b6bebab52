"""The layer quantizer: cut one weight into subvectors and learn its codebook.

Without calibration data a layer gets (annealed) k-means on its weights. With
the layer's input statistics (``stats``) the codebook and codes are then
refined to minimise the layer's output error, by the steps ``CompressConfig``
selects (see ``output_aware``), and the mean output shift is returned so the
caller can fold it into the bias.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
from onnx import helper

from onnxpq.config import CompressConfig
from onnxpq.quantize import output_aware
from onnxpq.quantize.kmeans import Codebook, kmeans, nearest, residual_energy
from onnxpq.quantize.layout import input_order, unit_matrix, weight_from_units
from onnxpq.quantize.selection import Candidate
from onnxpq.quantize.stats import LayerStats

__all__ = [
    "LayerError",
    "LayerResult",
    "decoded_weight",
    "layer_rng",
    "quantize_layer",
]


@dataclass(frozen=True)
class QuantizedWeight:
    """A candidate weight and the codebook that replaces it."""

    candidate: Candidate
    codebook: Codebook


@dataclass(frozen=True)
class LayerError:
    """How far a decoded weight is from the original, as stored (fp16 codebook included).

    ``output_rel`` is ‖X(W - Ŵ)‖² / ‖XW‖² on the calibration data, None without data.
    ``statistics`` is the form of H the quantizer used (``LayerStats.form``), with a
    ``fallback: ...`` note when the output metric could not be used; None without data.
    """

    sqnr_db: float
    rel_l2: float
    output_rel: float | None = None
    statistics: str | None = None


@dataclass(frozen=True)
class LayerResult:
    """One quantized layer: its codebook, its error, and the mean output shift per unit (None if not computed)."""

    quantized: QuantizedWeight
    error: LayerError
    shift: np.ndarray | None


def layer_rng(seed: int, weight: str) -> np.random.Generator:
    """One generator per weight, derived from the run seed and the weight's name.

    Results then do not depend on the order layers are processed in, so a
    parallel run gives the same bytes as a serial one.
    """
    return np.random.default_rng([seed, zlib.crc32(weight.encode())])


def _sum_squares(a: np.ndarray, b: np.ndarray | None = None, chunk: int = 1 << 22) -> float:
    """Σ (a - b)², accumulated in float64 a chunk at a time: a whole-layer float64 copy of a
    256 MiB weight would cost 1.5 GB of the layer's working set."""
    flat_a = a.reshape(-1)
    flat_b = None if b is None else b.reshape(-1)
    total = 0.0
    for start in range(0, flat_a.size, chunk):
        x = flat_a[start : start + chunk].astype(np.float64)
        if flat_b is not None:
            x -= flat_b[start : start + chunk]
        total += float(np.dot(x, x))
    return total


def weight_error(
    original: np.ndarray, decoded: np.ndarray, output_rel: float | None = None, statistics: str | None = None
) -> LayerError:
    """Signal-to-quantization-noise ratio of a weight, in dB, and its relative L2 error."""
    signal = _sum_squares(original)
    noise = _sum_squares(original, decoded)
    if noise == 0.0:
        return LayerError(float("inf"), 0.0, output_rel, statistics)
    if signal == 0.0:
        return LayerError(float("-inf"), float("inf"), output_rel, statistics)
    return LayerError(10.0 * np.log10(signal / noise), float(np.sqrt(noise / signal)), output_rel, statistics)


def decoded_weight(q: QuantizedWeight) -> np.ndarray:
    """The weight onnxruntime will see: fp16 codewords gathered by the codes, in the weight's shape and dtype."""
    dtype = helper.tensor_dtype_to_np_dtype(q.candidate.dtype)
    return weight_from_units(_decoded_units(q.codebook), q.candidate).astype(dtype, copy=False)


def _decoded_units(book: Codebook) -> np.ndarray:
    table = book.centroids.astype(np.float16).astype(np.float32)
    return table[book.codes]


#: ``LayerError.statistics`` notes for a layer that kept codes chosen without (part of) its output metric.
NO_METRIC = "fallback: H not finite or not positive definite"
NO_FEEDBACK = "fallback: no error feedback (H not positive definite)"


def _metrics(
    stats: LayerStats, centred: bool, cov: np.ndarray, config: CompressConfig, shrinkage: bool
) -> Iterator[np.ndarray]:
    """The damped output metrics H to refine with: one, or with ``shrinkage`` one per shrinkage weight when H
    is rank-deficient.

    Built one at a time (each is R x R float64 per group); none when the layer saw no
    signal, or when its statistics are not finite or, with ``definite`` (error feedback
    factors H), cannot be made positive definite (``output_aware.positive_definite``).
    Without error feedback (the allocator's estimates) the check, a Cholesky of every H,
    is skipped. ``cov``: the statistics' covariance, built once per layer by the caller.
    """
    definite = config.error_feedback
    for rho in [None, *config.shrinkage_grid] if shrinkage and stats.rank_deficient else [None]:
        h = stats.metric(centred, rho, cov)
        if not np.isfinite(h).all() or float(np.max(np.diagonal(h, axis1=1, axis2=2))) <= 0:
            return
        h = output_aware.damped(h, config.damping)
        if definite:  # only error feedback factors H; the other steps are guarded against an indefinite one
            h = output_aware.positive_definite(h)
            if h is None:
                return
        yield h


def _output_rel(units: np.ndarray, book: Codebook, h: np.ndarray, h_noise: np.ndarray | None) -> float:
    """‖X(W - Ŵ)‖² / ‖XW‖² of a codebook on the (unshrunk) calibration statistics."""
    decoded = _decoded_units(book).reshape(units.shape)
    return output_aware.output_error(units, decoded, h, h_noise)


def _refined(
    units: np.ndarray, book: Codebook, stats: LayerStats, config: CompressConfig, centred: bool, shrinkage: bool
) -> tuple[Codebook, float | None, str | None]:
    """The refinement with the least output error on the calibration data, that error, and a fallback note.

    On a rank-deficient H (a classifier after global pooling: one row per sample)
    the refinement chases directions that only a few rows define, and shrinking H
    lowers the error even on the rows it was fitted to. MobileNetV2's classifier
    went from 4.9 % at OAS's ρ = 0.06 to 4.4-4.6 % at ρ from 0.15 to 0.5 (7.9 %
    at 0.9), and on other photos from 7.6 % to 7.0-7.2 %. How much is best
    depends on the layer, so each weight of ``config.shrinkage_grid`` is tried and judged
    on the statistics themselves; OAS's weight is among them, so the choice is
    never worse there than OAS's alone. Without ``shrinkage`` only OAS's weight is
    tried: the allocator's estimates, where the grid cost four refinements of the
    largest layer for each of its settings. No metric at all (non-finite statistics)
    leaves the weight-space codebook, with the note ``NO_METRIC``.
    """
    cov = stats.covariance()
    best, best_error, note = book, None, NO_METRIC
    for h in _metrics(stats, centred, cov, config, shrinkage):
        option, fed_back = _refine(units, book, h, config)
        error = _output_rel(units, option, stats.hessian, cov if centred else None)
        if best_error is None or error < best_error:
            best, best_error, note = option, error, None if fed_back else NO_FEEDBACK
    return best, best_error, note


def _refine(units: np.ndarray, book: Codebook, h: np.ndarray, config: CompressConfig) -> tuple[Codebook, bool]:
    """Move codes and codewords from the weight-space optimum towards the output-space one.

    Also says whether error feedback ran as asked: where H cannot be factored the
    output-aware (block-diagonal) codes are kept instead.
    """
    d = book.centroids.shape[1]
    centroids, codes = book.centroids.astype(np.float64), book.codes
    if config.output_aware:
        blocks = output_aware.block_diagonal(h, d)
        for _ in range(config.kmeans_iters):
            new_codes = output_aware.assign(units, centroids, blocks)
            centroids = output_aware.update(units, new_codes, centroids, blocks)
            changed = np.count_nonzero(new_codes != codes)
            codes = new_codes
            if changed <= config.kmeans_tolerance * len(codes):
                break
    fed_back = True
    if config.error_feedback:
        fed = output_aware.error_feedback(units, centroids, h)
        fed_back = fed is not None
        codes = codes if fed is None else fed
    if config.refit:
        centroids = output_aware.refit(units, codes, centroids, h, tol=config.refit_tolerance)
    centroids = centroids.astype(np.float32)
    inertia = residual_energy(units.reshape(-1, d), centroids, codes)
    return Codebook(centroids=centroids, codes=codes, inertia=inertia), fed_back


def quantize_layer(
    array: np.ndarray,
    candidate: Candidate,
    config: CompressConfig,
    stats: LayerStats | None = None,
    *,
    correct_bias: bool = False,
    shrinkage: bool = True,
    init: np.ndarray | None = None,
    fit_units: int | None = None,
) -> LayerResult:
    """Quantize one weight; with ``stats``, minimise its output error and measure its mean output shift.

    Block-diagonal statistics (``LayerStats.blocks`` > 1) are used by cutting each
    unit into its column blocks, each (unit group, block) pair a group of its own:
    the quantizers, which already take one H per group, then run unchanged.
    Statistics that cannot be used (non-finite, not positive definite even after
    damping) leave the layer with the weight-space codes; ``LayerError.statistics`` says so.
    ``init``: starting codewords for k-means instead of its seeding (``kmeans.coarsened``).
    ``fit_units``: learn the codebook on about this many units only (``_sample_rows``), then code every
    unit with it: the bit allocator's estimates of large layers.
    """
    units = unit_matrix(array, candidate)
    d = candidate.subvector_dim
    rng = layer_rng(config.seed, candidate.name)
    k, iters = candidate.n_codewords, config.kmeans_iters
    if stats is not None:
        stats = stats.working(input_order(candidate))
    groups = stats.groups // stats.blocks if stats is not None else 1  # unit groups; blocks cut columns
    rows = _sample_rows(units.shape, d, k, groups, fit_units, config.sample_per_codeword)
    fitted = units if rows is None else units[rows]
    book = kmeans(
        fitted.reshape(-1, d),
        k,
        n_iter=iters,
        rng=rng,
        anneal=config.anneal,
        init=init,
        tolerance=config.kmeans_tolerance,
    )
    output_rel = shift = form = None
    if stats is not None:
        book, output_rel, form = _with_stats(fitted, book, stats, config, correct_bias, shrinkage)
    if rows is not None:
        book, output_rel = _coded_by(units, book, stats if output_rel is not None else None, correct_bias, config)
    # Kept until encoding: int64 codes of every layer would hold 8 bytes per subvector for the whole run.
    q = QuantizedWeight(candidate, replace(book, codes=book.codes.astype(np.min_scalar_type(k - 1))))
    del book  # the int64 codes: decoded from q's, the layer's largest arrays are not held twice
    decoded = _decoded_units(q.codebook).reshape(units.shape)
    if output_rel is not None and correct_bias:
        shift = _mean_shift(_blocked(units, stats), _blocked(decoded, stats), stats)
    error = weight_error(array, weight_from_units(decoded, candidate), output_rel, form)
    return LayerResult(q, error, shift)


def _sample_rows(
    shape: tuple[int, int], d: int, k: int, groups: int, fit_units: int | None, per_codeword: int
) -> np.ndarray | None:
    """Evenly spaced units, as many from each group, at least ``fit_units`` of them and enough for
    ``per_codeword`` subvectors per codeword; None when that is (nearly) all of them."""
    n, r = shape
    if fit_units is None:
        return None
    per_group = n // groups
    wanted = max(fit_units, math.ceil(per_codeword * k * d / r))
    take = math.ceil(wanted / groups)
    if 2 * take > per_group:
        return None
    within = np.round(np.linspace(0, per_group - 1, take)).astype(np.int64)
    return (np.arange(groups)[:, None] * per_group + within[None, :]).ravel()


def _coded_by(
    units: np.ndarray, book: Codebook, stats: LayerStats | None, centred: bool, config: CompressConfig
) -> tuple[Codebook, float | None]:
    """Every unit coded with a codebook fitted on a sample of them, and the output error over all units.

    With usable statistics the codes minimise each subvector's error in the block-diagonal
    output metric (the E-step the sample's refinement ran); without, the nearest codeword.
    """
    d = book.centroids.shape[1]
    centroids = book.centroids
    if stats is None:
        codes = nearest(units.reshape(-1, d), centroids)
        return Codebook(centroids, codes, residual_energy(units.reshape(-1, d), centroids, codes)), None
    cov = stats.covariance()
    blocked = _blocked(units, stats)
    metric = output_aware.damped(stats.metric(centred, None, cov), config.damping)
    local = output_aware.assign(blocked, centroids, output_aware.block_diagonal(metric, d))
    output_rel = _output_rel(blocked, Codebook(centroids, local, 0.0), stats.hessian, cov if centred else None)
    codes = _unblocked(local.reshape(len(blocked), -1), stats).ravel()
    return Codebook(centroids, codes, residual_energy(units.reshape(-1, d), centroids, codes)), output_rel


def _with_stats(
    units: np.ndarray, book: Codebook, stats: LayerStats, config: CompressConfig, centred: bool, shrinkage: bool
) -> tuple[Codebook, float | None, str]:
    """``_refined`` in the statistics' block layout, codes mapped back; and the form of H used, with any fallback."""
    d = book.centroids.shape[1]
    if stats.block % d:
        return book, None, f"{stats.form}; fallback: subvectors of {d} straddle its blocks"
    n = len(units)
    local = replace(book, codes=_blocked(book.codes.reshape(n, -1), stats).ravel())
    refined, output_rel, note = _refined(_blocked(units, stats), local, stats, config, centred, shrinkage)
    codes = _unblocked(refined.codes.reshape(n * stats.blocks, -1), stats).ravel()
    form = stats.form if note is None else f"{stats.form}; {note}"
    return replace(refined, codes=codes), output_rel, form


def _blocked(x: np.ndarray, stats: LayerStats) -> np.ndarray:
    """(units, C) rows cut into the statistics' column blocks: (units * blocks, C / blocks), by (group, block)."""
    nb = stats.blocks
    if nb == 1:
        return x
    g = stats.groups // nb
    n, c = x.shape
    return x.reshape(g, n // g, nb, c // nb).transpose(0, 2, 1, 3).reshape(n * nb, c // nb)


def _unblocked(x: np.ndarray, stats: LayerStats) -> np.ndarray:
    """Inverse of ``_blocked``."""
    nb = stats.blocks
    if nb == 1:
        return x
    g = stats.groups // nb
    m, c = x.shape
    return x.reshape(g, nb, m // nb // g, c).transpose(0, 2, 1, 3).reshape(m // nb, nb * c)


def _mean_shift(units: np.ndarray, decoded: np.ndarray, stats: LayerStats) -> np.ndarray | None:
    """Per unit, how much the mean output moved: (w - ŵ)·E[x], summed over the unit's column blocks.

    None when the statistics' mean is not finite: no correction beats a NaN bias.
    """
    diff = (units - decoded).astype(np.float64).reshape(stats.groups, -1, units.shape[1])
    shift = np.einsum("gur,gr->gu", diff, stats.mean)
    shift = shift.reshape(stats.groups // stats.blocks, stats.blocks, -1).sum(axis=1).ravel()
    return shift if np.isfinite(shift).all() else None
