"""Vectorised k-means for product quantization: k-means++ seeding, Lloyd iterations, no empty clusters.

Pure numpy, no ONNX: the quantizer sees an (n, d) matrix of subvectors and
returns a codebook (PQF calls the centroids the codebook and the labels the codes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxpq.config import KMEANS_TOLERANCE

__all__ = ["Codebook", "assign", "block_rows", "coarsened", "kmeans", "kmeans_plusplus", "nearest", "nearest_scalar"]

#: Scores (rows x codewords) per distance block, and most rows per block. Blocks of up to 2 MiB of
#: float32 stay in cache: at k = 256 and d = 2, 2048-row blocks assigned 295k subvectors in 39 ms,
#: 8192-row ones (8 MiB) in 108 ms; past 4 MiB every k tried slowed down two- to threefold.
SCORES_PER_BLOCK = 1 << 19
CHUNK = 1 << 13
#: Elements per block of the scalar (d = 1) assignment. Done at once, MiniLM's 11.7 M-entry embedding
#: held five int64 temporaries of it: 490 MB in one worker, a third of the run's peak RSS.
SCALARS_PER_BLOCK = 1 << 20


def block_rows(n_scores: int) -> int:
    """Rows per block when each row has ``n_scores`` scores: as many as fit ``SCORES_PER_BLOCK``, at most ``CHUNK``."""
    return max(1, min(CHUNK, SCORES_PER_BLOCK // max(n_scores, 1)))


#: k-means++ seeds on at most this many points per centroid, as faiss trains on a sample.
SEED_SAMPLE_PER_CENTROID = 256


@dataclass(frozen=True)
class Codebook:
    """The result of quantizing n subvectors of dimension d with k codewords.

    Parameters
    ----------
    centroids : ndarray of shape (k, d), float32
        The codewords.
    codes : ndarray of shape (n,), int64
        Index of the codeword that replaces each subvector.
    inertia : float
        Sum of squared distances of subvectors to their codewords.
    """

    centroids: np.ndarray
    codes: np.ndarray
    inertia: float

    def __post_init__(self) -> None:
        if self.centroids.ndim != 2 or self.codes.ndim != 1:
            raise ValueError(f"centroids {self.centroids.shape} must be 2-D and codes {self.codes.shape} 1-D")

    def decode(self) -> np.ndarray:
        """The quantized subvectors, of shape (n, d)."""
        return self.centroids[self.codes]


def nearest_scalar(x: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Index of the value nearest to each element of ``x`` (ties: the lowest index), by binary search.

    Scalar codebooks (d = 1, the 8-to-1-bit settings) need no n x k distance
    matrix: with the values sorted, the nearest one neighbours x's insertion point,
    so assigning costs O(n log k) instead of O(n k). Exact, unlike the expanded
    distance, whose float32 round-off can pick a codeword that is not the nearest.
    """
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    # Equal values sit together, the lowest original index first (stable sort): take that one.
    first = order[np.searchsorted(ordered, ordered, side="left")]
    codes = np.empty(x.shape, dtype=np.int64)
    for start in range(0, len(x), SCALARS_PER_BLOCK):  # a handful of int64 temporaries per element
        part = x[start : start + SCALARS_PER_BLOCK]
        above = np.clip(np.searchsorted(ordered, part), 0, len(values) - 1)
        below = np.maximum(above - 1, 0)
        nearer = np.where(np.abs(part - ordered[below]) <= np.abs(ordered[above] - part), below, above)
        codes[start : start + SCALARS_PER_BLOCK] = first[nearer]
    return codes


