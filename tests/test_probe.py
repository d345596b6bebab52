"""The allocator's probe: a layer's suffix computes the outputs the whole model computes with that layer changed."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import make_model, rand, run
from onnx import helper, numpy_helper

from onnxpq.calibration import Dataset
from onnxpq.model.graph import constant_tensors, constants_as_inputs, replace_constants
from onnxpq.quantize.probe import OutputProbe, _suffix

LAYERS = {"w1": ["w1", "b1"], "w2": ["w2"], "g": ["g"], "dead": ["dead"]}


def _skip_model(rng: np.random.Generator) -> onnx.ModelProto:
    """conv1 -> relu -> conv2 + skip -> pool -> reshape (shape from a Constant node) -> gemm = y; mean(relu) = z;
    and a weight whose node reaches no output."""
    shape = numpy_helper.from_array(np.array([-1, 8], dtype=np.int64), "shape")
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["s"]),
        helper.make_node("GlobalAveragePool", ["s"], ["p"]),
        helper.make_node("Constant", [], ["shape"], value=shape),
        helper.make_node("Reshape", ["p", "shape"], ["f"]),
        helper.make_node("Gemm", ["f", "g"], ["y"], transB=1),
        helper.make_node("ReduceMean", ["r1"], ["z"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["f", "dead"], ["unused"]),
    ]
    weights = {
        "w1": rand(rng, 8, 4, 3, 3),
        "b1": rand(rng, 8),
        "w2": rand(rng, 8, 8, 3, 3) * 0.2,
        "g": rand(rng, 5, 8),
        "dead": rand(rng, 8, 3),
    }
    return make_model(nodes, [("x", ["n", 4, 6, 6])], ["y", "z"], weights)


def _relative_error(model: onnx.ModelProto, changed: dict[str, np.ndarray], x: np.ndarray) -> float:
    """What the probe measures, from scratch: a model with ``changed`` stored, against the original."""
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    replace_constants(edited.graph, changed)
    ref, out = run(model, {"x": x}), run(edited, {"x": x})
    noise = sum(np.sum((r.astype(np.float64) - o) ** 2) for r, o in zip(ref, out, strict=True))
    return noise / sum(np.sum(r.astype(np.float64) ** 2) for r in ref)


def test_a_suffix_reads_its_border_and_computes_only_the_outputs_it_reaches(rng):
    graph = constants_as_inputs(_skip_model(rng), ["w1", "b1", "w2", "g", "dead"]).graph
    ops = [n.op_type for n in graph.node]
    suffix = _suffix(graph, {"w2"})
    assert [ops[i] for i in suffix.nodes] == ["Conv", "Add", "GlobalAveragePool", "Constant", "Reshape", "Gemm"]
    assert suffix.border == ("r1",) and suffix.outputs == ("y",) and not suffix.whole
    first = _suffix(graph, {"w1", "b1"})
    assert first.border == () and first.outputs == ("y", "z") and ops[first.nodes[0]] == "Conv"
    assert _suffix(graph, {"dead"}).outputs == ()


#: Bytes of relu's output on 12 samples, the border of w2: g's (the reshaped pool) then needs a group of its own.
R1_BYTES = 12 * 8 * 6 * 6 * 4


@pytest.mark.parametrize("border_bytes", [0, R1_BYTES, 1 << 20], ids=["whole", "group-per-layer", "one-group"])
def test_every_layer_measures_what_the_whole_model_with_it_changed_measures(rng, border_bytes):
    """Suffixes, one group per layer and the whole model (``border_bytes=0``) agree with a fresh model."""
    model = _skip_model(rng)
    x = rand(rng, 12, 4, 6, 6)
    probe = OutputProbe(model, LAYERS, Dataset({"x": x}, "test"), 12, border_bytes=border_bytes)
    assert probe.order == ["w1", "w2", "g", "dead"]  # the order their suffixes start in
    assert all(probe.suffixes[n].whole for n in ("w2", "g")) == (border_bytes == 0)  # w1 has no border
    constants = {n: c.to_array() for n, c in constant_tensors(model.graph).items()}
    for layer in probe.order:
        changed = {n: constants[n] * 1.05 + 0.01 for n in LAYERS[layer]}
        expected = _relative_error(model, changed, x)
        assert probe.error(layer, changed) == pytest.approx(expected, rel=1e-4, abs=1e-12)
    assert probe.error("dead", {"dead": constants["dead"] * 2}) == 0.0


def test_groups_hold_consecutive_layers_and_split_where_their_borders_do_not_fit(rng):
    x = rand(rng, 12, 4, 6, 6)
    whole = OutputProbe(_skip_model(rng), LAYERS, Dataset({"x": x}, "test"), 12)
    split = OutputProbe(_skip_model(rng), LAYERS, Dataset({"x": x}, "test"), 12, border_bytes=R1_BYTES)
    assert len(set(whole.groups.values())) == 1
    assert split.groups["w2"] != split.groups["g"] and not split.suffixes["w2"].whole


def test_models_with_subgraphs_are_probed_whole(rng):
    then = helper.make_graph(
        [helper.make_node("Relu", ["c"], ["t"])], "then", [], [helper.make_tensor_value_info("t", 1, None)]
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["c"], ["e"])], "else", [], [helper.make_tensor_value_info("e", 1, None)]
    )
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other),
    ]
    model = make_model(nodes, [("x", ["n", 4, 6, 6])], ["y"], {"w": rand(rng, 8, 4, 3, 3), "cond": np.array(True)})
    x = rand(rng, 4, 4, 6, 6)
    probe = OutputProbe(model, {"w": ["w"]}, Dataset({"x": x}, "test"), 4)
    assert probe.suffixes["w"].whole
    w = constant_tensors(model.graph)["w"].to_array()
    assert probe.error("w", {"w": w * 1.1}) == pytest.approx(_relative_error(model, {"w": w * 1.1}, x), rel=1e-4)


def _whole_probe(model: onnx.ModelProto, layers: dict, x: np.ndarray) -> OutputProbe:
    """The probe of 0.8.0: every layer on the whole model."""
    return OutputProbe(model, layers, Dataset({"x": x}, "test"), len(x), border_bytes=0)


def test_float16_borders_measure_against_the_suffix_itself(rng):
    """onnxruntime runs float16 nodes in float32 without the casts between them: measured against the whole
    model, a float16 border would read as error even with the weight unchanged."""
    nodes = [
        helper.make_node("Exp", ["x"], ["u"]),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
        helper.make_node("Exp", ["u"], ["u2"]),
        helper.make_node("Mul", ["y", "u2"], ["o"]),
    ]
    w = (rand(rng, 16, 16) * 0.3).astype(np.float16)
    model = make_model(nodes, [("x", ["n", 16])], ["o"], {"w": w}, elem_type=onnx.TensorProto.FLOAT16)
    x = (rand(rng, 8, 16) * 0.5).astype(np.float16)
    probe = OutputProbe(model, {"w": ["w"]}, Dataset({"x": x}, "test"), 8)
    assert probe.suffixes["w"].border == ("u2",)
    assert probe.error("w", {"w": w}) == 0.0
    changed = {"w": (w * 1.01).astype(np.float16)}
    assert probe.error("w", changed) == pytest.approx(
        _whole_probe(model, {"w": ["w"]}, x).error("w", changed), rel=0.05
    )


def test_nodes_out_of_order_are_sorted_before_the_suffixes_are_found(rng):
    model = _skip_model(rng)
    nodes = list(model.graph.node)[::-1]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    x = rand(rng, 12, 4, 6, 6)
    probe = OutputProbe(model, LAYERS, Dataset({"x": x}, "test"), 12)
    assert probe.suffixes["w2"].border == ("r1",)
    w2 = constant_tensors(model.graph)["w2"].to_array() * 1.05
    assert probe.error("w2", {"w2": w2}) == pytest.approx(_relative_error(model, {"w2": w2}, x), rel=1e-4)


def test_a_border_that_is_not_an_array_probes_the_layer_whole(rng):
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("SequenceConstruct", ["r"], ["s"]),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
        helper.make_node("SequenceInsert", ["s", "y"], ["s2"]),
        helper.make_node("ConcatFromSequence", ["s2"], ["o"], axis=0),
    ]
    w = rand(rng, 8, 8)
    model = make_model(nodes, [("x", ["n", 8])], ["o"], {"w": w})
    x = rand(rng, 6, 8)
    probe = OutputProbe(model, {"w": ["w"]}, Dataset({"x": x}, "test"), 6)
    assert probe.suffixes["w"].whole
    assert probe.error("w", {"w": w * 1.1}) == pytest.approx(_relative_error(model, {"w": w * 1.1}, x), rel=1e-4)


def test_a_repeated_output_counts_in_the_signal_as_often_as_in_the_noise(rng):
    model = _skip_model(rng)
    model.graph.output.insert(1, model.graph.output[0])
    x = rand(rng, 12, 4, 6, 6)
    w2 = constant_tensors(model.graph)["w2"].to_array() * 1.05
    probe = OutputProbe(model, LAYERS, Dataset({"x": x}, "test"), 12)
    assert probe.error("w2", {"w2": w2}) == pytest.approx(_whole_probe(model, LAYERS, x).error("w2", {"w2": w2}))
    assert probe.error("w2", {"w2": w2}) == pytest.approx(_relative_error(model, {"w2": w2}, x), rel=1e-4)
