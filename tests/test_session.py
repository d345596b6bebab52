"""onnxruntime sessions as onnxpq opens them: what they hold on to, and where an optimized model's weights go."""

from __future__ import annotations

import sys

import numpy as np
import onnx
from conftest import make_model, rand
from onnx import helper

from onnxpq.model.session import session, weights_file


def _matmul(w: np.ndarray) -> onnx.ModelProto:
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", [2, len(w)])], ["y"], {"w": w})


def test_a_session_built_from_bytes_does_not_keep_them(rng):
    """onnxruntime's wrapper would hold the serialized model, a copy of every weight, for the session's life."""
    w = rand(rng, 256, 64)
    data = _matmul(w).SerializeToString()
    before = sys.getrefcount(data)
    sess = session(data)
    assert sys.getrefcount(data) == before
    x = rand(rng, 2, 256)
    (y,) = sess.run(None, {"x": x})
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-5)


def test_an_optimized_model_leaves_its_weights_beside_it(tmp_path, rng):
    """Callers read only the optimized graph: its weights must not come back with it."""
    out = tmp_path / "optimized.onnx"
    session(_matmul(rand(rng, 256, 64)).SerializeToString(), optimized_path=str(out))
    graph = onnx.load(out, load_external_data=False).graph
    (weight,) = [t for t in graph.initializer if t.name == "w"]
    assert weight.data_location == onnx.TensorProto.EXTERNAL
    assert (tmp_path / weights_file(out)).stat().st_size >= 256 * 64 * 4


def test_a_session_without_packed_weights_computes_the_same(rng):
    """The statistics pass runs without onnxruntime's packed weight copies: the same outputs, less memory."""
    data = _matmul(rand(rng, 256, 64)).SerializeToString()
    x = rand(rng, 2, 256)
    (packed,) = session(data).run(None, {"x": x})
    (plain,) = session(data, prepack=False).run(None, {"x": x})
    np.testing.assert_allclose(plain, packed, rtol=1e-5, atol=1e-5)