def assign(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row of ``x`` and the squared distance to it, in bounded memory."""
    codes, dist = _nearest(x, centroids, distances=True)
    assert dist is not None
    return codes, dist


def nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """``assign``'s codes alone: no float64 distance per row (on MiniLM's embedding, 90 MB) where none is used."""
    return _nearest(x, centroids, distances=False)[0]


def _nearest(x: np.ndarray, centroids: np.ndarray, *, distances: bool) -> tuple[np.ndarray, np.ndarray | None]:
    if x.shape[1] == 1:
        codes = nearest_scalar(x[:, 0], centroids[:, 0])
        if not distances:
            return codes, None
        dist = np.empty(len(x), dtype=np.float64)
        for start in range(0, len(x), SCALARS_PER_BLOCK):
            stop = start + SCALARS_PER_BLOCK
            dist[start:stop] = (x[start:stop, 0].astype(np.float64) - centroids[codes[start:stop], 0]) ** 2
        return codes, dist
    c_sq = np.einsum("ij,ij->i", centroids, centroids)
    # Scaling by -2 is exact in floating point, so x @ (-2 cᵀ) equals -2 (x @ cᵀ) bit for bit, with no temporary.
    minus_two_ct = -2.0 * centroids.T
    codes = np.empty(len(x), dtype=np.int64)
    dist = np.empty(len(x), dtype=np.float64) if distances else None
    rows = block_rows(len(centroids))
    for start in range(0, len(x), rows):
        block = x[start : start + rows]
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; the ||x||^2 term does not change the argmin.
        scores = block @ minus_two_ct
        scores += c_sq
        best = np.argmin(scores, axis=1)
        codes[start : start + rows] = best
        if dist is not None:
            x_sq = np.einsum("ij,ij->i", block, block)
            dist[start : start + rows] = np.maximum(x_sq + scores[np.arange(len(block)), best], 0.0)
    return codes, dist


def kmeans_plusplus(
    x: np.ndarray, n_clusters: int, rng: np.random.Generator, weights: np.ndarray | None = None
) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii): each new centre drawn with probability ~ D(x)^2
    (times the point's weight, when the points stand for several subvectors each).

    Prior validation of data is assumed: ``x`` is float32 (n, d) with n >= 1.
    """
    centers = np.empty((n_clusters, x.shape[1]), dtype=x.dtype)
    centers[0] = x[rng.integers(len(x))]
    closest = np.sum((x - centers[0]) ** 2, axis=1, dtype=np.float64)
    for i in range(1, n_clusters):
        mass = closest if weights is None else closest * weights
        total = mass.sum()
        # All points already coincide with a centre: any point is as good as another.
        pick = rng.integers(len(x)) if total <= 0 else _draw(mass / total, rng)
        centers[i] = x[pick]
        np.minimum(closest, np.sum((x - centers[i]) ** 2, axis=1, dtype=np.float64), out=closest)
    return centers


def _draw(p: np.ndarray, rng: np.random.Generator) -> int:
    """An index drawn with probabilities ``p``: the draw ``rng.choice(len(p), p=p)`` makes, from the same
    uniform number (so seeds give the same codebooks), without its validation of ``p``, which cost twice the
    draw itself at every k-means++ centre."""
    cdf = np.cumsum(p)
    cdf /= cdf[-1]
    return int(cdf.searchsorted(rng.random(), side="right"))


