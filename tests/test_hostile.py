"""Hostile inputs, as release pipelines meet them: each ends in one clear error line or a correct model.

Error cases assert exit 2, one line naming the problem, no traceback and nothing
written. Accepted cases assert a model that onnx.checker and onnxruntime accept and
that computes what the original computes (up to quantization error), with the
warning a user needs when something was left alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import conv_model, make_model, run
from onnx import TensorProto, helper, numpy_helper

from onnxpq.cli import main

X = np.random.default_rng(7).standard_normal((1, 16, 12, 12)).astype(np.float32)


def cli(*args: str | Path) -> int:
    return main([str(a) for a in args])


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def _matmul(rows: int = 256, cols: int = 64, dtype=np.float32, elem=TensorProto.FLOAT) -> onnx.ModelProto:
    w = np.random.default_rng(3).standard_normal((rows, cols)).astype(dtype)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], "mm")
    return make_model([node], [("x", [2, rows])], ["y"], {"w": w}, elem_type=elem)


def _two_convs() -> onnx.ModelProto:
    """Two convs; w1 reads 16 channels, so only ``--keep-first`` keeps it in float."""
    rng = np.random.default_rng(0)
    weights = {"w1": rng.standard_normal((32, 16, 3, 3)), "w2": rng.standard_normal((32, 32, 3, 3))}
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], "conv1", pads=[1] * 4),
        helper.make_node("Relu", ["h"], ["r"], "relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], "conv2", pads=[1] * 4),
    ]
    return make_model(nodes, [("x", [1, 16, 12, 12])], ["y"], {k: v.astype(np.float32) for k, v in weights.items()})


# --- cases that must fail with one clear line -------------------------------------------------------------


def _truncated_external(tmp: Path) -> tuple[Path, str]:
    onnx.save(conv_model(), tmp / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    data = (tmp / "m.data").read_bytes()
    (tmp / "m.data").write_bytes(data[: len(data) // 2])
    return tmp / "m.onnx", "external data file 'm.data' is truncated"


def _external_size_mismatch(tmp: Path) -> tuple[Path, str]:
    """float64 bytes behind a float32 tensor: a broken exporter, caught at load, not as a reshape error."""
    model = _two_convs()
    onnx.save(model, tmp / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    stored = onnx.load(tmp / "m.onnx", load_external_data=False)
    for entry in stored.graph.initializer[0].external_data:
        if entry.key == "length":
            entry.value = str(int(entry.value) * 2)
    (tmp / "m.data").write_bytes((tmp / "m.data").read_bytes() * 2)
    onnx.save(stored, tmp / "m.onnx")
    return tmp / "m.onnx", "external data of tensor 'w1' is"


def _new_opset(tmp: Path) -> tuple[Path, str]:
    model = conv_model()
    model.opset_import[0].version = 99
    return _save(model, tmp / "m.onnx"), "opset 99 is newer"


def _already_compressed(tmp: Path) -> tuple[Path, str]:
    src = _save(_two_convs(), tmp / "m.onnx")
    assert cli("compress", src, tmp / "pq.onnx", "--no-validate") == 0
    return tmp / "pq.onnx", "already compressed by onnxpq"


def _no_graph(tmp: Path) -> tuple[Path, str]:
    model = helper.make_model(helper.make_graph([], "empty", [], []))
    return _save(model, tmp / "m.onnx"), "holds no graph"


def _text_file(tmp: Path) -> tuple[Path, str]:
    (tmp / "m.onnx").write_text("ir_version: 8\nthis is not a model\n")
    return tmp / "m.onnx", "not a valid ONNX model"


FAILING: dict[str, Callable[[Path], tuple[Path, str]]] = {
    "truncated_external_data": _truncated_external,
    "external_size_mismatch": _external_size_mismatch,
    "opset_too_new": _new_opset,
    "already_compressed": _already_compressed,
    "no_graph": _no_graph,
    "text_file": _text_file,
}


@pytest.mark.parametrize("case", sorted(FAILING))
def test_bad_model_is_refused_in_one_line(case, tmp_path, capsys):
    source, message = FAILING[case](tmp_path)
    capsys.readouterr()
    out = tmp_path / "out.onnx"
    assert cli("compress", source, out) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize(
    ("make_out", "message"),
    [
        (lambda tmp: tmp / "file.txt" / "out.onnx", "does not exist"),
        (lambda tmp: tmp, "is a directory"),
        (lambda tmp: tmp / "." / "m.onnx", "output is the input"),
    ],
    ids=["parent_is_a_file", "output_is_a_directory", "input_under_another_spelling"],
)
def test_bad_output_paths_are_refused(make_out, message, tmp_path, capsys):
    source = _save(_two_convs(), tmp_path / "m.onnx")
    (tmp_path / "file.txt").write_text("x")
    before = source.read_bytes()
    assert cli("compress", source, make_out(tmp_path), "--force") == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert source.read_bytes() == before


def test_unwritable_output_directory_is_refused(tmp_path, monkeypatch, capsys):
    """Simulated: this suite may run as root, which writes anywhere."""
    from onnxpq.model import files

    source = _save(_two_convs(), tmp_path / "m.onnx")
    monkeypatch.setattr(files.os, "access", lambda path, mode: False)
    assert cli("compress", source, tmp_path / "out.onnx") == 2
    assert "is not writable" in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()


def test_unknown_include_pattern_lists_close_names(tmp_path, capsys):
    source = _save(_two_convs(), tmp_path / "m.onnx")
    assert cli("compress", source, tmp_path / "o.onnx", "--nodes-to-include", "conv3") == 2
    err = capsys.readouterr().err
    assert "--nodes-to-include pattern 'conv3' matches no node; close names: conv" in err


def test_invalid_regex_is_named(tmp_path, capsys):
    source = _save(_two_convs(), tmp_path / "m.onnx")
    assert cli("compress", source, tmp_path / "o.onnx", "--nodes-to-exclude", "conv[") == 2
    err = capsys.readouterr().err
    assert "conv[" in err and "Traceback" not in err


# --- cases that must give a correct model --------------------------------------------------------------------


def _compress_ok(source: Path, tmp: Path, *extra: str) -> tuple[onnx.ModelProto, dict]:
    out = tmp / "out.onnx"
    # Load time, memory and latency are not what these cases test: measuring them spawns processes.
    assert cli("compress", source, out, "--force", "--no-measure", *extra) == 0
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    return model, json.loads((tmp / "out.onnx.report.json").read_text())


def _compressed_names(report: dict) -> set[str]:
    return {r["weight"] for r in report["layers"] if r["skip_reason"] is None}


def _decoded_dtype(model: onnx.ModelProto) -> int:
    """Element type of the table the decode Gather reads: an fp16 codebook, or the Cast of it."""
    gather = next(n for n in model.graph.node if n.op_type == "Gather")
    codebook = next((t for t in model.graph.initializer if t.name == gather.input[0]), None)
    if codebook is not None:
        return codebook.data_type
    cast = next(n for n in model.graph.node if gather.input[0] in n.output)
    return next(a.i for a in cast.attribute if a.name == "to")


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize(
    ("dtype", "elem"), [(np.float16, TensorProto.FLOAT16), (np.float64, TensorProto.DOUBLE)], ids=["fp16", "fp64"]
)
def test_half_and_double_weights_decode_to_their_own_dtype(dtype, elem, tmp_path):
    source = _save(_matmul(dtype=dtype, elem=elem), tmp_path / "m.onnx")
    model, report = _compress_ok(source, tmp_path, "--min-elements", "1")
    assert _compressed_names(report) == {"w"}
    assert _decoded_dtype(model) == elem
    x = np.random.default_rng(0).standard_normal((2, 256)).astype(dtype)
    assert _cosine(run(source, {"x": x})[0], run(model, {"x": x})[0]) > 0.8


def test_bf16_weights_decode_to_bf16(tmp_path):
    """A bf16 weight read through a Cast (how bf16 checkpoints export): compressed with --op-types all."""
    w = np.random.default_rng(3).standard_normal((256, 64)).astype(np.float32)
    bf16 = helper.make_tensor("w", TensorProto.BFLOAT16, w.shape, vals=w.ravel().tolist())
    nodes = [
        helper.make_node("Cast", ["w"], ["wf"], "cast", to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["x", "wf"], ["y"], "mm"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
        [bf16],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    source = _save(model, tmp_path / "m.onnx")
    model, report = _compress_ok(source, tmp_path, "--op-types", "all", "--min-elements", "1")
    assert _compressed_names(report) == {"w"}
    assert _decoded_dtype(model) == TensorProto.BFLOAT16
    x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    assert _cosine(run(source, {"x": x})[0], run(model, {"x": x})[0]) > 0.8


def test_integer_model_is_left_alone_and_said_so(tmp_path, capsys):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = _save(_two_convs(), tmp_path / "fp32.onnx")
    quantize_dynamic(str(fp32), str(tmp_path / "int8.onnx"), weight_type=QuantType.QInt8)
    model, report = _compress_ok(tmp_path / "int8.onnx", tmp_path)
    assert not _compressed_names(report)
    assert any("already quantized" in w and "ConvInteger" in w for w in report["warnings"])
    assert any("no weight was compressed" in w for w in report["warnings"])
    assert np.array_equal(run(tmp_path / "int8.onnx", {"x": X})[0], run(model, {"x": X})[0])


def test_qdq_model_keeps_its_integer_weights_and_says_so(tmp_path):
    rng = np.random.default_rng(0)
    weights = {
        "wq": rng.integers(-127, 128, (32, 16, 3, 3)).astype(np.int8),
        "scale": np.float32(0.02),
        "w2": rng.standard_normal((32, 32, 3, 3)).astype(np.float32),
    }
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "scale"], ["w1"], "dq"),
        helper.make_node("Conv", ["x", "w1"], ["h"], "conv1", pads=[1] * 4),
        helper.make_node("Conv", ["h", "w2"], ["y"], "conv2", pads=[1] * 4),
    ]
    source = _save(make_model(nodes, [("x", [1, 16, 12, 12])], ["y"], weights), tmp_path / "m.onnx")
    model, report = _compress_ok(source, tmp_path)
    assert _compressed_names(report) == {"w2"}
    assert any("already quantized" in w and "DequantizeLinear" in w for w in report["warnings"])
    kept = next(t for t in model.graph.initializer if t.name == "wq")
    assert np.array_equal(numpy_helper.to_array(kept), weights["wq"])


def test_weight_listed_as_graph_input_is_compressed_and_removed_from_inputs(tmp_path):
    model = _two_convs()
    model.graph.input.append(helper.make_tensor_value_info("w2", TensorProto.FLOAT, [32, 32, 3, 3]))
    source = _save(model, tmp_path / "m.onnx")
    out, report = _compress_ok(source, tmp_path, "--keep-first")
    assert "w2" in _compressed_names(report)
    assert [i.name for i in out.graph.input] == ["x"]
    assert _cosine(run(source, {"x": X})[0], run(out, {"x": X})[0]) > 0.8


def test_weight_shared_by_two_op_types_decodes_once_for_both(tmp_path):
    w = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], "mm"),
        helper.make_node("Gemm", ["h", "w"], ["y"], "gemm", transB=1),
    ]
    source = _save(make_model(nodes, [("x", [2, 64])], ["y"], {"w": w}), tmp_path / "m.onnx")
    out, report = _compress_ok(source, tmp_path, "--min-elements", "1")
    assert _compressed_names(report) == {"w"}
    decoded = [n for n in out.graph.node if n.op_type == "Gather"]
    assert len(decoded) == 1
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    assert _cosine(run(source, {"x": x})[0], run(out, {"x": x})[0]) > 0.8


def test_weights_inside_subgraphs_are_lifted_and_compressed(tmp_path):
    rng = np.random.default_rng(2)
    branch_w = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "bw")

    def branch(name: str, op: str) -> onnx.GraphProto:
        node = helper.make_node(op, ["h", "bw"], [f"{name}_out"], f"{name}_node")
        return helper.make_graph(
            [node], name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [2, 64])], [branch_w]
        )

    w = rng.standard_normal((64, 64)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], "mm"),
        helper.make_node(
            "If", ["cond"], ["y"], "if", then_branch=branch("then", "MatMul"), else_branch=branch("else", "MatMul")
        ),
    ]
    model = make_model(nodes, [("x", [2, 64])], ["y"], {"w": w})
    model.graph.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    source = _save(model, tmp_path / "m.onnx")
    out, report = _compress_ok(source, tmp_path, "--min-elements", "1", "--no-validate")
    # Both branches name their weight "bw": each is lifted under its body path.
    assert _compressed_names(report) == {"w", "if/then_branch/bw", "if/else_branch/bw"}
    assert report["subgraph_weights_left"] == 0
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        assert _cosine(run(source, feeds)[0], run(out, feeds)[0]) > 0.8


def test_symbolic_batch_and_spatial_dims(tmp_path):
    model = _two_convs()
    for dim, value in zip(model.graph.input[0].type.tensor_type.shape.dim, ["N", 16, "H", "W"], strict=True):
        dim.Clear()
        if isinstance(value, str):
            dim.dim_param = value
        else:
            dim.dim_value = value
    source = _save(model, tmp_path / "m.onnx")
    out, report = _compress_ok(source, tmp_path, "--calibration-data", "random", "--calibration-shapes", "x:2x16x10x14")
    assert "w2" in _compressed_names(report)
    x = np.random.default_rng(0).standard_normal((3, 16, 7, 9)).astype(np.float32)
    assert run(out, {"x": x})[0].shape == (3, 32, 7, 9)


def test_zero_size_and_one_element_weights_are_left_alone(tmp_path):
    rng = np.random.default_rng(4)
    weights = {
        "w": rng.standard_normal((64, 64)).astype(np.float32),
        "one": np.array([1.5], dtype=np.float32),
        "empty": np.zeros((0, 64), dtype=np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], "mm"),
        helper.make_node("Mul", ["h", "one"], ["m"], "scale"),
        helper.make_node("Concat", ["m", "empty"], ["y"], "cat", axis=0),
    ]
    source = _save(make_model(nodes, [("x", [2, 64])], ["y"], weights), tmp_path / "m.onnx")
    out, report = _compress_ok(source, tmp_path, "--op-types", "all", "--min-elements", "1")
    assert _compressed_names(report) == {"w"}
    names = {t.name for t in out.graph.initializer}
    assert {"one", "empty"} <= names
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    assert _cosine(run(source, {"x": x})[0], run(out, {"x": x})[0]) > 0.8


def test_nan_and_inf_weights_are_left_in_float_and_named(tmp_path):
    model = _two_convs()
    w2 = next(t for t in model.graph.initializer if t.name == "w2")
    values = numpy_helper.to_array(w2).copy()
    values[0, 0, 0, 0], values[0, 1, 0, 0] = np.nan, np.inf  # one output channel: NaN in both models
    w2.CopyFrom(numpy_helper.from_array(values, "w2"))
    source = _save(model, tmp_path / "m.onnx")
    _, report = _compress_ok(source, tmp_path, "--no-keep-first")
    row = next(r for r in report["layers"] if r["weight"] == "w2")
    assert row["skip_reason"] == "contains NaN or Inf"
    assert _compressed_names(report) == {"w1"}
    # The original outputs NaN: validation compares the finite values and says so, instead of reporting garbage.
    output = report["validation"]["outputs"][0]
    assert output["nonfinite_original"] > 0 and output["nonfinite_mismatch"] == 0
    assert np.isfinite(output["rel_l2"]) and output["cosine"] > 0.8
    assert any("NaN or Inf" in w for w in report["warnings"])


def test_model_with_nothing_to_compress_is_copied_and_said_so(tmp_path):
    source = _save(conv_model(8, 4), tmp_path / "m.onnx")
    out, report = _compress_ok(source, tmp_path)
    assert not _compressed_names(report)
    assert any("no weight was compressed" in w for w in report["warnings"])
    x = np.random.default_rng(0).standard_normal((1, 4, 12, 12)).astype(np.float32)
    assert np.array_equal(run(source, {"x": x})[0], run(out, {"x": x})[0])


def test_unused_initializer_and_unnamed_nodes(tmp_path):
    model = _two_convs()
    for node in model.graph.node:
        node.name = ""
    model.graph.initializer.append(numpy_helper.from_array(np.ones((128, 128), np.float32), "unused"))
    source = _save(model, tmp_path / "m.onnx")
    out, report = _compress_ok(source, tmp_path, "--keep-first")
    assert "w2" in _compressed_names(report)
    assert _cosine(run(source, {"x": X})[0], run(out, {"x": X})[0]) > 0.8


def test_same_seed_gives_byte_identical_output_through_the_cli(tmp_path):
    source = _save(_two_convs(), tmp_path / "m.onnx")
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"

    def args(seed: int) -> list[str]:
        return ["--calibration-data", "random", "--seed", str(seed), "--no-validate", "--anneal"]

    assert cli("compress", source, first, *args(3)) == 0
    assert cli("compress", source, second, *args(3)) == 0
    assert first.read_bytes() == second.read_bytes()
    assert cli("compress", source, tmp_path / "c.onnx", *args(4)) == 0
    assert (tmp_path / "c.onnx").read_bytes() != first.read_bytes()


# --- external data: read lazily, streamed to the output ----------------------------------------------------


def _external_model(tmp: Path) -> Path:
    source = tmp / "src" / "m.onnx"
    source.parent.mkdir()
    onnx.save(_two_convs(), source, save_as_external_data=True, location="m.data", size_threshold=0)
    return source


def test_external_data_is_not_loaded_with_the_graph(tmp_path):
    from onnxpq.model.files import load_model, materialized
    from onnxpq.model.graph import constant_tensors

    source = _external_model(tmp_path)
    model = load_model(source)
    w2 = constant_tensors(model.graph)["w2"]
    assert w2.tensor.data_location == TensorProto.EXTERNAL and not w2.tensor.raw_data
    expected = numpy_helper.to_array(next(t for t in _two_convs().graph.initializer if t.name == "w2"))
    assert np.array_equal(w2.to_array(), expected)
    inline = materialized(model)
    assert all(t.data_location == TensorProto.DEFAULT for t in inline.graph.initializer)
    assert model.graph.initializer[0].data_location == TensorProto.EXTERNAL  # the input proto is untouched


def test_bf16_external_tensor_reads_back(tmp_path):
    """bf16 has no plain numpy storage: it takes the byte path of ``tensor_array``."""
    import ml_dtypes

    from onnxpq.model.tensors import tensor_array

    values = np.random.default_rng(0).standard_normal((8, 8)).astype(ml_dtypes.bfloat16)
    tensor = numpy_helper.from_array(values, "w")
    (tmp_path / "w.bin").write_bytes(b"pad!" + tensor.raw_data)
    onnx.external_data_helper.set_external_data(tensor, str(tmp_path / "w.bin"), offset=4, length=values.nbytes)
    tensor.ClearField("raw_data")
    assert tensor.data_type == TensorProto.BFLOAT16
    assert np.array_equal(tensor_array(tensor).astype(np.float32), values.astype(np.float32))


def test_large_output_streams_untouched_tensors_to_its_data_file(tmp_path, monkeypatch):
    """With the limit lowered, the output takes the >2 GB path: external data, aligned, checked, runnable."""
    from onnxpq.model import files

    monkeypatch.setattr(files, "PROTOBUF_LIMIT", 10_000)
    source = _external_model(tmp_path)
    out = tmp_path / "out.onnx"
    assert cli("compress", source, out, "--no-validate", "--keep-first") == 0
    model = onnx.load(out, load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert "w1" in {t.name for t in external}
    for tensor in external:
        info = onnx.external_data_helper.ExternalDataInfo(tensor)
        assert info.location == "out.onnx.data" and info.offset % files.EXTERNAL_ALIGN == 0
    onnx.checker.check_model(str(out), full_check=True)
    assert _cosine(run(source, {"x": X})[0], run(out, {"x": X})[0]) > 0.8
    w1 = numpy_helper.to_array(next(t for t in onnx.load(out).graph.initializer if t.name == "w1"))
    assert np.array_equal(w1, numpy_helper.to_array(next(t for t in _two_convs().graph.initializer if t.name == "w1")))


def test_external_location_outside_the_model_folder_is_refused(tmp_path, capsys):
    source = _external_model(tmp_path)
    model = onnx.load(source, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../m.data"
    (tmp_path / "m.data").write_bytes((tmp_path / "src" / "m.data").read_bytes())
    onnx.save(model, source)
    assert cli("compress", source, tmp_path / "out.onnx") == 2
    assert "outside the model's folder" in capsys.readouterr().err


def test_external_data_model_goes_through_every_pass(tmp_path):
    """Statistics, permutation, fine-tuning and validation all read the lazily loaded weights."""
    pytest.importorskip("torch")
    source = _external_model(tmp_path)
    model, report = _compress_ok(
        source, tmp_path, "--calibration-data", "random", "--permute", "--finetune-steps", "2", "--no-keep-first"
    )
    assert _compressed_names(report) == {"w1", "w2"}
    assert report["permutation"]["free"] >= 1 and report["finetune"]["steps"] == 2
    assert report["validation"]["outputs"][0]["cosine"] > 0.8
    assert all(t.data_location == TensorProto.DEFAULT for t in model.graph.initializer)
