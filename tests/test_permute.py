"""Permutation search: never worse than identity, incremental objective exact, helps where it should."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import make_model, run
from onnx import helper

from onnxpq import CompressConfig, compress
from onnxpq.model.graph import constant_tensors
from onnxpq.permute.search import permute_model
from onnxpq.pipeline import ValidationSettings
from onnxpq.quantize.layout import unit_matrix
from onnxpq.quantize.selection import Candidate, find_candidates


def two_layer(rng: np.random.Generator, scales: np.ndarray, *, twins: bool = False) -> onnx.ModelProto:
    """Conv 1x1 (3 -> C) then Conv 1x1 (C -> 48) whose input channels have the given scales.

    With ``twins`` the second half of conv2's input channels repeats the first half, so channel i and
    i + C/2 are perfectly correlated but never share a subvector in the original order.
    """
    c = len(scales)
    w1 = rng.standard_normal((c, 3, 1, 1)).astype(np.float32)
    w2 = rng.standard_normal((48, c, 1, 1)) * scales[None, :, None, None]
    if twins:
        w2[:, c // 2 :] = w2[:, : c // 2]
    w2 = w2.astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], "conv1"),
        helper.make_node("Relu", ["h"], ["r"], "relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], "conv2"),
    ]
    weights = {"w1": w1, "b1": rng.standard_normal(c).astype(np.float32), "w2": w2}
    return make_model(nodes, [("x", [1, 3, 4, 4])], ["y"], weights)


def _objective(weight: np.ndarray, cand: Candidate) -> float:
    """PQF's objective for one consumer, from scratch: n_subvectors · log det of the subvectors' covariance.

    Written independently of the search's incremental moments (same ridge), so a wrong
    incremental update, or a permutation applied in the other direction than the one
    searched, shows up as a mismatch with the reported numbers.
    """
    sub = unit_matrix(weight, cand).astype(np.float64).reshape(-1, cand.subvector_dim)
    cov = np.cov(sub.T, bias=True)
    ridge = 1e-6 * np.trace(cov) / len(cov)
    return len(sub) * float(np.linalg.slogdet(cov + ridge * np.eye(len(cov)))[1])


def test_search_lowers_the_objective_and_reports_what_a_fresh_computation_finds(rng):
    model = two_layer(rng, rng.uniform(0.1, 3.0, 32))
    candidates = find_candidates(model, CompressConfig(min_elements=1, keep_first=False, n_codewords=16))
    permuted, report = permute_model(model, candidates, iters=500, seed=0)
    (row,) = [r for r in report["rows"] if "consumers" in r]
    assert row["consumers"] == ["w2"]
    w2 = next(c for c in candidates if c.name == "w2")
    before = constant_tensors(model.graph)["w2"].to_array()
    after = constant_tensors(permuted.graph)["w2"].to_array()
    assert row["objective_before"] == pytest.approx(_objective(before, w2), rel=1e-6)
    assert row["objective_after"] == pytest.approx(_objective(after, w2), rel=1e-6)
    # Channels of scales 0.1 to 3 in random order: grouping similar scales must pay off clearly.
    assert row["objective_after"] < row["objective_before"] - 0.01 * abs(row["objective_before"])
    assert report["permuted"] == 1
    columns = before.reshape(48, 32).T
    assert sorted(map(tuple, after.reshape(48, 32).T)) == sorted(map(tuple, columns))  # reordered, not changed


def test_correlated_channels_are_brought_together_and_quantize_better(tmp_path, rng):
    """Twin channels far apart: sharing a subvector halves its dimension, which k-means rewards."""
    scales = np.tile(rng.uniform(0.5, 2.0, 16), 2)
    model = two_layer(rng, scales, twins=True)
    onnx.save(model, tmp_path / "in.onnx")
    sqnr = {}
    for permute in (False, True):
        config = CompressConfig(min_elements=1, keep_first=False, n_codewords=16, permute=permute)
        result = compress(
            tmp_path / "in.onnx", tmp_path / f"{permute}.onnx", config, validation=ValidationSettings(enabled=False)
        )
        sqnr[permute] = next(r["sqnr_db"] for r in result.report["layers"] if r["weight"] == "w2")
        if permute:
            assert result.report["permutation"]["permuted"] == 1
            distortion = result.report["permutation"]["consumer_distortion"]
    assert sqnr[True] > sqnr[False] + 3.0
    # The report's own with/without measurement: only the consumer, whose subvectors changed, is listed.
    assert list(distortion) == ["w2"]
    assert distortion["w2"]["sqnr_with_db"] == pytest.approx(sqnr[True])
    assert distortion["w2"]["sqnr_without_db"] == pytest.approx(sqnr[False])


def test_permuted_model_is_equivalent_before_quantization(rng):
    model = two_layer(rng, rng.uniform(0.1, 3.0, 32))
    candidates = find_candidates(model, CompressConfig(min_elements=1, keep_first=False, n_codewords=16))
    permuted, report = permute_model(model, candidates, iters=300, seed=0)
    x = rng.standard_normal((1, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(run(permuted, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)
    assert [n.op_type for n in permuted.graph.node] == [n.op_type for n in model.graph.node]
    # Not vacuous: the permutation was applied (conv1's outputs and conv2's inputs really moved).
    assert report["free"] == 1 and report["permuted"] == 1
    w2_before, w2_after = (constant_tensors(m.graph)["w2"].to_array() for m in (model, permuted))
    assert not np.array_equal(w2_after, w2_before)
