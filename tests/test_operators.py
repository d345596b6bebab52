"""The operator registry: its entries agree with the options, the layouts and onnxruntime's padding."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from onnxpq.config import CompressConfig
from onnxpq.operators import MULTIPLYING, OP_TYPES, REGISTRY, conv_pads, operator


def test_the_options_offer_exactly_the_registry() -> None:
    assert tuple(REGISTRY) == OP_TYPES
    assert CompressConfig().op_types == OP_TYPES
    assert "Gather" not in MULTIPLYING and {"Conv", "MatMul", "LSTM"} <= MULTIPLYING
    assert operator("Relu") is None


def test_every_weight_input_of_an_entry_has_a_defined_activation_rule() -> None:
    """An entry with statistics names, for each weight input, the tensor that multiplies it."""
    for op in REGISTRY.values():
        if op.statistics is None:
            continue
        for index in op.weight_inputs:
            got = op.activation(["x", "w", "r"], ["y"], index)
            assert got in ("x", "y"), (op.name, index, got)


def test_a_recurrent_r_without_a_y_output_has_no_activation() -> None:
    assert REGISTRY["LSTM"].activation(["x", "w", "r"], ["", "h"], 2) is None
    assert REGISTRY["LSTM"].activation(["x", "w", "r"], ["y"], 2) == "y"
    assert REGISTRY["LSTM"].activation(["x", "w", "r"], ["y"], 1) == "x"


def test_statistics_follow_the_weight_rank() -> None:
    """A batched [B, K, N] MatMul weight has no unit rows; a Conv of any rank does."""
    assert REGISTRY["MatMul"].has_statistics(2) and not REGISTRY["MatMul"].has_statistics(3)
    assert REGISTRY["Conv"].has_statistics(3) and REGISTRY["Conv"].has_statistics(5)
    assert not REGISTRY["Gather"].has_statistics(2)


def test_gemm_layout_and_bias_rules() -> None:
    gemm = REGISTRY["Gemm"]
    assert gemm.inputs_first({}, 1) and not gemm.inputs_first({"transB": 1}, 1)
    assert gemm.bias_scale({"alpha": 2.0, "beta": 4.0}) == 0.5 and gemm.bias_scale({"beta": 0.0}) == 0.0


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID", "NOTSET"])
@pytest.mark.parametrize(("size", "kernel", "stride", "dilation"), [(7, 3, 2, 1), (8, 4, 3, 2), (5, 5, 1, 1)])
def test_conv_pads_give_onnxruntimes_output_size_and_values(auto_pad, size, kernel, stride, dilation) -> None:
    """A Conv padded explicitly with ``conv_pads`` equals the same Conv with ``auto_pad`` in onnxruntime."""
    if dilation > 1 and auto_pad.startswith("SAME"):
        pytest.skip("onnxruntime refuses a dilated Conv with SAME auto_pad")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, size, size)).astype(np.float32)
    w = rng.standard_normal((3, 2, kernel, kernel)).astype(np.float32)
    common = {"strides": [stride, stride], "dilations": [dilation, dilation]}
    extent = [(kernel - 1) * dilation + 1] * 2
    pads = conv_pads({"auto_pad": auto_pad.encode(), "pads": [1, 1, 1, 1]}, [size, size], extent, [stride] * 2)
    explicit = [b for b, _ in pads] + [e for _, e in pads]
    auto = {"auto_pad": auto_pad} if auto_pad != "NOTSET" else {"pads": [1, 1, 1, 1]}
    outs = [_run_conv(x, w, {**common, **attrs}) for attrs in (auto, {"pads": explicit})]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def _run_conv(x: np.ndarray, w: np.ndarray, attrs: dict) -> np.ndarray:
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]
