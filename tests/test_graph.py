"""Copies built from parts: the same model as copying and then editing, field for field."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import make_model, rand
from onnx import helper, numpy_helper

from onnxpq.model.graph import constants_as_inputs, copy_except, replace_constants, with_constants


def _model(rng: np.random.Generator) -> onnx.ModelProto:
    """A Conv weight as an initializer, a Gemm weight in a Constant node, metadata and a doc string."""
    gemm_w = helper.make_node("Constant", [], ["g"], value=numpy_helper.from_array(rand(rng, 10, 8 * 36), "g"))
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["f"]),
        gemm_w,
        helper.make_node("Gemm", ["f", "g"], ["y"], transB=1),
    ]
    model = make_model(nodes, [("x", ["n", 4, 6, 6])], ["y"], {"w": rand(rng, 8, 4, 3, 3), "b": rand(rng, 8)})
    model.metadata_props.add(key="dictionary", value="abc")
    model.graph.doc_string = "kept"
    return model


def test_with_constants_is_a_copy_with_replace_constants_applied(rng):
    model = _model(rng)
    values = {"w": rand(rng, 8, 4, 3, 3), "g": rand(rng, 10, 8 * 36)}
    expected = onnx.ModelProto()
    expected.CopyFrom(model)
    replace_constants(expected.graph, values)
    before = model.SerializeToString()
    assert with_constants(model, values).SerializeToString() == expected.SerializeToString()
    assert model.SerializeToString() == before  # the input is not edited


def test_copy_except_leaves_out_only_the_named_fields(rng):
    model = _model(rng)
    shell = copy_except(model, onnx.ModelProto(), "graph")
    assert not shell.HasField("graph") and shell.metadata_props == model.metadata_props
    assert shell.opset_import == model.opset_import and shell.ir_version == model.ir_version
    graph = copy_except(model.graph, onnx.GraphProto(), "initializer")
    assert not graph.initializer and graph.node == model.graph.node and graph.doc_string == "kept"


def test_constants_as_inputs_keep_everything_but_the_named_constants(rng):
    model = _model(rng)
    probe = constants_as_inputs(model, ["w", "g"])
    assert [t.name for t in probe.graph.initializer] == ["b"]
    assert [n.op_type for n in probe.graph.node] == ["Conv", "Flatten", "Gemm"]
    assert probe.metadata_props == model.metadata_props and probe.graph.output == model.graph.output
