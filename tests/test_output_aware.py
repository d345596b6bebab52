"""Data-aware quantizers on synthetic problems whose optimum is known or brute-forceable."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnxpq.quantize import output_aware
from onnxpq.quantize.kmeans import kmeans


def spd(rng: np.random.Generator, r: int, groups: int = 1, correlated: bool = True) -> np.ndarray:
    """Random symmetric positive definite H (groups, r, r), like a covariance of correlated inputs."""
    if not correlated:
        return np.stack([np.diag(rng.uniform(0.1, 10.0, r)) for _ in range(groups)])
    x = rng.standard_normal((groups, 4 * r, r)) @ rng.standard_normal((groups, r, r))
    return np.matmul(x.transpose(0, 2, 1), x) / (4 * r)


def total_error(units: np.ndarray, decoded: np.ndarray, h: np.ndarray) -> float:
    e = (units - decoded).reshape(h.shape[0], -1, units.shape[1])
    return float(np.einsum("gnr,grs,gns->", e, h, e))


def test_assign_is_the_brute_force_argmin_in_each_block_metric(rng):
    units = rng.standard_normal((6, 8))
    centroids = rng.standard_normal((5, 4))
    h = spd(rng, 8, groups=2)
    codes = output_aware.assign(units, centroids, output_aware.block_diagonal(h, 4))
    blocks = output_aware.block_diagonal(h, 4)
    for s, code in enumerate(codes):
        unit, pos = divmod(s, 2)
        g = unit // 3
        u = units[unit, pos * 4 : (pos + 1) * 4]
        costs = [(u - c) @ blocks[g, pos] @ (u - c) for c in centroids]
        assert code == int(np.argmin(costs))


@pytest.mark.parametrize(("groups", "units", "r", "d", "k"), [(1, 40, 12, 1, 6), (24, 1, 9, 9, 8), (3, 5, 16, 4, 7)])
def test_assign_matches_the_brute_force_on_scalar_depthwise_and_grouped_layouts(rng, groups, units, r, d, k):
    """The scalar shortcut and the all-groups-at-once scores against a loop over every subvector."""
    weights = rng.standard_normal((groups * units, r))
    centroids = rng.standard_normal((k, d))
    blocks = output_aware.block_diagonal(spd(rng, r, groups=groups), d)
    codes = output_aware.assign(weights, centroids, blocks)
    p = r // d
    for s, code in enumerate(codes):
        unit, pos = divmod(s, p)
        u = weights[unit, pos * d : (pos + 1) * d]
        costs = [(u - c) @ blocks[unit // units, pos] @ (u - c) for c in centroids]
        assert costs[code] <= min(costs) * (1 + 1e-5) + 1e-9


def test_update_is_the_weighted_least_squares_codeword(rng):
    units = rng.standard_normal((10, 6))
    h = spd(rng, 6)
    blocks = output_aware.block_diagonal(h, 3)
    codes = rng.integers(0, 3, size=20)
    centroids = output_aware.update(units, codes, rng.standard_normal((3, 3)), blocks)
    subvectors = units.reshape(-1, 3)
    positions = np.tile([0, 1], 10)
    for c in range(3):
        members = np.flatnonzero(codes == c)
        a = sum(blocks[0, positions[m]] for m in members)
        b = sum(blocks[0, positions[m]] @ subvectors[m] for m in members)
        np.testing.assert_allclose(centroids[c], np.linalg.solve(a, b), rtol=1e-6)


def test_refit_matches_the_dense_least_squares_solution(rng):
    n, r, d, k = 5, 6, 2, 4
    units = rng.standard_normal((n, r))
    h = spd(rng, r)
    codes = rng.integers(0, k, size=n * r // d)
    # Dense P: decoded row-major weights = P @ vec(codebook).
    p = np.zeros((n * r, k * d))
    for s, code in enumerate(codes):
        for j in range(d):
            p[s * d + j, code * d + j] = 1.0
    big_h = np.kron(np.eye(n), h[0])
    a = p.T @ big_h @ p
    b = p.T @ big_h @ units.ravel()
    expected = np.linalg.lstsq(a, b, rcond=None)[0].reshape(k, d)
    got = output_aware.refit(units, codes, rng.standard_normal((k, d)), h, iters=200)
    decoded_expected = expected[codes].reshape(n, r)
    decoded_got = got[codes].reshape(n, r)
    assert total_error(units, decoded_got, h) == pytest.approx(total_error(units, decoded_expected, h), rel=1e-8)


def test_refit_never_increases_the_output_error(rng):
    units = rng.standard_normal((32, 16))
    h = spd(rng, 16)
    book = kmeans(units.reshape(-1, 4), 8, n_iter=10, rng=rng)
    before = total_error(units, book.decode().reshape(units.shape), h)
    after_c = output_aware.refit(units, book.codes, book.centroids, h)
    assert total_error(units, after_c[book.codes].reshape(units.shape), h) <= before + 1e-9


def test_error_feedback_equals_plain_assignment_when_inputs_are_uncorrelated(rng):
    units = rng.standard_normal((12, 8))
    h = output_aware.damped(spd(rng, 8, correlated=False))
    centroids = rng.standard_normal((6, 4))
    plain = output_aware.assign(units, centroids, output_aware.block_diagonal(h, 4))
    np.testing.assert_array_equal(output_aware.error_feedback(units, centroids, h), plain)


def test_error_feedback_lowers_the_output_error_on_correlated_inputs(rng):
    units = rng.standard_normal((256, 16))
    h = output_aware.damped(spd(rng, 16))
    centroids = kmeans(units.reshape(-1, 4), 16, n_iter=10, rng=rng).centroids
    plain = output_aware.assign(units, centroids, output_aware.block_diagonal(h, 4))
    fed = output_aware.error_feedback(units, centroids, h)
    err = {
        name: total_error(units, centroids[c].reshape(units.shape), h) for name, c in [("plain", plain), ("fed", fed)]
    }
    assert err["fed"] < 0.9 * err["plain"]


def test_error_feedback_is_exact_for_one_position_per_row(rng):
    """d = R: one block per row, so feedback has nothing to push and must pick the true argmin."""
    units = rng.standard_normal((8, 3))
    h = output_aware.damped(spd(rng, 3))
    centroids = rng.standard_normal((7, 3))
    codes = output_aware.error_feedback(units, centroids, h)
    for u, code in zip(units, codes, strict=True):
        costs = [(u - c) @ h[0] @ (u - c) for c in centroids]
        assert code == int(np.argmin(costs))


def test_output_error_is_relative_to_the_layer_output(rng):
    units = rng.standard_normal((4, 6))
    h = spd(rng, 6)
    assert output_aware.output_error(units, units, h) == 0.0
    assert output_aware.output_error(units, np.zeros_like(units), h) == pytest.approx(1.0)


def test_annealed_kmeans_recovers_separated_clusters(rng):
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = np.concatenate([c + 0.1 * rng.standard_normal((50, 2)) for c in centres]).astype(np.float32)
    book = kmeans(x, 4, n_iter=20, rng=rng, anneal=True)
    found = sorted(map(tuple, np.round(book.centroids, 0)))
    assert found == sorted(map(tuple, centres))
    means = np.stack([x[book.codes == c].mean(0) for c in range(4)])
    np.testing.assert_allclose(book.centroids, means, atol=1e-5)


def test_annealing_is_deterministic_for_a_seed():
    x = np.random.default_rng(0).standard_normal((500, 4)).astype(np.float32)
    a = kmeans(x, 16, n_iter=10, rng=np.random.default_rng(3), anneal=True)
    b = kmeans(x, 16, n_iter=10, rng=np.random.default_rng(3), anneal=True)
    np.testing.assert_array_equal(a.codes, b.codes)


@pytest.mark.parametrize("groups", [1, 3])
def test_block_diagonal_takes_the_diagonal_blocks(rng, groups):
    h = spd(rng, 6, groups=groups)
    blocks = output_aware.block_diagonal(h, 2)
    for g, p in itertools.product(range(groups), range(3)):
        np.testing.assert_array_equal(blocks[g, p], h[g, 2 * p : 2 * p + 2, 2 * p : 2 * p + 2])


def _reference_error_feedback(units: np.ndarray, centroids: np.ndarray, h: np.ndarray) -> np.ndarray:
    """The implementation before Cholesky-of-H and lazy updates: cholesky(inv(H)), every column pushed at once."""
    g, d = h.shape[0], centroids.shape[1]
    n, r = units.shape
    codes = np.empty((n, r // d), dtype=np.int64)
    rows = n // g
    for gi in range(g):
        upper = np.linalg.cholesky(np.linalg.inv(h[gi])).T
        w = units[gi * rows : (gi + 1) * rows].astype(np.float64)
        for j in range(r // d):
            b = slice(j * d, (j + 1) * d)
            inv_u = np.linalg.inv(upper[b, b])
            metric = inv_u @ inv_u.T
            chc = np.einsum("kd,de,ke->k", centroids, metric, centroids)
            best = np.argmin(chc[None, :] - 2.0 * (w[:, b] @ metric @ centroids.T), axis=1)
            codes[gi * rows : (gi + 1) * rows, j] = best
            w[:, b.stop :] -= ((w[:, b] - centroids[best]) @ inv_u) @ upper[b, b.stop :]
    return codes.ravel()


@pytest.mark.parametrize(("groups", "r", "d", "block"), [(1, 48, 4, 8), (2, 36, 9, 18), (1, 40, 4, 128), (3, 24, 1, 5)])
def test_error_feedback_gives_the_codes_of_the_reference_on_well_conditioned_h(groups, r, d, block, rng):
    units = rng.standard_normal((6 * groups, r))
    h = output_aware.damped(spd(rng, r, groups=groups))
    centroids = rng.standard_normal((16, d))
    expected = _reference_error_feedback(units, centroids, h)
    np.testing.assert_array_equal(output_aware.error_feedback(units, centroids, h, block=block), expected)


def test_inverse_factor_is_the_upper_cholesky_factor_of_the_inverse(rng):
    h = spd(rng, 12)[0]
    upper = output_aware.inverse_factor(h)
    np.testing.assert_allclose(upper, np.triu(upper))
    assert np.all(np.diagonal(upper) > 0)
    np.testing.assert_allclose(upper.T @ upper, np.linalg.inv(h), rtol=1e-8, atol=1e-10)


def test_an_indefinite_h_is_repaired_and_a_non_finite_one_refused(rng):
    x = rng.standard_normal((3, 10))
    indefinite = (x.T @ x - 1e-3 * np.eye(10))[None]  # rank 3, negative eigenvalues
    repaired = output_aware.positive_definite(output_aware.damped(indefinite) - 0.02 * np.eye(10))
    assert repaired is not None
    assert np.linalg.eigvalsh(repaired[0]).min() > 0
    nan = indefinite.copy()
    nan[0, 1, 2] = np.nan
    assert output_aware.positive_definite(nan) is None
    assert output_aware.error_feedback(rng.standard_normal((2, 10)), rng.standard_normal((4, 2)), nan) is None


def test_a_well_conditioned_h_passes_through_positive_definite_untouched(rng):
    h = output_aware.damped(spd(rng, 8, groups=2))
    assert output_aware.positive_definite(h) is h