def _update(
    x: np.ndarray, codes: np.ndarray, n_clusters: int, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster means and sizes (weighted, when each row stands for ``weights`` subvectors); loops over
    the d dimensions only, never over subvectors."""
    counts = np.bincount(codes, weights=weights, minlength=n_clusters)
    columns = (x[:, j] if weights is None else weights * x[:, j] for j in range(x.shape[1]))
    sums = np.stack([np.bincount(codes, weights=col, minlength=n_clusters) for col in columns], 1)
    means = sums / np.maximum(counts, 1)[:, None]
    return means.astype(x.dtype), counts


def _reseed_empty(x: np.ndarray, centroids: np.ndarray, counts: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Move every empty centroid onto one of the worst-quantized points, so no codeword is wasted."""
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        worst = np.argsort(-dist, kind="stable")[: len(empty)]
        centroids = centroids.copy()
        centroids[empty[: len(worst)]] = x[worst]
    return centroids


def _anneal(
    centroids: np.ndarray, counts: np.ndarray, spread: np.ndarray, step: int, n_iter: int, rng: np.random.Generator
) -> np.ndarray:
    """PQF's stochastic relaxation (SR-C): jitter each mean by the noise that averaging noisy data would leave.

    Noise of std ``spread`` added to every subvector shifts a cluster mean by
    N(0, spread²/count); the temperature (1 - step/n)^½ falls to zero, so the
    search explores early and converges to a plain k-means fixed point.
    """
    temperature = (1.0 - step / n_iter) ** 0.5
    noise = rng.standard_normal(centroids.shape) * spread / np.sqrt(np.maximum(counts, 1))[:, None]
    return (centroids + temperature * noise).astype(centroids.dtype)


def coarsened(book: Codebook, n_clusters: int, rng: np.random.Generator, n_iter: int = 10) -> np.ndarray:
    """``n_clusters`` codewords from a larger codebook: its codewords clustered, each weighted by how many
    subvectors it codes.

    A start for k-means with fewer codewords that is already near its fixed point,
    so the bit allocator's settings k/2, k/4 ... skip the seeding and most Lloyd
    iterations on the whole layer (the clustering here is over k points, not n).
    """
    counts = np.bincount(book.codes, minlength=len(book.centroids)).astype(np.float64)
    points = book.centroids.astype(np.float32)
    centres = kmeans_plusplus(points, n_clusters, rng, weights=counts)
    for _ in range(n_iter):
        means, mass = _update(points, assign(points, centres)[0], n_clusters, counts)
        centres = np.where(mass[:, None] > 0, means, centres)
    return centres


def kmeans(
    x: np.ndarray,
    n_clusters: int,
    *,
    n_iter: int,
    rng: np.random.Generator,
    anneal: bool = False,
    init: np.ndarray | None = None,
    tolerance: float = KMEANS_TOLERANCE,
) -> Codebook:
    """Cluster the rows of ``x`` into ``n_clusters`` codewords.

    Parameters
    ----------
    x : ndarray of shape (n, d)
        Subvectors; converted to float32.
    n_clusters : int
        Codebook size k, 1 <= k <= n.
    n_iter : int
        Lloyd iterations after seeding; stops early once at most ``tolerance`` of the codes change.
    rng : numpy Generator
        The only source of randomness, so the same seed gives the same codebook.
    anneal : bool
        Stochastic relaxation (``_anneal``): noisy updates for all ``n_iter`` steps, then a noiseless one.
    init : ndarray of shape (n_clusters, d), optional
        Starting codewords instead of k-means++ seeding (``coarsened``).
    tolerance : float
        The fraction of changed codes at which Lloyd stops (``CompressConfig.kmeans_tolerance``).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"x of shape {x.shape} must be a non-empty 2-D array")
    if not 1 <= n_clusters <= len(x):
        raise ValueError(f"n_samples={len(x)} should be >= n_clusters={n_clusters} >= 1")
    centroids = _seeds(x, n_clusters, rng) if init is None else np.asarray(init, dtype=np.float32)
    codes, dist = assign(x, centroids)
    spread = x.std(axis=0) if anneal else None  # only the annealing noise needs it
    for step in range(n_iter):
        means, counts = _update(x, codes, n_clusters)
        centroids = _reseed_empty(x, means, counts, dist)
        if anneal:
            centroids = _anneal(centroids, counts, spread, step, n_iter, rng)
        new_codes, dist = assign(x, centroids)
        changed = np.count_nonzero(new_codes != codes)
        codes = new_codes
        if not anneal and changed <= tolerance * len(x):
            break
    if anneal:
        means, counts = _update(x, codes, n_clusters)
        centroids = _reseed_empty(x, means, counts, dist)
        codes, dist = assign(x, centroids)
    return Codebook(centroids=centroids, codes=codes, inertia=residual_energy(x, centroids, codes))


def _seeds(x: np.ndarray, n_clusters: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ on a sample of at most ``SEED_SAMPLE_PER_CENTROID`` points per centroid."""
    sample_size = n_clusters * SEED_SAMPLE_PER_CENTROID
    sample = x if len(x) <= sample_size else x[np.sort(rng.choice(len(x), sample_size, replace=False))]
    return kmeans_plusplus(sample, n_clusters, rng)


def residual_energy(x: np.ndarray, centroids: np.ndarray, codes: np.ndarray) -> float:
    """Σ ‖x_i - c_{codes_i}‖², exact (the expanded distance of ``assign`` loses precision to cancellation),
    in float64 a chunk of rows at a time so a large layer needs no float64 copy of itself."""
    total, rows = 0.0, CHUNK * 64
    for start in range(0, len(x), rows):
        diff = (x[start : start + rows] - centroids[codes[start : start + rows]]).astype(np.float64)
        total += float(np.einsum("ij,ij->", diff, diff))
    return total
