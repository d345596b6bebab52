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


def _fused_matmul_model(rng: np.random.Generator, trans_a: int, trans_b: int) -> onnx.ModelProto:
    """y = 0.5 * op(x) @ op(w) with onnxruntime's com.microsoft FusedMatMul, as its transformer optimizer
    writes MatMul + Transpose + Mul: x [batch, 16, 64] (transA) or [batch, 64, 16], w [64, 48] or [48, 64]."""
    w = rng.standard_normal((48, 64) if trans_b else (64, 48)).astype(np.float32)
    node = helper.make_node(
        "FusedMatMul", ["x", "w"], ["y"], "fused", domain="com.microsoft", transA=trans_a, transB=trans_b, alpha=0.5
    )
    x_shape = ["batch", 64, 16] if trans_a else ["batch", 16, 64]
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


@pytest.mark.parametrize(("trans_a", "trans_b"), [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_fused_matmul_weights_compress_data_aware(tmp_path, rng, trans_a, trans_b) -> None:
    """onnxruntime's fused MatMul (one registry entry): its weight is found, cut along its inputs, quantized from
    the statistics of its (transposed) input, and the model still runs in onnxruntime with the decode folded.
    The inputs' features have scales from 0.01 to 10, so fitting the outputs beats fitting the weights."""
    from onnxpq import compress

    model = _fused_matmul_model(rng, trans_a, trans_b)
    onnx.save(model, tmp_path / "in.onnx")
    scales = np.geomspace(0.01, 10, 64).astype(np.float32)
    feature_axis = 1 if trans_a else 2
    shape = [1, 1, 1]
    shape[feature_axis] = 64
    x = rng.standard_normal((96, 64, 16) if trans_a else (96, 16, 64)).astype(np.float32) * scales.reshape(shape)
    np.savez(tmp_path / "calib.npz", x=x)
    errors = {}
    for mode, data in (("aware", tmp_path / "calib.npz"), ("free", None)):
        out = tmp_path / f"{mode}.onnx"
        config = CompressConfig(min_elements=16, subvector_dim=4)
        result = compress(tmp_path / "in.onnx", out, config, calibration=data, force=True)
        (row,) = [r for r in result.report["layers"] if r["weight"] == "w"]
        assert row["op_type"] == "FusedMatMul" and row["skip_reason"] is None
        assert row["statistics"] == ("full" if mode == "aware" else None)
        ref, got = (_run(m, x[:8]) for m in (model, onnx.load(out)))
        errors[mode] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    assert errors["aware"] < 0.75 * errors["free"], errors  # measured: 0.07 vs 0.31 (transB=0), 0.19 vs 0.31


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]
