"""Data-aware compression end to end: calibration lowers the output error, also on new samples; bias correction
restores the mean."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_model, rand, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from onnxpq import CompressConfig, compress
from onnxpq.calibration import Dataset
from onnxpq.pipeline import ValidationSettings
from onnxpq.quantize import layer, output_aware
from onnxpq.quantize import stats as stats_module
from onnxpq.quantize.bias import bias_targets
from onnxpq.quantize.layout import unit_matrix
from onnxpq.quantize.selection import Candidate, find_candidates
from onnxpq.quantize.stats import LayerStats, collect_stats

NO_VALIDATION = ValidationSettings(enabled=False)


def correlated_inputs(rng: np.random.Generator, n: int, width: int) -> np.ndarray:
    """Inputs with a mean and channels of very unequal scale: where data-aware quantization matters."""
    scales = rng.permutation(np.geomspace(3.0, 0.03, width))
    return (rng.standard_normal((n, width)) * scales + 0.5).astype(np.float32)


def gemm_model(rng: np.random.Generator, *, alpha: float = 1.0, beta: float = 1.0) -> onnx.ModelProto:
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], "fc", transB=1, alpha=alpha, beta=beta)]
    return make_model(nodes, [("x", ["n", 64])], ["y"], {"w": rand(rng, 96, 64), "b": rand(rng, 96)})


def matmul_add_model(rng: np.random.Generator) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], "mm"), helper.make_node("Add", ["h", "b"], ["y"], "add")]
    return make_model(nodes, [("x", ["n", 64])], ["y"], {"w": rand(rng, 64, 96), "b": rand(rng, 96)})


def conv_bias_model(rng: np.random.Generator) -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], "conv", pads=[1, 1, 1, 1])]
    return make_model(nodes, [("x", ["n", 16, 8, 8])], ["y"], {"w": rand(rng, 32, 16, 3, 3), "b": rand(rng, 32)})


def _compress(model, tmp_path: Path, x: np.ndarray | None, name: str = "x", **config) -> onnx.ModelProto:
    onnx.save(model, tmp_path / "in.onnx")
    calibration = None
    if x is not None:
        np.savez(tmp_path / "calib.npz", **{name: x})
        calibration = tmp_path / "calib.npz"
    # The quantizer's own steps, at a fixed layout: the default bit allocation would pick other layouts per run.
    settings = {"min_elements": 1, "keep_first": False, "n_codewords": 16, "auto_budget": False, **config}
    out = tmp_path / "out.onnx"
    compress(
        tmp_path / "in.onnx",
        out,
        CompressConfig(**settings),
        calibration=calibration,
        validation=NO_VALIDATION,
        force=True,
    )
    return onnx.load(out)


def _output_error(model, compressed, feeds) -> float:
    (ref,), (got,) = run(model, feeds), run(compressed, feeds)
    return float(np.sum((ref - got) ** 2) / np.sum(ref**2))


@pytest.mark.parametrize("build", [gemm_model, matmul_add_model])
def test_calibration_lowers_the_output_error(tmp_path, rng, build):
    model = build(rng)
    x = correlated_inputs(rng, 512, 64)
    free = _output_error(model, _compress(model, tmp_path, None), {"x": x})
    aware = _output_error(model, _compress(model, tmp_path, x), {"x": x})
    assert aware < 0.5 * free


def test_shrinking_a_covariance_from_fewer_samples_than_inputs_generalises(tmp_path, rng, monkeypatch):
    """A classifier after global pooling sees one row per sample: fit to 24 rows, judged on 4000 fresh ones."""
    model = gemm_model(rng)
    mixing = rng.standard_normal((64, 64)).astype(np.float32) / 8

    def draw(n: int) -> np.ndarray:
        return (correlated_inputs(rng, n, 64) @ mixing + 0.3).astype(np.float32)

    calibration, fresh = draw(24), {"x": draw(4000)}
    shrunk = _output_error(model, _compress(model, tmp_path, calibration), fresh)
    monkeypatch.setattr(LayerStats, "shrinkage", lambda self, cov=None: np.zeros(self.groups))
    trusted = _output_error(model, _compress(model, tmp_path, calibration, shrinkage_grid=()), fresh)
    assert shrunk < 0.85 * trusted


def _gemm_layer(rng: np.random.Generator, rows: int) -> tuple[np.ndarray, Candidate, LayerStats]:
    model = gemm_model(rng)
    cand = next(c for c in find_candidates(model, CompressConfig(min_elements=1, keep_first=False)) if c.compressed)
    x = correlated_inputs(rng, rows, 64) @ rng.standard_normal((64, 64)).astype(np.float32) / 8
    stats = collect_stats(model, [cand], Dataset({"x": x.astype(np.float32)}, "test"))[cand.name]
    weight = next(t for t in model.graph.initializer if t.name == cand.name)
    return numpy_helper.to_array(weight), cand, stats


def test_a_rank_deficient_layer_keeps_the_shrinkage_with_the_least_output_error(rng):
    weight, cand, stats = _gemm_layer(rng, rows=24)
    assert stats.rank_deficient
    config = CompressConfig(n_codewords=16)
    chosen = layer.quantize_layer(weight, cand, config, stats).error.output_rel
    alone = {}
    for rho in ((), *((r,) for r in config.shrinkage_grid)):
        alone[rho] = layer.quantize_layer(weight, cand, replace(config, shrinkage_grid=rho), stats).error.output_rel
    assert chosen == min(alone.values())
    assert chosen <= alone[()]  # never worse than OAS's weight alone
    assert len(set(alone.values())) > 1  # the weights do lead to different codebooks


def test_a_full_rank_layer_is_refined_on_its_statistics_as_they_are(rng):
    weight, cand, stats = _gemm_layer(rng, rows=256)
    assert not stats.rank_deficient
    config = CompressConfig(n_codewords=16)
    plain = layer.quantize_layer(weight, cand, config, stats)
    tried = layer.quantize_layer(weight, cand, replace(config, shrinkage_grid=(0.9,)), stats)
    np.testing.assert_array_equal(plain.quantized.codebook.codes, tried.quantized.codebook.codes)


def test_a_codebook_fitted_on_sampled_units_codes_every_unit_in_the_output_metric(rng):
    """The allocator's estimates fit large layers on a sample of units: every unit must still get codes
    (the ones the block metric's E-step picks for the fitted codebook), and the error must be measured
    over all units and stay close to a fit on all of them."""
    model = make_model(
        [helper.make_node("Gemm", ["x", "w"], ["y"], "fc", transB=1)],
        [("x", ["n", 64])],
        ["y"],
        {"w": rand(rng, 1024, 64)},
    )
    config = CompressConfig(n_codewords=16, error_feedback=False, min_elements=1, keep_first=False)
    cand = next(c for c in find_candidates(model, config) if c.compressed)
    x = correlated_inputs(rng, 256, 64)
    stats = collect_stats(model, [cand], Dataset({"x": x}, "test"))[cand.name]
    weight = numpy_helper.to_array(model.graph.initializer[0])
    full = layer.quantize_layer(weight, cand, config, stats)
    sampled = layer.quantize_layer(weight, cand, config, stats, fit_units=8)
    book = sampled.quantized.codebook
    units = unit_matrix(weight, cand)
    assert len(book.codes) == units.size // cand.subvector_dim
    metric = output_aware.damped(stats.metric(False, None, stats.covariance()))
    blocks = output_aware.block_diagonal(metric, cand.subvector_dim)
    np.testing.assert_array_equal(book.codes, output_aware.assign(units, book.centroids, blocks))
    assert full.error.output_rel <= sampled.error.output_rel < 1.2 * full.error.output_rel
    decoded = layer.decoded_weight(sampled.quantized)
    assert sampled.error.rel_l2 == pytest.approx(np.linalg.norm(weight - decoded) / np.linalg.norm(weight), rel=1e-5)


@pytest.mark.parametrize("build", [gemm_model, matmul_add_model, conv_bias_model])
def test_bias_correction_restores_the_mean_output(tmp_path, rng, build):
    model = build(rng)
    shape = (256, 64) if build is not conv_bias_model else (64, 16, 8, 8)
    x = rng.standard_normal(shape).astype(np.float32) + 2.0
    (ref,) = run(model, {"x": x})
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    for correct in (False, True):
        (got,) = run(_compress(model, tmp_path, x, bias_correction=correct), {"x": x})
        shift = np.abs(ref.mean(axis=axes) - got.mean(axis=axes)).max()
        if correct:
            assert shift < 1e-3 * np.abs(ref).mean()
        else:
            assert shift > 1e-2 * np.abs(ref).mean()


def test_gemm_bias_correction_accounts_for_alpha_and_beta(tmp_path, rng):
    model = gemm_model(rng, alpha=0.5, beta=2.0)
    x = rng.standard_normal((256, 64)).astype(np.float32) + 2.0
    (ref,) = run(model, {"x": x})
    (got,) = run(_compress(model, tmp_path, x), {"x": x})
    assert np.abs(ref.mean(0) - got.mean(0)).max() < 1e-3 * np.abs(ref).mean()


def test_bias_targets_skip_shared_and_missing_biases(rng):
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b"], ["h"], "fc1", transB=1),
        helper.make_node("Gemm", ["h", "w2", "b"], ["y1"], "fc2", transB=1),
        helper.make_node("MatMul", ["h", "w3"], ["y2"], "mm"),
    ]
    weights = {"w1": rand(rng, 64, 64), "w2": rand(rng, 64, 64), "b": rand(rng, 64), "w3": rand(rng, 64, 64)}
    model = make_model(nodes, [("x", ["n", 64])], ["y1", "y2"], weights)
    cands = find_candidates(model, CompressConfig(min_elements=1))
    assert bias_targets(model, cands) == {}


def test_sequential_mode_is_deterministic_and_not_worse(tmp_path, rng):
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], "fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], "fc2", transB=1),
    ]
    weights = {"w1": rand(rng, 64, 64), "b1": rand(rng, 64), "w2": rand(rng, 32, 64), "b2": rand(rng, 32)}
    model = make_model(nodes, [("x", ["n", 64])], ["y"], weights)
    x = correlated_inputs(rng, 512, 64)
    once = _compress(model, tmp_path, x, sequential=2)
    again = _compress(model, tmp_path, x, sequential=2)
    assert once.SerializeToString() == again.SerializeToString()
    plain = _compress(model, tmp_path, x)
    assert _output_error(model, once, {"x": x}) <= 1.1 * _output_error(model, plain, {"x": x})


def test_report_records_the_calibration_data(tmp_path, rng):
    model = gemm_model(rng)
    onnx.save(model, tmp_path / "in.onnx")
    np.savez(tmp_path / "calib.npz", x=correlated_inputs(rng, 100, 64))
    result = compress(
        tmp_path / "in.onnx",
        tmp_path / "out.onnx",
        CompressConfig(min_elements=1, keep_first=False, calibration_samples=40),
        calibration=tmp_path / "calib.npz",
        validation=ValidationSettings(measure=False),
    )
    section = result.report["calibration"]
    assert section["samples"] == 40 and len(section["sha256"]) == 64 and section["layers_with_statistics"] == 1
    assert result.report["bias_corrected"] == ["b"]
    (row,) = [r for r in result.report["layers"] if r["skip_reason"] is None]
    assert row["output_sqnr_db"] > row["sqnr_db"]
    assert any("validated on the calibration samples" in w for w in result.report["warnings"])


def test_a_one_shot_calibration_generator_also_serves_validation(tmp_path, rng):
    """Validation falls back to the calibration samples already read, not to a second read of the source."""
    model = gemm_model(rng)
    onnx.save(model, tmp_path / "in.onnx")
    x = correlated_inputs(rng, 24, 64)
    feeds = ({"x": x[i : i + 8]} for i in range(0, 24, 8))
    result = compress(
        tmp_path / "in.onnx",
        tmp_path / "out.onnx",
        CompressConfig(min_elements=1, keep_first=False),
        calibration=feeds,
        validation=ValidationSettings(measure=False),
    )
    assert result.report["calibration"]["samples"] == 24
    assert result.report["validation"]["n_samples"] == 24


def _singular(rng: np.random.Generator, r: int) -> np.ndarray:
    x = rng.standard_normal((r // 4, r))
    return x.T @ x / r


def _ill_conditioned(rng: np.random.Generator, r: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((r, r)))
    return (q * np.geomspace(1.0, 1e-12, r)) @ q.T


def _with_nan(rng: np.random.Generator, r: int) -> np.ndarray:
    h = _singular(rng, r)
    h[rng.integers(r), rng.integers(r)] = np.nan
    return h


#: Statistics a dead ReLU, a constant input, too few rows, fp16 activations or round-off can produce.
HOSTILE_H = {
    "singular": _singular,
    "rank1": lambda rng, r: np.outer(v := rng.standard_normal(r), v),
    "indefinite": lambda rng, r: _singular(rng, r) - 1e-6 * np.eye(r),
    "strongly_indefinite": lambda rng, r: np.diag(rng.uniform(-1.0, 1.0, r)),
    "zero": lambda rng, r: np.zeros((r, r)),
    "nan": _with_nan,
    "ill_conditioned": _ill_conditioned,
    "tiny": lambda rng, r: 1e-300 * _singular(rng, r),
    "huge": lambda rng, r: 1e150 * _singular(rng, r),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_H))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**16),
    rows=st.sampled_from([3, 100_000]),
    blocks=st.sampled_from([1, 4]),
    correct=st.booleans(),
)
def test_quantize_layer_never_raises_on_hostile_statistics(kind, seed, rows, blocks, correct):
    rng = np.random.default_rng(seed)
    model = gemm_model(rng)
    config = CompressConfig(min_elements=1, keep_first=False, n_codewords=16, kmeans_iters=4)
    cand = next(c for c in find_candidates(model, config) if c.compressed)
    weight = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == cand.name))
    r = 64 // blocks
    hessian = np.stack([HOSTILE_H[kind](rng, r) for _ in range(blocks)])
    mean = np.zeros((blocks, r)) if kind == "zero" else rng.standard_normal((blocks, r))
    stats = LayerStats(moment=hessian, mean=mean, rows=rows, blocks=blocks)
    result = layer.quantize_layer(weight, cand, config, stats, correct_bias=correct)
    book = result.quantized.codebook
    assert np.isfinite(book.centroids).all()
    assert book.codes.max() < 16 and len(book.codes) == weight.size // cand.subvector_dim
    assert result.shift is None or np.isfinite(result.shift).all()
    assert result.error.statistics.startswith("full" if blocks == 1 else f"block-diagonal {r}")
    if kind == "nan":
        assert result.error.statistics.endswith(layer.NO_METRIC)


def test_block_diagonal_statistics_quantize_and_shift_the_mean_in_the_units_own_order(rng, monkeypatch):
    model = gemm_model(rng)
    cand = next(c for c in find_candidates(model, CompressConfig(min_elements=1, keep_first=False)) if c.compressed)
    x = correlated_inputs(rng, 512, 64)
    dataset = Dataset({"x": x}, "test")
    full = collect_stats(model, [cand], dataset)[cand.name]
    monkeypatch.setattr(stats_module, "plan_blocks", lambda shapes, memory: dict.fromkeys(shapes, 16))
    blocked = collect_stats(model, [cand], dataset)[cand.name]
    weight = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == cand.name))
    config = CompressConfig(n_codewords=16)
    result = layer.quantize_layer(weight, cand, config, blocked, correct_bias=True)
    assert result.error.statistics == "block-diagonal 16"
    decoded = layer.decoded_weight(result.quantized)
    units, mine = unit_matrix(weight, cand), unit_matrix(decoded, cand)
    np.testing.assert_allclose(result.shift, (units - mine) @ full.mean[0], rtol=1e-4, atol=1e-6)
    free = layer.quantize_layer(weight, cand, config)
    exact = output_aware.output_error(units, mine, full.hessian)
    assert exact < output_aware.output_error(
        units, unit_matrix(layer.decoded_weight(free.quantized), cand), full.hessian
    )
