import numpy as np
import pytest

from onnxpq.quantize import kmeans as kmeans_module
from onnxpq.quantize.kmeans import _draw, assign, block_rows, coarsened, kmeans, nearest, nearest_scalar


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


@pytest.mark.parametrize("k", [1, 3, 256])
def test_assign_gives_the_same_codes_and_distances_whatever_the_block_size(k, monkeypatch):
    # The blocks bound memory and keep the scores in cache; each row's scores do not depend on its block.
    rng = np.random.default_rng(k)
    x, c = rng.standard_normal((5000, 4)).astype(np.float32), rng.standard_normal((k, 4)).astype(np.float32)
    codes, dist = assign(x, c)
    monkeypatch.setattr(kmeans_module, "SCORES_PER_BLOCK", 7 * k)  # 7-row blocks, the last one short
    assert block_rows(k) == 7
    small_codes, small_dist = assign(x, c)
    np.testing.assert_array_equal(codes, small_codes)
    np.testing.assert_array_equal(dist, small_dist)


@pytest.mark.parametrize("d", [1, 3])
def test_nearest_gives_assigns_codes(d):
    rng = np.random.default_rng(d)
    x, c = rng.standard_normal((4000, d)).astype(np.float32), rng.standard_normal((50, d)).astype(np.float32)
    np.testing.assert_array_equal(nearest(x, c), assign(x, c)[0])


def test_block_rows_stays_within_the_score_budget_and_the_row_cap():
    assert block_rows(256) * 256 <= kmeans_module.SCORES_PER_BLOCK
    assert block_rows(1) == kmeans_module.CHUNK
    assert block_rows(10**9) == 1


@pytest.mark.parametrize("seed", range(5))
def test_draw_picks_what_numpy_choice_picks_from_the_same_stream(seed):
    # k-means++ seeds must not change with the faster draw: same uniform number, same index.
    p = np.random.default_rng(seed).random(1000) ** 4
    p[::7] = 0.0  # points already on a centre
    p /= p.sum()
    ours, theirs = np.random.default_rng(seed + 100), np.random.default_rng(seed + 100)
    assert [_draw(p, ours) for _ in range(200)] == [int(theirs.choice(len(p), p=p)) for _ in range(200)]


def test_rejects_more_clusters_than_points():
    with pytest.raises(ValueError, match="n_samples=3 should be >= n_clusters=4"):
        kmeans(np.zeros((3, 2), np.float32), 4, n_iter=1, rng=np.random.default_rng(0))


@pytest.mark.parametrize("block", [None, 999])
def test_nearest_scalar_is_the_exact_nearest_value_with_ties_to_the_lowest_index(block, monkeypatch):
    if block is not None:  # the same codes when the elements go in blocks, the last one short
        monkeypatch.setattr(kmeans_module, "SCALARS_PER_BLOCK", block)
    rng = np.random.default_rng(5)
    values = rng.standard_normal(64).astype(np.float32)
    values[[7, 40]] = values[3]  # duplicates: index 3 must win
    x = np.concatenate([rng.standard_normal(5000), values, [-1e6, 1e6]]).astype(np.float32)
    codes = nearest_scalar(x, values)
    distance = np.abs(x[:, None].astype(np.float64) - values[None, :])
    np.testing.assert_array_equal(distance[np.arange(len(x)), codes], distance.min(axis=1))
    assert not np.isin(codes, [7, 40]).any()
    assert codes[5000 + 3] == 3


@pytest.mark.parametrize("block", [None, 999])
def test_scalar_assign_matches_the_brute_force_nearest_centroid(block, monkeypatch):
    if block is not None:
        monkeypatch.setattr(kmeans_module, "SCALARS_PER_BLOCK", block)
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
