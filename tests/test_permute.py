"""Permutation search: never worse than identity, incremental objective exact, helps where it should."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import make_model, run
from onnx import helper

from onnxpq import CompressConfig, compress
from onnxpq.channels import find_groups
from onnxpq.graph import constant_tensors
from onnxpq.permute import _consumer, permute_model, search_group
from onnxpq.pipeline import ValidationSettings
from onnxpq.selection import find_candidates


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


def _consumers(model):
    candidates = find_candidates(model, CompressConfig(min_elements=1, keep_first=False, n_codewords=16))
    by_name = {c.name: c for c in candidates}
    values = {n: c.to_array() for n, c in constant_tensors(model.graph).items()}
    (group,) = [g for g in find_groups(model) if not g.frozen]
    return group, [_consumer(m, group, by_name[m.tensor], values[m.tensor]) for m in group.consumers]


def test_search_is_never_worse_and_its_incremental_objective_is_exact(rng):
    model = two_layer(rng, rng.uniform(0.1, 3.0, 32))
    group, consumers = _consumers(model)
    found = search_group(consumers, group.size, 500, np.random.default_rng(0))
    assert found.after <= found.before
    fresh = sum(c.weight * c.logdet(*c.moments(found.perm)) for c in consumers)
    assert abs(fresh - found.after) <= 1e-6 * abs(fresh)
    assert sorted(found.perm) == list(range(group.size))


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
    assert report["free"] == 1 and report["rows"][0]["objective_after"] <= report["rows"][0]["objective_before"]
