"""Weights inside If/Loop/Scan bodies and LSTM/GRU weights are compressed, decode exactly, and fold in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import rand, run
from onnx import TensorProto, helper, numpy_helper
from test_encode import NO_VALIDATION, assert_equivalent

from onnxpq import CompressConfig, compress
from onnxpq.calibration import Dataset
from onnxpq.model.subgraphs import inline_branches, lift_subgraph_weights, scoped_nodes
from onnxpq.quantize.layout import data_aware
from onnxpq.quantize.selection import find_candidates
from onnxpq.quantize.stats import collect_stats, taken_branches
from onnxpq.validate import decode_nodes_left


def _model(nodes, inputs, outputs, inits, opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _constant(name, array) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], f"const_{name}", value=numpy_helper.from_array(array))


def if_model(rng) -> onnx.ModelProto:
    """Two weights named ``w`` (then-branch initializer, else-branch Constant node; sibling scopes may
    reuse a name, an inner scope may not reuse an outer one) and ``shared``, read by both branches."""
    shape = [1, 8, 6, 6]
    then = helper.make_graph(
        [helper.make_node("Conv", ["h", "w"], ["a"], "conv_t", pads=[1] * 4),
         helper.make_node("Conv", ["a", "shared"], ["yt"], "mix_t", pads=[1] * 4)],
        "then", [], [_vi("yt", shape)], [numpy_helper.from_array(rand(rng, 8, 8, 3, 3), "w")],
    )  # fmt: skip
    other = helper.make_graph(
        [_constant("w", rand(rng, 8, 8, 3, 3)),
         helper.make_node("Conv", ["h", "w"], ["b"], "conv_e", pads=[1] * 4),
         helper.make_node("Conv", ["b", "shared"], ["ye"], "mix_e", pads=[1] * 4)],
        "else", [], [_vi("ye", shape)],
    )  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["h"], "pre", pads=[1] * 4),
        helper.make_node("If", ["c"], ["y"], "branch", then_branch=then, else_branch=other),
    ]
    inits = [numpy_helper.from_array(rand(rng, 8, 8, 3, 3), n) for n in ("w0", "shared")]
    return _model(nodes, [_vi("x", shape), _vi("c", [], TensorProto.BOOL)], [_vi("y", shape)], inits)


def loop_model(rng) -> onnx.ModelProto:
    """A Loop whose body holds an If whose then-branch multiplies by a Constant weight (nested bodies)."""
    then = helper.make_graph(
        [_constant("wc", rand(rng, 16, 16) / 4), helper.make_node("MatMul", ["v", "wc"], ["tv"], "mm")],
        "then", [], [_vi("tv", [2, 16])],
    )  # fmt: skip
    other = helper.make_graph([helper.make_node("Identity", ["v"], ["ev"], "id")], "else", [], [_vi("ev", [2, 16])])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], "keep"),
         helper.make_node("If", ["cond_in"], ["v_out"], "inner", then_branch=then, else_branch=other)],
        "body",
        [_vi("i", [], TensorProto.INT64), _vi("cond_in", [], TensorProto.BOOL), _vi("v", [2, 16])],
        [_vi("cond_out", [], TensorProto.BOOL), _vi("v_out", [2, 16])],
    )  # fmt: skip
    loop = helper.make_node("Loop", ["n", "c", "x"], ["y"], "loop", body=body)
    inputs = [_vi("x", [2, 16]), _vi("n", [], TensorProto.INT64), _vi("c", [], TensorProto.BOOL)]
    return _model([loop], inputs, [_vi("y", [2, 16])], [])


def _compress(model, tmp_path, **config) -> tuple[onnx.ModelProto, dict]:
    onnx.save(model, tmp_path / "in.onnx")
    settings = {"min_elements": 1, "keep_first": False, "n_codewords": 16, **config}
    result = compress(tmp_path / "in.onnx", tmp_path / "out.onnx", CompressConfig(**settings), validation=NO_VALIDATION)
    return onnx.load(tmp_path / "out.onnx"), result.report


def _decode_nodes(compressed: onnx.ModelProto) -> list[str]:
    return [n.name for n in compressed.graph.node if "_pq_decode" in n.name]


def test_if_branch_weights_are_compressed_and_decode_exactly(tmp_path, rng):
    model = if_model(rng)
    compressed, report = _compress(model, tmp_path)
    compressed_layers = {r["nodes"][0] for r in report["layers"] if r["skip_reason"] is None}
    # Both branches, the name clash resolved, the Constant node, and the shared weight compressed once.
    assert compressed_layers >= {"pre", "branch/then_branch/conv_t", "branch/else_branch/conv_e"}
    assert len(report["layers"]) == 4
    assert report["subgraph_weights_left"] == 0
    onnx.checker.check_model(compressed, full_check=True)
    lifted = lift_subgraph_weights(model)
    for cond in (True, False):
        assert_equivalent(lifted, compressed, {"x": rand(rng, 1, 8, 6, 6), "c": np.array(cond)})
    assert decode_nodes_left(tmp_path / "out.onnx", _decode_nodes(compressed)) == []


def test_lifting_keeps_the_function_and_renames_only_clashing_names(rng):
    model = if_model(rng)
    lifted = lift_subgraph_weights(model)
    feeds = {"x": rand(rng, 1, 8, 6, 6), "c": np.array(False)}
    # Same values; only the kernel ORT picks for an outer-scope weight may round differently.
    expected, got = run(model, feeds)[0], run(lifted, feeds)[0]
    assert np.abs(expected - got).max() <= 1e-5 * np.abs(expected).max()
    names = {t.name for t in lifted.graph.initializer}
    assert names == {"w0", "shared", "branch/then_branch/w", "branch/else_branch/w"}
    onnx.checker.check_model(lifted, full_check=True)


def test_model_without_bodies_is_returned_as_is(rng):
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], [_vi("x", [2, 16])], [_vi("y", [2, 16])],
        [numpy_helper.from_array(rand(rng, 16, 16), "w")],
    )  # fmt: skip
    assert lift_subgraph_weights(model) is model


def test_body_weights_are_data_free_and_matched_by_exclude_patterns(rng):
    lifted = lift_subgraph_weights(if_model(rng))
    config = CompressConfig(min_elements=1, keep_first=False, nodes_to_exclude=("else_branch/conv_e$",))
    cands = {c.node_names[0]: c for c in find_candidates(lifted, config)}
    assert cands["branch/else_branch/conv_e"].skip_reason == "matched by --nodes-to-exclude"
    assert cands["branch/then_branch/conv_t"].compressed
    assert not data_aware(cands["branch/then_branch/conv_t"])
    assert data_aware(cands["pre"])


def test_nested_if_inside_loop(tmp_path, rng):
    model = loop_model(rng)
    assert "loop/body/inner/then_branch/mm" in [s.name for s in scoped_nodes(model.graph)]
    compressed, report = _compress(model, tmp_path, n_codewords=8)
    assert [r["nodes"][0] for r in report["layers"] if r["skip_reason"] is None] == ["loop/body/inner/then_branch/mm"]
    onnx.checker.check_model(compressed, full_check=True)
    feeds = {"x": rand(rng, 2, 16), "n": np.array(3, np.int64), "c": np.array(True)}
    assert_equivalent(lift_subgraph_weights(model), compressed, feeds)
    assert decode_nodes_left(tmp_path / "out.onnx", _decode_nodes(compressed)) == []


def rnn_model(rng, op: str, directions: int) -> onnx.ModelProto:
    """One LSTM/GRU over [T=3, B=2, 16] inputs with hidden size 8."""
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    inits = {
        "W": rand(rng, directions, gates * 8, 16) / 4,
        "R": rand(rng, directions, gates * 8, 8) / 4,
        "B": rand(rng, directions, 2 * gates * 8) / 4,
    }
    direction = "bidirectional" if directions == 2 else "forward"
    node = helper.make_node(op, ["x", "W", "R", "B"], ["y"], "rnn", hidden_size=8, direction=direction)
    return _model(
        [node], [_vi("x", [3, 2, 16])], [_vi("y", [3, directions, 2, 8])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )  # fmt: skip


@pytest.mark.parametrize(("op", "directions"), [("LSTM", 2), ("GRU", 1), ("RNN", 1)])
def test_rnn_weights_are_candidates_cut_along_inputs(op, directions, tmp_path, rng):
    model = rnn_model(rng, op, directions)
    cands = {c.name: c for c in find_candidates(model, CompressConfig(min_elements=1))}
    assert set(cands) == {"W", "R"}  # B is not a weight input
    for c in cands.values():
        assert c.kind == op and c.row_axes == 2 and c.subvector_dim == 4 and data_aware(c)
    compressed, _ = _compress(model, tmp_path)
    onnx.checker.check_model(compressed, full_check=True)
    ops = [n.op_type for n in compressed.graph.node]
    assert "Transpose" not in ops and ops.count("Reshape") == 2
    assert_equivalent(model, compressed, {"x": rand(rng, 3, 2, 16)})
    assert decode_nodes_left(tmp_path / "out.onnx", _decode_nodes(compressed)) == []


def test_scan_body_weight(tmp_path, rng):
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_t", "ws"], ["p"], "mm"),
         helper.make_node("Add", ["h_in", "p"], ["h_out"], "add"),
         helper.make_node("Identity", ["h_out"], ["y_t"], "out")],
        "body", [_vi("h_in", [16]), _vi("x_t", [16])], [_vi("h_out", [16]), _vi("y_t", [16])],
        [numpy_helper.from_array(rand(rng, 16, 16) / 4, "ws")],
    )  # fmt: skip
    scan = helper.make_node("Scan", ["h", "x"], ["h_last", "ys"], "scan", body=body, num_scan_inputs=1)
    model = _model([scan], [_vi("h", [16]), _vi("x", [5, 16])], [_vi("h_last", [16]), _vi("ys", [5, 16])], [])
    compressed, report = _compress(model, tmp_path, n_codewords=8)
    assert [r["nodes"][0] for r in report["layers"] if r["skip_reason"] is None] == ["scan/body/mm"]
    onnx.checker.check_model(compressed, full_check=True)
    assert_equivalent(lift_subgraph_weights(model), compressed, {"h": rand(rng, 16), "x": rand(rng, 5, 16)})
    assert decode_nodes_left(tmp_path / "out.onnx", _decode_nodes(compressed)) == []


@pytest.mark.parametrize(("op", "directions"), [("LSTM", 2), ("GRU", 1), ("RNN", 2)])
def test_rnn_statistics_are_the_inputs_and_hidden_states(op, directions, rng):
    """W's H is E[x xᵀ] over every (step, batch) input; R's is E[h hᵀ] over each direction's hidden states
    in Y [T, dirs, B, H]. Reading Y in another axis order mixes directions or steps and fails here."""
    model = rnn_model(rng, op, directions)
    cands = find_candidates(model, CompressConfig(min_elements=1))
    x = rand(rng, 3, 2, 16)
    stats = collect_stats(model, cands, Dataset({"x": x}, source="test", shared=frozenset({"x"})))
    y = run(model, {"x": x})[0].transpose(0, 2, 1, 3)  # [T, B, dirs, H]
    hidden = y.reshape(-1, directions, 8)
    inputs = x.reshape(-1, 16)
    np.testing.assert_allclose(stats["W"].hessian[0], inputs.T @ inputs / len(inputs), rtol=1e-5, atol=1e-6)
    for d in range(directions):
        h = hidden[:, d]
        np.testing.assert_allclose(stats["R"].hessian[d], h.T @ h / len(h), rtol=1e-5, atol=1e-6)
    assert stats["R"].hessian.shape == (directions, 8, 8) and stats["R"].rows == len(hidden)


def test_rnn_without_hidden_state_output_keeps_r_data_free(rng):
    """A node that outputs only its last state (Y unnamed) gives R no statistics: it is quantized data-free."""
    model = rnn_model(rng, "GRU", 1)
    node = model.graph.node[0]
    node.output[:] = ["", "h_last"]
    model.graph.output[0].CopyFrom(_vi("h_last", [1, 2, 8]))
    stats = collect_stats(model, find_candidates(model, CompressConfig(min_elements=1)),
                          Dataset({"x": rand(rng, 3, 2, 16)}, source="test", shared=frozenset({"x"})))  # fmt: skip
    assert set(stats) == {"W"}


@pytest.mark.parametrize("cond", [True, False])
def test_inlined_branch_computes_the_if_on_that_condition(cond, rng):
    """The graph statistics run on: the ``If`` replaced by the branch its condition takes, nothing redefined."""
    lifted = lift_subgraph_weights(if_model(rng))
    branch = "then_branch" if cond else "else_branch"
    inlined = inline_branches(lifted, {"branch": branch})
    assert "If" not in {n.op_type for n in inlined.graph.node}
    onnx.checker.check_model(inlined, full_check=True)
    feeds = {"x": rand(rng, 1, 8, 6, 6), "c": np.array(cond)}
    expected, got = run(lifted, feeds)[0], run(inlined, feeds)[0]
    assert np.abs(expected - got).max() <= 1e-5 * np.abs(expected).max()


def test_taken_branch_weights_get_statistics_and_the_other_stays_data_free(tmp_path, rng):
    """A scalar condition that is the same on every sample (Silero VAD's ``sr``) gives that branch's weights
    output-aware statistics; the untaken branch has no samples, is quantized data-free, and both still decode."""
    model = if_model(rng)
    onnx.save(model, tmp_path / "in.onnx")
    np.savez(tmp_path / "calib.npz", x=rand(rng, 16, 8, 6, 6), c=np.array(True))
    config = CompressConfig(min_elements=1, keep_first=False, n_codewords=16)
    result = compress(
        tmp_path / "in.onnx",
        tmp_path / "out.onnx",
        config,
        calibration=tmp_path / "calib.npz",
        validation=NO_VALIDATION,
    )
    report = result.report
    assert report["calibration"]["branches"] == {"branch": "then_branch"}
    forms = {r["nodes"][0]: r["statistics"] for r in report["layers"]}
    assert forms["pre"] == forms["branch/then_branch/conv_t"] == "full"
    assert forms["branch/else_branch/conv_e"] is None
    compressed = onnx.load(tmp_path / "out.onnx")
    onnx.checker.check_model(compressed, full_check=True)
    lifted = lift_subgraph_weights(model)
    for cond in (True, False):
        assert_equivalent(lifted, compressed, {"x": rand(rng, 1, 8, 6, 6), "c": np.array(cond)})


def test_a_condition_that_changes_between_samples_inlines_nothing(rng):
    lifted = lift_subgraph_weights(if_model(rng))
    data = Dataset({"x": rand(rng, 16, 8, 6, 6), "c": np.array([True] * 8 + [False] * 8)}, source="test")
    assert taken_branches(lifted, data) == {}
    assert taken_branches(lifted, data.head(8)) == {"branch": "then_branch"}


def test_fine_tuning_runs_on_the_taken_branch_and_keeps_both(tmp_path, rng):
    """The torch executor runs no If: the model is tuned with the taken branch inlined, and the tuned values
    land in the written model, which still holds both branches and runs either way."""
    pytest.importorskip("torch")
    from onnxpq.config import FinetuneConfig

    model = if_model(rng)
    then = next(a.g for a in model.graph.node[1].attribute if a.name == "then_branch")  # a bias inside the
    # branch: rank 1, so not lifted into the main graph, where the tuned values are written back
    then.node[0].input.append("bt")
    then.initializer.append(numpy_helper.from_array(rand(rng, 8), "bt"))
    onnx.save(model, tmp_path / "in.onnx")
    np.savez(tmp_path / "calib.npz", x=rand(rng, 24, 8, 6, 6), c=np.array(True))
    tune = FinetuneConfig(steps=4, eval_every=2, lr=1e-2, ema=0.0)
    config = CompressConfig(min_elements=1, keep_first=False, n_codewords=16, finetune=tune)
    calib = tmp_path / "calib.npz"
    result = compress(tmp_path / "in.onnx", tmp_path / "out.onnx", config, calibration=calib, validation=NO_VALIDATION)
    assert result.report["finetune"] is not None
    assert not [w for w in result.report["warnings"] if "fine-tuning skipped" in w]
    compressed = onnx.load(tmp_path / "out.onnx")
    assert [n.op_type for n in compressed.graph.node].count("If") == 1
    (branch,) = [n for n in compressed.graph.node if n.op_type == "If"]
    body = next(a.g for a in branch.attribute if a.name == "then_branch")
    kept = {t.name: t for t in body.initializer}["bt"]
    np.testing.assert_array_equal(numpy_helper.to_array(kept), numpy_helper.to_array(then.initializer[-1]))
    # Only what could be written back was tuned: the codebooks co-adapted with a bias that was then dropped.
    from onnxpq.finetune.training import trainable_constants

    assert result.report["finetune"]["trainable"]["tensors"] == len(trainable_constants(compressed))
    for cond in (True, False):
        (y,) = run(compressed, {"x": rand(rng, 1, 8, 6, 6), "c": np.array(cond)})
        assert np.isfinite(y).all()
