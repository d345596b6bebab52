"""Small graph builders shared by the tests: each returns an in-memory ONNX model with random weights."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[tuple[str, Sequence[int | str]]],
    outputs: Sequence[str],
    weights: dict[str, np.ndarray],
    *,
    opset: int = 17,
    ir_version: int | None = None,
    elem_type: int = TensorProto.FLOAT,
) -> onnx.ModelProto:
    """A single-graph model; output shapes are left for onnxruntime to infer."""
    graph = helper.make_graph(
        list(nodes),
        "test",
        [helper.make_tensor_value_info(n, elem_type, list(s)) for n, s in inputs],
        [helper.make_tensor_value_info(n, elem_type, None) for n in outputs],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version or {11: 6, 21: 10}.get(opset, 8)
    inferred = onnx.shape_inference.infer_shapes(model)
    model.graph.ClearField("output")
    model.graph.output.extend(inferred.graph.output)
    return model


def rand(rng: np.random.Generator, *shape: int, dtype=np.float32) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


def conv_model(out_c=32, in_c=16, k=3, group=1, dilation=1, rng=None) -> onnx.ModelProto:
    rng = rng or np.random.default_rng(0)
    w = {"w": rand(rng, out_c, in_c // group, k, k), "b": rand(rng, out_c)}
    node = helper.make_node(
        "Conv",
        ["x", "w", "b"],
        ["y"],
        "conv",
        group=group,
        dilations=[dilation, dilation],
        pads=[dilation * (k // 2)] * 4,
    )
    return make_model([node], [("x", [1, in_c, 12, 12])], ["y"], w)


def run(model: onnx.ModelProto | str | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
