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

__all__ = ["assign", "block_diagonal", "damped", "error_feedback", "output_error", "refit", "update"]

#: Rows of (subvector x codeword) scores computed at once: bounds memory and stays in cache.
CHUNK = 1 << 13
#: GPTQ's damping: a fraction of the mean diagonal added to H so it stays invertible.
DAMPING = 0.01


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
    """argmin_c cᵀHc - 2 uᵀHc for rows of uh = (u H) of shape (units, positions, d)."""
    n, p, d = uh.shape
    flat = uh.reshape(-1, d)
    pos = np.tile(np.arange(p), n)
    codes = np.empty(len(flat), dtype=np.int64)
    for start in range(0, len(flat), CHUNK):
        stop = start + CHUNK
        scores = chc[pos[start:stop]] - 2.0 * (flat[start:stop] @ centroids.T)
        codes[start:stop] = np.argmin(scores, axis=1)
    return codes


def assign(units: np.ndarray, centroids: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """Codes minimising each subvector's (u - c)ᵀ H_block (u - c): BGD's E-step."""
    g, _, d, _ = blocks.shape
    # float32 is plenty to rank codewords and twice as fast as float64.
    u = _grouped(units.astype(np.float32), g, d)
    c = centroids.astype(np.float32)
    b = blocks.astype(np.float32)
    codes = []
    for gi in range(g):
        uh = np.einsum("npd,pde->npe", u[gi], b[gi])
        chc = np.einsum("kd,pde,ke->pk", c, b[gi], c)
        codes.append(_scores_argmin(uh, c, chc))
    return np.concatenate(codes)


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


def _solve(systems: np.ndarray, rhs: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Batched solve of systems @ c = rhs, keeping ``fallback`` for codewords no subvector uses."""
    used, regular = _used_systems(systems)
    out = fallback.astype(np.float64).copy()
    out[used] = np.linalg.solve(regular, rhs[used][..., None])[..., 0]
    return out


def update(units: np.ndarray, codes: np.ndarray, centroids: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """Codewords minimising Σ (u - c)ᵀ H_block (u - c) over their subvectors: BGD's M-step."""
    g, _, d, _ = blocks.shape
    k = len(centroids)
    u = _grouped(units.astype(np.float64), g, d)
    uh = np.einsum("gnpd,gpde->gnpe", u, blocks).reshape(-1, d)
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
    units: np.ndarray, codes: np.ndarray, centroids: np.ndarray, h: np.ndarray, *, iters: int = 50, tol: float = 1e-10
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
    inv[used] = np.linalg.inv(regular)

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
        step = rz / float(np.sum(direction * a_dir))
        x += step * direction
        res -= step * a_dir
        z = np.einsum("kde,ke->kd", inv, res)
        rz_new = float(np.sum(res * z))
        direction = z + (rz_new / rz) * direction
        rz = rz_new
    return x


def damped(h: np.ndarray) -> np.ndarray:
    """H / mean(diag H) plus GPTQ's damping on the diagonal, per group.

    Scaling does not change any argmin; the damping keeps H invertible (inputs
    that are always zero, fewer samples than inputs) and stops the quantizer
    from trusting directions the calibration data never explored.
    """
    scale = np.mean(np.diagonal(h, axis1=1, axis2=2), axis=1)
    scale = np.where(scale > 0, scale, 1.0)
    out = h / scale[:, None, None]
    r = h.shape[1]
    out[:, np.arange(r), np.arange(r)] += DAMPING
    return out


def error_feedback(units: np.ndarray, centroids: np.ndarray, h: np.ndarray) -> np.ndarray:
    """GPTQ-style codes: code one subvector column, push its error onto the columns not yet coded.

    ``h`` must be positive definite (see ``damped``).

    With H⁻¹ = UᵀU (U upper triangular), coding the block B of a row w with
    q leaves the best output for the remaining columns when they move by
    -(w_B - q) U_BB⁻¹ U_B,rest; block B itself is coded in the metric (U_BBᵀU_BB)⁻¹.
    """
    g = h.shape[0]
    d = centroids.shape[1]
    n, r = units.shape
    c = centroids.astype(np.float64)
    codes = np.empty((n, r // d), dtype=np.int64)
    rows = n // g
    for gi in range(g):
        upper = np.linalg.cholesky(np.linalg.inv(h[gi])).T
        w = units[gi * rows : (gi + 1) * rows].astype(np.float64)
        for j in range(r // d):
            b = slice(j * d, (j + 1) * d)
            u_bb = upper[b, b]
            inv_u = np.linalg.inv(u_bb)
            metric = inv_u @ inv_u.T
            wm = w[:, b] @ metric
            chc = np.einsum("kd,de,ke->k", c, metric, c)
            best = np.argmin(chc[None, :] - 2.0 * (wm @ c.T), axis=1)
            codes[gi * rows : (gi + 1) * rows, j] = best
            err = (w[:, b] - c[best]) @ inv_u
            w[:, b.stop :] -= err @ upper[b, b.stop :]
    return codes.ravel()
