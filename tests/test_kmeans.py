import numpy as np
import pytest

from onnxpq.quantize.kmeans import assign, coarsened, kmeans, nearest_scalar


def test_hand_worked_case():
    # Two clusters {0, 1} and {10, 10}: means 0.5 and 10, inertia 2 * 0.25 = 0.5.
    x = np.array([[0.0], [1.0], [10.0], [10.0]], dtype=np.float32)
    cb = kmeans(x, 2, n_iter=10, rng=np.random.default_rng(0))
    assert sorted(cb.centroids.ravel().tolist()) == [0.5, 10.0]
    assert cb.inertia == pytest.approx(0.5)


def test_recovers_exact_codebook_and_uses_every_codeword():
    rng = np.random.default_rng(0)
    points = rng.standard_normal((16, 4)).astype(np.float32) * 10
    x = points[rng.integers(0, 16, size=2000)]
    x[:16] = points  # every point present at least once
    cb = kmeans(x, 16, n_iter=30, rng=np.random.default_rng(1))
    assert cb.inertia == pytest.approx(0.0, abs=1e-6)
    assert len(np.unique(cb.codes)) == 16
    np.testing.assert_allclose(cb.decode(), x, atol=1e-5)


def test_no_empty_clusters_on_clumped_data():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal((500, 9)) * 0.01, rng.standard_normal((20, 9)) * 5]).astype(np.float32)
    cb = kmeans(x, 64, n_iter=20, rng=np.random.default_rng(0))
    counts = np.bincount(cb.codes, minlength=64)
    assert (counts > 0).all()
    assert np.isfinite(cb.centroids).all()


def test_identical_points_do_not_divide_by_zero():
    x = np.zeros((100, 4), dtype=np.float32)
    cb = kmeans(x, 8, n_iter=5, rng=np.random.default_rng(0))
    assert cb.inertia == 0.0
    assert np.all(cb.centroids == 0)


def test_same_seed_same_codebook_other_seed_differs():
    x = np.random.default_rng(0).standard_normal((3000, 4)).astype(np.float32)
    a = kmeans(x, 32, n_iter=10, rng=np.random.default_rng(7))
    b = kmeans(x, 32, n_iter=10, rng=np.random.default_rng(7))
    c = kmeans(x, 32, n_iter=10, rng=np.random.default_rng(8))
    assert np.array_equal(a.centroids, b.centroids) and np.array_equal(a.codes, b.codes)
    assert not np.array_equal(a.centroids, c.centroids)


def test_assign_matches_brute_force():
    rng = np.random.default_rng(5)
    x, c = rng.standard_normal((300, 6)).astype(np.float32), rng.standard_normal((10, 6)).astype(np.float32)
    codes, dist = assign(x, c)
    brute = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(codes, brute.argmin(1))
    np.testing.assert_allclose(dist, brute.min(1), rtol=1e-4, atol=1e-5)


def test_rejects_more_clusters_than_points():
    with pytest.raises(ValueError, match="n_samples=3 should be >= n_clusters=4"):
        kmeans(np.zeros((3, 2), np.float32), 4, n_iter=1, rng=np.random.default_rng(0))


def test_nearest_scalar_is_the_exact_nearest_value_with_ties_to_the_lowest_index():
    rng = np.random.default_rng(5)
    values = rng.standard_normal(64).astype(np.float32)
    values[[7, 40]] = values[3]  # duplicates: index 3 must win
    x = np.concatenate([rng.standard_normal(5000), values, [-1e6, 1e6]]).astype(np.float32)
    codes = nearest_scalar(x, values)
    distance = np.abs(x[:, None].astype(np.float64) - values[None, :])
    np.testing.assert_array_equal(distance[np.arange(len(x)), codes], distance.min(axis=1))
    assert not np.isin(codes, [7, 40]).any()
    assert codes[5000 + 3] == 3


def test_scalar_assign_matches_the_brute_force_nearest_centroid():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3000, 1)).astype(np.float32)
    centroids = rng.standard_normal((16, 1)).astype(np.float32)
    codes, dist = assign(x, centroids)
    brute = (x - centroids.T).astype(np.float64) ** 2
    np.testing.assert_allclose(dist, brute.min(axis=1), rtol=1e-6)
    np.testing.assert_array_equal(brute[np.arange(len(x)), codes], brute.min(axis=1))


def test_coarsened_codebook_starts_kmeans_as_well_as_a_fresh_seeding():
    """The allocator's k/2, k/4 ... settings start from the larger codebook, coarsened: the result must
    be as good as k-means from scratch (a start that ignored the codeword weights would not be)."""
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.standard_normal((4000, 4)), 6 + 0.3 * rng.standard_normal((200, 4))]).astype(np.float32)
    big = kmeans(x, 64, n_iter=10, rng=np.random.default_rng(0))
    start = coarsened(big, 16, np.random.default_rng(1))
    assert start.shape == (16, 4) and np.isfinite(start).all()
    warm = kmeans(x, 16, n_iter=10, rng=np.random.default_rng(2), init=start)
    fresh = kmeans(x, 16, n_iter=10, rng=np.random.default_rng(2))
    assert warm.inertia <= 1.05 * fresh.inertia
    assert len(np.unique(warm.codes)) == 16
