"""Layer statistics: im2col matches onnxruntime's Conv, H measures exactly the layer's output energy, and the
covariance is shrunk by the OAS estimator."""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx
import pytest
from conftest import make_model, rand, run
from onnx import helper

from onnxpq import compress
from onnxpq.calibration import Dataset
from onnxpq.config import CompressConfig
from onnxpq.errors import ConfigError
from onnxpq.pipeline import ValidationSettings
from onnxpq.quantize import stats as stats_module
from onnxpq.quantize.layout import input_order, unit_matrix
from onnxpq.quantize.selection import find_candidates
from onnxpq.quantize.stats import StatsShape, collect_stats, conv_patches, plan_blocks

CONV_CASES = {
    "3x3_pad": dict(kernel=(3, 3), pads=[1, 1, 1, 1]),
    "stride2": dict(kernel=(3, 3), pads=[1, 1, 1, 1], strides=[2, 2]),
    "dilation2": dict(kernel=(3, 3), pads=[2, 2, 2, 2], dilations=[2, 2]),
    "asym_pad": dict(kernel=(3, 2), pads=[0, 1, 2, 0]),
    "same_upper": dict(kernel=(3, 3), auto_pad="SAME_UPPER", strides=[2, 2]),
    "same_lower": dict(kernel=(2, 2), auto_pad="SAME_LOWER"),
    "valid": dict(kernel=(3, 3), auto_pad="VALID"),
    "grouped": dict(kernel=(3, 3), pads=[1, 1, 1, 1], group=2),
    "depthwise": dict(kernel=(3, 3), pads=[1, 1, 1, 1], group=8),
    "1d": dict(kernel=(5,), pads=[2, 2]),
    "pointwise": dict(kernel=(1, 1)),
}


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_patches_reproduce_onnxruntime_conv(case, rng):
    spec = dict(CONV_CASES[case])
    kernel = spec.pop("kernel")
    group = spec.get("group", 1)
    c_in, c_out = 8, 8
    w = rand(rng, c_out, c_in // group, *kernel)
    spatial = [9] * len(kernel)
    node = helper.make_node("Conv", ["x", "w"], ["y"], **spec)
    model = make_model([node], [("x", [2, c_in, *spatial])], ["y"], {"w": w})
    x = rand(rng, 2, c_in, *spatial)
    (expected,) = run(model, {"x": x})
    patches = conv_patches(x, w.shape, {k: v for k, v in spec.items()})  # (P, groups, R)
    w_g = w.reshape(group, c_out // group, -1)
    y = np.einsum("pgr,gor->pgo", patches, w_g).reshape(len(patches), c_out)
    out_spatial = expected.shape[2:]
    y = y.reshape(2, *out_spatial, c_out).transpose(0, -1, *range(1, 1 + len(kernel)))
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op", ["MatMul", "Gemm_transB1", "Gemm_transB0", "Conv"])
def test_hessian_measures_the_output_energy(op, rng):
    if op == "Conv":
        w = rand(rng, 16, 8, 3, 3)
        node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
        model = make_model([node], [("x", ["n", 8, 6, 6])], ["y"], {"w": w})
        x = rand(rng, 4, 8, 6, 6)
    else:
        trans_b = op == "Gemm_transB1"
        w = rand(rng, 16, 24) if trans_b else rand(rng, 24, 16)
        attrs = {"transB": 1} if trans_b else {}
        node = helper.make_node(op.split("_")[0], ["x", "w"], ["y"], **attrs)
        model = make_model([node], [("x", ["n", 24])], ["y"], {"w": w})
        x = rand(rng, 10, 24)
    (y,) = run(model, {"x": x})
    cands = [c for c in find_candidates(model, CompressConfig(min_elements=1, keep_first=False)) if c.compressed]
    stats = collect_stats(model, cands, Dataset({"x": x}, "test"))["w"]
    units = unit_matrix(w, cands[0]).astype(np.float64)
    energy = float(np.einsum("ur,rs,us->", units, stats.hessian[0], units)) * stats.rows
    assert energy == pytest.approx(float(np.sum(y.astype(np.float64) ** 2)), rel=1e-4)
    # The mean input predicts the mean output per unit.
    mean_out = units @ stats.mean[0]
    axis = (0, 2, 3) if op == "Conv" else 0
    np.testing.assert_allclose(mean_out, y.mean(axis=axis), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rows", [12, 40, 4000])
def test_shrinkage_is_scikit_learns_oracle_approximating_estimator_applied_when_rank_deficient(rows, rng):
    oas = pytest.importorskip("sklearn.covariance", reason="the reference estimator is scikit-learn's").oas
    w = rand(rng, 16, 24)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", ["n", 16])], ["y"], {"w": w})
    mixing = rand(rng, 16, 16)
    x = (rand(rng, rows, 16) @ mixing + 1.0).astype(np.float32)
    cands = [c for c in find_candidates(model, CompressConfig(min_elements=1, keep_first=False)) if c.compressed]
    stats = collect_stats(model, cands, Dataset({"x": x}, "test"))["w"]
    expected_cov, expected_rho = oas(x.astype(np.float64)[:, input_order(cands[0])])
    assert stats.shrinkage()[0] == pytest.approx(expected_rho, rel=1e-4)
    if rows > 1000:
        assert stats.shrinkage()[0] < 0.01
    if rows >= 16:  # as many rows as inputs: full rank, trusted as it is
        np.testing.assert_array_equal(stats.metric(centred=True), stats.covariance())
        np.testing.assert_array_equal(stats.metric(centred=False), stats.hessian)
        return
    np.testing.assert_allclose(stats.metric(centred=True)[0], expected_cov, rtol=1e-4, atol=1e-6)
    # Uncentred, the mean's outer product is kept: only the covariance part is shrunk.
    mean = stats.mean[0]
    uncentred = expected_cov + np.outer(mean, mean)
    np.testing.assert_allclose(stats.metric(centred=False)[0], uncentred, rtol=1e-4, atol=1e-6)


def _grouped_conv(rng: np.random.Generator):
    node = helper.make_node("Conv", ["x", "w"], ["y"], "conv", pads=[1, 1, 1, 1], group=2)
    model = make_model([node], [("x", ["n", 16, 6, 6])], ["y"], {"w": rand(rng, 8, 8, 3, 3)})
    cands = [c for c in find_candidates(model, CompressConfig(min_elements=1, keep_first=False)) if c.compressed]
    return model, cands, Dataset({"x": rand(rng, 20, 16, 6, 6)}, "test")


@pytest.mark.parametrize("block", [36, 18])
def test_block_diagonal_statistics_are_the_diagonal_blocks_of_the_full_ones(block, rng, monkeypatch):
    model, cands, dataset = _grouped_conv(rng)
    full = collect_stats(model, cands, dataset)["w"]
    assert (full.form, full.blocks, full.block) == ("full", 1, 72)
    monkeypatch.setattr(stats_module, "plan_blocks", lambda shapes, memory: dict.fromkeys(shapes, block))
    blocked = collect_stats(model, cands, dataset)["w"]
    nb = 72 // block
    assert (blocked.form, blocked.blocks, blocked.groups) == (f"block-diagonal {block}", nb, 2 * nb)
    for g in range(2):
        for b in range(nb):
            cols = slice(b * block, (b + 1) * block)
            np.testing.assert_allclose(blocked.hessian[g * nb + b], full.hessian[g][cols, cols], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(blocked.mean[g * nb + b], full.mean[g][cols], rtol=1e-5, atol=1e-6)
    assert blocked.rows == full.rows


def test_rows_in_small_chunks_give_the_same_statistics(rng, monkeypatch):
    model, cands, dataset = _grouped_conv(rng)
    whole = collect_stats(model, cands, dataset)["w"]
    monkeypatch.setattr(stats_module, "ROW_CHUNK_BYTES", 4096)  # a few output positions at a time
    chunked = collect_stats(model, cands, dataset)["w"]
    np.testing.assert_allclose(chunked.hessian, whole.hessian, rtol=1e-5, atol=1e-6)
    assert chunked.rows == whole.rows


@pytest.mark.parametrize("op", ["Conv", "MatMul"])
def test_a_layer_over_the_row_cap_uses_a_reproducible_random_share_of_its_rows(op, rng, monkeypatch):
    """720 patches (or 720 token rows) over a cap of 180: a quarter of each batch's rows, real ones (their H
    averages the same patches'), the same on every run, and each chunk of them taken from the kept rows."""
    if op == "Conv":  # depthwise: 16 groups of R = 9, so 180 rows estimate each H well
        node = helper.make_node("Conv", ["x", "w"], ["y"], "conv", pads=[1, 1, 1, 1], group=16)
        model = make_model([node], [("x", ["n", 16, 6, 6])], ["y"], {"w": rand(rng, 16, 1, 3, 3)})
        cands = [c for c in find_candidates(model, CompressConfig(min_elements=1, keep_first=False)) if c.compressed]
        dataset = Dataset({"x": rand(rng, 20, 16, 6, 6)}, "test")
    else:
        node = helper.make_node("MatMul", ["x", "w"], ["y"], "mm")
        model = make_model([node], [("x", ["n", 36, 16])], ["y"], {"w": rand(rng, 16, 8)})
        cands = [c for c in find_candidates(model, CompressConfig(min_elements=1)) if c.compressed]
        dataset = Dataset({"x": rand(rng, 20, 36, 16)}, "test")
    full = collect_stats(model, cands, dataset)[cands[0].name]
    assert full.rows == 720
    sampled = collect_stats(model, cands, dataset, rows=(180, 1))[cands[0].name]
    assert 170 <= sampled.rows <= 190
    again = collect_stats(model, cands, dataset, rows=(180, 1))[cands[0].name]
    np.testing.assert_array_equal(again.hessian, sampled.hessian)
    error = np.linalg.norm(sampled.hessian - full.hessian) / np.linalg.norm(full.hessian)
    assert 0 < error < 0.3
    monkeypatch.setattr(stats_module, "ROW_CHUNK_BYTES", 4096)
    chunked = collect_stats(model, cands, dataset, rows=(180, 1))[cands[0].name]
    np.testing.assert_allclose(chunked.hessian, sampled.hessian, rtol=1e-5, atol=1e-6)


def test_the_budget_shrinks_the_largest_layers_first_and_refuses_what_cannot_fit():
    shapes = {"big": StatsShape(1, 4096, 4), "small": StatsShape(1, 512, 4)}
    mib = 2**20
    assert plan_blocks(shapes, 4096 * mib) == {"big": 4096, "small": 512}
    # One layer may hold 1/16 of the budget: 64 MiB leaves "big" 4 MiB, 128 columns; "small" (2 MiB) fits whole.
    assert plan_blocks(shapes, 64 * mib) == {"big": 128, "small": 512}
    # All layers together may hold half of it (in float32): twenty 4 MiB layers in 64 MiB, eight of them halve
    # their blocks. Each layer's float64 copy (8 MiB) is within the 1/16 a layer may take.
    many = {f"l{i}": StatsShape(1, 1024, 4) for i in range(20)}
    blocks = plan_blocks(many, 128 * mib)
    assert sorted(blocks.values()) == [512] * 8 + [1024] * 12
    with pytest.raises(ConfigError, match="statistics_memory_mib"):
        plan_blocks(shapes, 0.1 * mib)


def test_a_conv_with_65536_inputs_compresses_data_aware_within_the_memory_budget(tmp_path, rng):
    """1-D audio conv: 1024 channels x 64 taps, a 34 GB full H; the whole compression stays under the budget."""
    budget_mib = 128
    node = helper.make_node("Conv", ["x", "w"], ["y"], "conv", pads=[32, 31])
    model = make_model([node], [("x", ["n", 1024, 48])], ["y"], {"w": rand(rng, 8, 1024, 64) / 64})
    onnx.save(model, tmp_path / "in.onnx")
    np.savez(tmp_path / "calib.npz", x=rand(rng, 16, 1024, 48))
    config = CompressConfig(
        min_elements=1, keep_first=False, n_codewords=16, kmeans_iters=2, statistics_memory_mib=budget_mib
    )
    tracemalloc.start()
    try:
        result = compress(
            tmp_path / "in.onnx",
            tmp_path / "out.onnx",
            config,
            calibration=tmp_path / "calib.npz",
            validation=ValidationSettings(enabled=False),
            force=True,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    (row,) = [r for r in result.report["layers"] if r["weight"] == "w"]
    assert row["statistics"].startswith("block-diagonal ")
    assert row["output_sqnr_db"] is not None
    assert peak < budget_mib * 2**20


def test_statistics_follow_a_strided_variant_into_its_column_order(rng):
    """A MatMul weight's column order depends on d: the allocator's d=8 variant must see H in its own order.

    Collected once for the d=4 layout and re-indexed, the statistics equal those collected for d=8 directly;
    before, the d=8 variant was refined against H in the d=4 order.
    """
    w = rand(rng, 64, 32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", ["n", 64])], ["y"], {"w": w})
    data = Dataset({"x": rand(rng, 40, 64) + rand(rng, 1, 64)}, source="test")
    (four,) = find_candidates(model, CompressConfig(min_elements=1, subvector_dim=4))
    (eight,) = find_candidates(model, CompressConfig(min_elements=1, subvector_dim=8))
    assert four.strided and not np.array_equal(input_order(four), input_order(eight))
    moved = collect_stats(model, [four], data)["w"].working(input_order(eight))
    direct = collect_stats(model, [eight], data)["w"]
    np.testing.assert_allclose(moved.hessian, direct.hessian, rtol=1e-6)
    np.testing.assert_allclose(moved.mean, direct.mean, rtol=1e-6)


def test_a_layer_with_far_more_inputs_than_outputs_gets_affordable_blocks():
    """R x R factorisation costs R³ whatever the units: 8 outputs over R = 4096 inputs used to take minutes
    per allocator setting. Blocks then bound B² per unit; a layer with as many units as inputs keeps its H."""
    narrow = StatsShape(groups=1, inputs=4096, step=4, units=8)
    wide = StatsShape(groups=1, inputs=4096, step=4, units=4096)
    blocks = plan_blocks({"narrow": narrow, "wide": wide}, 4096 * 2**20)
    assert blocks["wide"] == 4096
    assert blocks["narrow"] < 4096 and narrow.affordable(blocks["narrow"]) and 4096 % blocks["narrow"] == 0


def test_a_held_covariance_is_the_computed_one_and_does_not_follow_a_reordering(rng):
    """The allocator computes a layer's covariance once for all its settings; another column order gets its own."""
    w = rand(rng, 64, 32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", ["n", 64])], ["y"], {"w": w})
    data = Dataset({"x": rand(rng, 40, 64) + rand(rng, 1, 64)}, source="test")
    (four,) = find_candidates(model, CompressConfig(min_elements=1, subvector_dim=4))
    (eight,) = find_candidates(model, CompressConfig(min_elements=1, subvector_dim=8))
    stats = collect_stats(model, [four], data)["w"]
    held = stats.with_covariance()
    np.testing.assert_array_equal(held.covariance(), stats.covariance())
    assert held.covariance() is held.covariance()
    np.testing.assert_array_equal(
        held.working(input_order(eight)).covariance(), stats.working(input_order(eight)).covariance()
    )
