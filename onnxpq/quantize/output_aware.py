"""Quantizers that minimise a layer's output error ‖X(W - Ŵ)‖² instead of its weight error.

All functions work on ``layout.unit_matrix`` (units, R) with subvectors of d
columns, codes in (unit, position) order, and per-group second moments H
(groups, R, R) from ``stats``: unit o belongs to group ``o // (units / groups)``.

- ``assign`` / ``update``: BGD's E and M steps with the block-diagonal part of H
  (each subvector weighted by its own d x d block).
- ``refit``: with the codes fixed, Ŵ is linear in the codebook, so the codebook
  minimising the full ‖X(W - Ŵ)‖² (cross-subvector terms included) solves a
  linear least-squares problem; solved by conjugate gradients on its normal
  equations, preconditioned by the block-diagonal part.
- ``error_feedback``: GPTQ's sequential assignment. After coding one subvector
  column, the remaining weights absorb its error through the Cholesky factor of
  H⁻¹, so later columns compensate for earlier ones.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from onnxpq.config import DAMPING, REFIT_TOLERANCE
from onnxpq.quantize.kmeans import block_rows, nearest_scalar

__all__ = [
    "assign",
    "block_diagonal",
    "damped",
    "error_feedback",
    "inverse_factor",
    "output_error",
    "positive_definite",
    "refit",
    "update",
]

#: The repair of an H that round-off left indefinite (``_factor``): first damping step and eigenvalue floor,
#: as fractions of the mean diagonal.
REPAIR_FLOOR = 0.01
#: Tenfold damping increases tried on an H that round-off left indefinite, before clipping its eigenvalues.
RETRIES = 4
#: Columns of error feedback between lazy updates of the rest of the row (GPTQ's ``blocksize``).
LAZY_BLOCK = 128


def _grouped(units: np.ndarray, groups: int, d: int) -> np.ndarray:
    """(groups, units per group, positions, d) view of the unit matrix."""
    n, r = units.shape
    return units.reshape(groups, n // groups, r // d, d)


def block_diagonal(h: np.ndarray, d: int) -> np.ndarray:
    """The d x d diagonal blocks of H: (groups, positions, d, d)."""
    g, r, _ = h.shape
    p = r // d
    blocks = h.reshape(g, p, d, p, d)
    return np.ascontiguousarray(blocks[:, np.arange(p), :, np.arange(p), :].transpose(1, 0, 2, 3))


def _scores_argmin(uh: np.ndarray, centroids: np.ndarray, chc: np.ndarray) -> np.ndarray:
    """argmin_c cᵀHc - 2 uᵀHc for uh = (u H) of shape (groups, positions, units, d); chc: (groups, positions, k).

    Codes come back in (group, unit, position) order. The scores of a run of positions
    are one batched product plus each position's cᵀHc broadcast over its units: all
    groups in one pass (a depthwise layer has one group per channel, and a Python loop
    over them cost more than the arithmetic), and no per-row copy of cᵀHc (which cost
    as much as the product), a cache-sized block of scores at a time (``kmeans.block_rows``).
    """
    g, p, n, d = uh.shape
    slabs = uh.reshape(g * p, n, d)
    table = chc.reshape(g * p, 1, -1)
    minus_two_ct = -2.0 * centroids.T
    codes = np.empty((g * p, n), dtype=np.int64)
    per_block = block_rows(chc.shape[-1])
    rows = min(n, per_block)
    step = max(1, per_block // rows)
    for first in range(0, g * p, step):
        for row in range(0, n, rows):
            part = slabs[first : first + step, row : row + rows]
            scores = part @ minus_two_ct
            scores += table[first : first + step]
            codes[first : first + step, row : row + rows] = np.argmin(scores, axis=2)
    return codes.reshape(g, p, n).transpose(0, 2, 1).ravel()


def _times_blocks(units: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """Each subvector times its H block, in (groups, positions, units, d) layout: one small GEMM per
    (group, position) instead of an einsum, which loops in C without BLAS (ten times slower here)."""
    g, _, d, _ = blocks.shape
    return np.matmul(_grouped(units, g, d).transpose(0, 2, 1, 3), blocks)


def assign(units: np.ndarray, centroids: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """Codes minimising each subvector's (u - c)ᵀ H_block (u - c): BGD's E-step.

    With d = 1 each block is a positive scalar that scales every codeword's error
    alike, so the nearest codeword is the answer (``kmeans.nearest_scalar``).
    """
    d = blocks.shape[2]
    if d == 1 and (blocks > 0).all():
        return nearest_scalar(units.ravel(), centroids[:, 0].astype(units.dtype))
    # float32 is plenty to rank codewords and twice as fast as float64.
    c = centroids.astype(np.float32)
    b = blocks.astype(np.float32)
    uh = _times_blocks(units.astype(np.float32), b)
    chc = np.einsum("gpke,ke->gpk", np.matmul(c, b), c)
    return _scores_argmin(uh, c, chc)


def _positions(n_units: int, groups: int, positions: int) -> np.ndarray:
    """For each subvector in (unit, position) order, the index of its (group, position) H block."""
    group = np.repeat(np.arange(groups), n_units // groups * positions)
    pos = np.tile(np.arange(positions), n_units)
    return group * positions + pos


def _scatter(values: np.ndarray, codes: np.ndarray, k: int) -> np.ndarray:
    """Sum the (n, m) rows of ``values`` by code: (k, m)."""
    return np.stack([np.bincount(codes, weights=values[:, j], minlength=k) for j in range(values.shape[1])], 1)


def _block_systems(codes: np.ndarray, blocks: np.ndarray, n_units: int, k: int) -> np.ndarray:
    """Σ of the H blocks of each codeword's subvectors: (k, d, d)."""
    g, p, d, _ = blocks.shape
    where = _positions(n_units, g, p)
    counts = np.bincount(codes * (g * p) + where, minlength=k * g * p).reshape(k, g * p).astype(np.float64)
    return (counts @ blocks.reshape(g * p, d * d)).reshape(k, d, d)


