"""Layer statistics: im2col matches onnxruntime's Conv, H measures exactly the layer's output energy, and the
covariance is shrunk by the OAS estimator."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_model, rand, run
from onnx import helper
from sklearn.covariance import oas

from onnxpq.calibration import Dataset
from onnxpq.config import CompressConfig
from onnxpq.layout import input_order, unit_matrix
from onnxpq.selection import find_candidates
from onnxpq.stats import collect_stats, conv_patches

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


def _linear_energy(model, weight_name, feeds, rng):
    """Σ over units of wᵀ H w must equal the mean squared output of the layer per input row."""
    cands = [c for c in find_candidates(model, CompressConfig(min_elements=1, keep_first=False)) if c.compressed]
    dataset = Dataset(feeds, "test")
    stats = collect_stats(model, cands, dataset)[weight_name]
    cand = next(c for c in cands if c.name == weight_name)
    return stats, cand


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