def _used_systems(systems: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask of codewords some subvector uses, their systems with a 1e-9 relative ridge so each is invertible)."""
    d = systems.shape[-1]
    scale = np.trace(systems, axis1=1, axis2=2) / d
    used = scale > 0
    return used, systems[used] + 1e-9 * scale[used, None, None] * np.eye(d)


def _inverse(systems: np.ndarray) -> np.ndarray:
    """Batched inverse of d x d systems; the pseudo-inverse where one is singular (an indefinite H
    summed to zero in some direction), so a degenerate codeword stays where it is instead of raising."""
    try:
        return np.linalg.inv(systems)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(systems, hermitian=True)


def _solve(systems: np.ndarray, rhs: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Batched solve of systems @ c = rhs, keeping ``fallback`` for codewords no subvector uses (or not finite)."""
    used, regular = _used_systems(systems)
    out = fallback.astype(np.float64).copy()
    try:
        solved = np.linalg.solve(regular, rhs[used][..., None])[..., 0]
    except np.linalg.LinAlgError:
        solved = np.einsum("kde,ke->kd", _inverse(regular), rhs[used])
    finite = np.isfinite(solved).all(axis=1)
    out[np.flatnonzero(used)[finite]] = solved[finite]
    return out


def update(units: np.ndarray, codes: np.ndarray, centroids: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """Codewords minimising Σ (u - c)ᵀ H_block (u - c) over their subvectors: BGD's M-step."""
    d = blocks.shape[2]
    k = len(centroids)
    uh = _times_blocks(units.astype(np.float64), blocks).transpose(0, 2, 1, 3).reshape(-1, d)
    systems = _block_systems(codes, blocks, len(units), k)
    return _solve(systems, _scatter(uh, codes, k), centroids)


def _apply_h(w: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Each unit row times its group's H: (units, R)."""
    g = h.shape[0]
    n, r = w.shape
    return np.matmul(w.reshape(g, n // g, r), h).reshape(n, r)


def output_error(units: np.ndarray, decoded: np.ndarray, h: np.ndarray, h_noise: np.ndarray | None = None) -> float:
    """‖X(W - Ŵ)‖² / ‖XW‖²: the relative output error of the layer on the calibration data.

    ``h_noise`` measures the error alone, e.g. the covariance when a bias absorbs the mean shift.
    """
    e = (units - decoded).astype(np.float64)
    w = units.astype(np.float64)
    signal = float(np.sum(_apply_h(w, h) * w))
    noise = float(np.sum(_apply_h(e, h if h_noise is None else h_noise) * e))
    return noise / signal if signal > 0 else float(noise > 0)


def refit(
    units: np.ndarray,
    codes: np.ndarray,
    centroids: np.ndarray,
    h: np.ndarray,
    *,
    iters: int = 50,
    tol: float = REFIT_TOLERANCE,
) -> np.ndarray:
    """The codebook minimising ‖X(W - Ŵ)‖² for fixed codes (preconditioned conjugate gradients).

    The normal equations are A c = b with A = Pᵀ H P and b = Pᵀ H w, where P
    decodes a codebook into the weight; A is never formed, each product costs
    one (units x R) @ (R x R) multiplication.
    """
    k, d = centroids.shape
    n, r = units.shape
    w = units.astype(np.float64)

    def normal(c: np.ndarray) -> np.ndarray:
        return _scatter(_apply_h(c[codes].reshape(n, r), h).reshape(-1, d), codes, k)

    blocks = block_diagonal(h, d)
    systems = _block_systems(codes, blocks, n, k)
    used, regular = _used_systems(systems)
    inv = np.zeros_like(systems)
    inv[used] = _inverse(regular)

    x = centroids.astype(np.float64).copy()
    b = _scatter(_apply_h(w, h).reshape(-1, d), codes, k)
    res = b - normal(x)
    z = np.einsum("kde,ke->kd", inv, res)
    direction = z.copy()
    rz = float(np.sum(res * z))
    b_norm = float(np.sum(b * b)) or 1.0
    for _ in range(iters):
        if float(np.sum(res * res)) <= tol * b_norm:
            break
        a_dir = normal(direction)
        curvature = float(np.sum(direction * a_dir))
        if not (np.isfinite(curvature) and curvature > 0 and np.isfinite(rz) and rz != 0):
            break  # H (or its block preconditioner) is not positive definite along this direction: stop here
        step = rz / curvature
        x += step * direction
        res -= step * a_dir
        z = np.einsum("kde,ke->kd", inv, res)
        rz_new = float(np.sum(res * z))
        direction = z + (rz_new / rz) * direction
        rz = rz_new
    return x if np.isfinite(x).all() else centroids.astype(np.float64)


def damped(h: np.ndarray, damping: float = DAMPING) -> np.ndarray:
    """H / mean(diag H) plus GPTQ's damping on the diagonal, per group (``CompressConfig.damping``).

    Scaling does not change any argmin; the damping keeps H invertible (inputs
    that are always zero, fewer samples than inputs) and stops the quantizer
    from trusting directions the calibration data never explored.
    """
    scale = np.mean(np.diagonal(h, axis1=1, axis2=2), axis=1)
    scale = np.where(scale > 0, scale, 1.0)
    out = h / scale[:, None, None]
    r = h.shape[1]
    out[:, np.arange(r), np.arange(r)] += damping
    return out


def _factor(h: np.ndarray) -> np.ndarray | None:
    """Lower Cholesky factor of one group's H, damped as little as it takes; None when H cannot be made definite.

    H arrives symmetric and damped (``damped``), so the first try almost always
    succeeds and changes nothing. Round-off can still leave it indefinite (dead
    ReLU6 channels, constant inputs, fewer rows than inputs); then H is
    symmetrised and damped by ``REPAIR_FLOOR`` times 10, 100, ... of its mean diagonal, as GPTQ's users
    do by hand. Last, negative eigenvalues are clipped to ``REPAIR_FLOOR`` of it.
    """
    if not np.isfinite(h).all():
        return None
    try:
        return np.linalg.cholesky(h)
    except np.linalg.LinAlgError:
        pass
    sym = (h + h.T) / 2
    scale = float(np.mean(np.abs(np.diagonal(sym)))) or 1.0
    eye = np.eye(len(h))
    for step in range(1, RETRIES + 1):
        try:
            return np.linalg.cholesky(sym + REPAIR_FLOOR * 10**step * scale * eye)
        except np.linalg.LinAlgError:
            continue
    try:
        values, vectors = np.linalg.eigh(sym)
        clipped = (vectors * np.maximum(values, REPAIR_FLOOR * scale)) @ vectors.T
        return np.linalg.cholesky((clipped + clipped.T) / 2)
    except np.linalg.LinAlgError:
        return None


def positive_definite(h: np.ndarray) -> np.ndarray | None:
    """H itself when every group factors as it is; else a copy with each failing group repaired by
    ``_factor``'s damping. None when some group cannot be (non-finite statistics): the caller then
    keeps codes chosen without this metric."""
    if not np.isfinite(h).all():
        return None
    if _factors(h):  # one batched Cholesky over all groups: the usual case, nothing to repair
        return h
    out = h
    for gi in range(h.shape[0]):
        if _factors(h[gi]):
            continue
        lower = _factor(h[gi])
        if lower is None:
            return None
        out = h.copy() if out is h else out
        out[gi] = lower @ lower.T
    return out


def _factors(h: np.ndarray) -> bool:
    """Whether plain Cholesky accepts H (one matrix or a stack) as it is."""
    try:
        np.linalg.cholesky(h)
    except np.linalg.LinAlgError:
        return False
    return True


def inverse_factor(h: np.ndarray) -> np.ndarray | None:
    """Upper triangular U with H⁻¹ = UᵀU, from one Cholesky of H with its axes reversed; None if H cannot factor.

    With J the reversal, J H J = L Lᵀ gives H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J), and J L⁻¹ J
    is upper triangular with a positive diagonal: the factor GPTQ gets from
    cholesky → cholesky_inverse → cholesky(upper), at one Cholesky and one
    triangular inverse, and with no explicit H⁻¹ whose round-off can make it indefinite.
    """
    lower = _factor(h[::-1, ::-1])
    if lower is None:
        return None
    try:
        # A triangular inverse (LAPACK trtri) is a third of the work of a general one.
        inverse, info = scipy.linalg.lapack.dtrtri(lower, lower=1)
    except (ValueError, np.linalg.LinAlgError):
        return None
    if info != 0:
        return None
    upper = np.tril(inverse)[::-1, ::-1]
    return np.ascontiguousarray(upper) if np.isfinite(upper).all() else None


def error_feedback(
    units: np.ndarray, centroids: np.ndarray, h: np.ndarray, block: int = LAZY_BLOCK
) -> np.ndarray | None:
    """GPTQ-style codes: code one subvector column, push its error onto the columns not yet coded.

    With H⁻¹ = UᵀU (U upper triangular, ``inverse_factor``), coding the block B of a
    row w with q leaves the best output for the remaining columns when they move by
    -(w_B - q) U_BB⁻¹ U_B,rest; block B itself is coded in the metric (U_BBᵀU_BB)⁻¹.
    As in GPTQ, the error reaches the columns beyond the current ``block`` columns
    lazily, in one matrix product per block: the same sums, a fraction of the memory traffic.
    None when some group's H cannot be factored: the caller keeps the codes it had.
    """
    g = h.shape[0]
    d = centroids.shape[1]
    n, r = units.shape
    c = centroids.astype(np.float64)
    codes = np.empty((n, r // d), dtype=np.int64)
    rows = n // g
    span = max(block // d, 1) * d
    for gi in range(g):
        upper = inverse_factor(h[gi])
        if upper is None:
            return None
        w = units[gi * rows : (gi + 1) * rows].astype(np.float64)
        for start in range(0, r, span):
            stop = min(start + span, r)
            errors = np.empty((rows, stop - start))
            for j in range(start // d, stop // d):
                b = slice(j * d, (j + 1) * d)
                inv_u = np.linalg.inv(upper[b, b])
                metric = inv_u @ inv_u.T
                chc = np.einsum("kd,de,ke->k", c, metric, c)
                best = np.argmin(chc[None, :] - 2.0 * ((w[:, b] @ metric) @ c.T), axis=1)
                codes[gi * rows : (gi + 1) * rows, j] = best
                err = (w[:, b] - c[best]) @ inv_u
                errors[:, b.start - start : b.stop - start] = err
                w[:, b.stop : stop] -= err @ upper[b, b.stop : stop]
            w[:, stop:] -= errors @ upper[start:stop, stop:]
    return codes.ravel()
