"""Hostile data and odd inputs (issue 20, second half): bounded reads, tensor metadata, odd-rank models.

Each CLI case asserts the exit code (2, or 0 where the model is valid and now
accepted), one line without a traceback on error, the input files' bytes
unchanged, and nothing new beside them when the run fails.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import conv_model, make_model
from onnx import TensorProto, helper

from onnxpq import ConfigError, calibration, validate
from onnxpq.calibration import Dataset, batches, load_dataset, random_dataset
from onnxpq.cli import main

#: The quantizer's refinements are not what these cases test; without them a tiny run takes a fraction of a second.
FAST = ("--no-measure", "--min-elements", "1024", "--kmeans-iters", "2", "-k", "16", "--no-output-aware")
FAST += ("--no-refit", "--no-error-feedback")


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def _cli(tmp: Path, capsys, model: Path, *args: str | Path, code: int) -> str:
    """Run ``compress``; check the exit code, one line on error, inputs untouched, nothing left on failure."""
    before = _snapshot(tmp)
    capsys.readouterr()
    out = tmp / "out.onnx"
    rc = main(["compress", str(model), str(out), *map(str, args)])
    err = capsys.readouterr().err
    assert rc == code, err
    after = _snapshot(tmp)
    assert {k: after[k] for k in before} == before, "an input file changed"
    if code == 2:
        assert "Traceback" not in err and err.count("\n") == 1, err
        assert set(after) == set(before), f"left behind: {set(after) - set(before)}"
    else:
        assert out.exists()
    return err


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def _matmul(inputs=(("x", ["N", 128]),), elem=TensorProto.FLOAT) -> onnx.ModelProto:
    """x -> MatMul(W[128, 64]); extra inputs are added to the graph by the cases."""
    w = np.random.default_rng(3).standard_normal((128, 64)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], "mm")]
    return make_model(nodes, list(inputs), ["y"], {"w": w}, elem_type=elem)


def _two_inputs() -> onnx.ModelProto:
    """x[1,128] @ W and a second input s[64] with a fixed, different leading dim (finding 7)."""
    model = _matmul((("x", [1, 128]),))
    model.graph.input.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, [64]))
    model.graph.node.append(helper.make_node("Add", ["y", "s"], ["z"], "add"))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 64]))
    return model


def _scalar_sr(shape: list | None = ()) -> onnx.ModelProto:
    """Silero-like: a scalar int64 ``sr`` (or one of unknown rank) scales the features (finding 8)."""
    model = _matmul()
    sr = helper.make_tensor_value_info("sr", TensorProto.INT64, None)
    if shape is not None:
        sr.type.tensor_type.shape.SetInParent()
    model.graph.input.append(sr)
    model.graph.node.extend(
        [
            helper.make_node("Cast", ["sr"], ["srf"], "cast", to=TensorProto.FLOAT),
            helper.make_node("Mul", ["y", "srf"], ["z"], "mul"),
        ]
    )
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    return model


def _x(n: int = 8, width: int = 128) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, width)).astype(np.float32)


# --- valid models that now run (exit 0) -------------------------------------------------------------------


def _different_leading_dims(tmp: Path) -> list:
    np.savez(tmp / "d.npz", x=_x(), s=np.ones(64, np.float32))
    return [_save(_two_inputs(), tmp / "m.onnx"), "--calibration-data", tmp / "d.npz"]


def _different_leading_dims_random(tmp: Path) -> list:
    return [_save(_two_inputs(), tmp / "m.onnx")]


def _scalar_shared(tmp: Path) -> list:
    np.savez(tmp / "d.npz", x=_x(), sr=np.int64(16000))
    return [_save(_scalar_sr(), tmp / "m.onnx"), "--calibration-data", tmp / "d.npz"]


def _scalar_per_sample(tmp: Path) -> list:
    np.savez(tmp / "d.npz", x=_x(), sr=np.full(8, 8000, np.int64))
    return [_save(_scalar_sr(), tmp / "m.onnx"), "--calibration-data", tmp / "d.npz"]


def _scalar_random(tmp: Path) -> list:
    return [_save(_scalar_sr(), tmp / "m.onnx"), "--calibration-data", "random"]


def _unknown_rank_with_data(tmp: Path) -> list:
    np.savez(tmp / "d.npz", x=_x(), sr=np.int64(16000))
    return [_save(_scalar_sr(None), tmp / "m.onnx"), "--calibration-data", tmp / "d.npz"]


def _silero_state(tmp: Path) -> list:
    """A recurrent state [2, batch, 64] given once as (2, 1, 64), beside 8 samples of x and a scalar sr:
    the state is shared and each run holds one sample, the size its batch dim was given."""
    model = _scalar_sr()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    model.graph.input.append(helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 64]))
    model.graph.node.append(helper.make_node("Add", ["z", "state"], ["next"], "add"))
    model.graph.output.append(helper.make_tensor_value_info("next", TensorProto.FLOAT, None))
    np.savez(tmp / "d.npz", x=_x(), sr=np.int64(16000), state=np.zeros((2, 1, 64), np.float32))
    return [_save(model, tmp / "m.onnx"), "--calibration-data", tmp / "d.npz"]


def _symbolic_channel_with_shapes(tmp: Path) -> list:
    model = conv_model(32, 16)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "C"
    source = _save(model, tmp / "m.onnx")
    return [source, "--calibration-data", "random", "--calibration-shapes", "x:1x16x12x12"]


def _typed_input(elem: int) -> Callable[[Path], list]:
    """fp16 / bf16 / int8 / bool inputs, cast to float in the graph, fed synthetic data."""

    def build(tmp: Path) -> list:
        model = _matmul()
        model.graph.input[0].name = "raw"
        model.graph.input[0].type.tensor_type.elem_type = elem
        model.graph.node.insert(0, helper.make_node("Cast", ["raw"], ["x"], "cast", to=TensorProto.FLOAT))
        return [_save(model, tmp / "m.onnx"), "--calibration-data", "random"]

    return build


def _unicode_member(tmp: Path) -> list:
    model = _matmul()
    model.graph.input[0].name = "入力"
    model.graph.node[0].input[0] = "入力"
    np.savez(tmp / "d.npz", **{"入力": _x()})
    return [_save(model, tmp / "m.onnx"), "--calibration-data", tmp / "d.npz"]


def _fortran_npy(tmp: Path) -> list:
    np.save(tmp / "d.npy", np.asfortranarray(_x(16)))
    return [_save(_matmul(), tmp / "m.onnx"), "--calibration-data", tmp / "d.npy", "--calibration-samples", "4"]


ACCEPTED: dict[str, Callable[[Path], list]] = {
    "different_fixed_leading_dims": _different_leading_dims,
    "different_fixed_leading_dims_random": _different_leading_dims_random,
    "scalar_input_shared": _scalar_shared,
    "scalar_input_per_sample": _scalar_per_sample,
    "scalar_input_random": _scalar_random,
    "unknown_rank_input_with_data": _unknown_rank_with_data,
    "silero_like_state_given_once": _silero_state,
    "symbolic_channel_with_calibration_shapes": _symbolic_channel_with_shapes,
    "float16_input": _typed_input(TensorProto.FLOAT16),
    "int8_input": _typed_input(TensorProto.INT8),
    "bool_input": _typed_input(TensorProto.BOOL),
    "unicode_input_and_member_name": _unicode_member,
    "fortran_order_npy_head": _fortran_npy,
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_valid_model_and_data_are_accepted(case, tmp_path, capsys):
    args = ACCEPTED[case](tmp_path)
    _cli(tmp_path, capsys, *args, *FAST, code=0)


# --- bad tensor metadata (finding 11) ---------------------------------------------------------------------


def _tensor(name: str, dims: list[int], raw: bytes = b"") -> onnx.TensorProto:
    """A float tensor with any dims and bytes (``helper.make_tensor`` refuses the inconsistent ones)."""
    tensor = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, raw_data=raw)
    tensor.dims.extend(dims)
    return tensor


def _with_initializer(tmp: Path, edit: Callable[[onnx.TensorProto], None]) -> Path:
    model = _matmul()
    edit(model.graph.initializer[0])
    return _save(model, tmp / "m.onnx")


def _raw(dims: list[int], nbytes: int = 4) -> Callable[[onnx.TensorProto], None]:
    def edit(t: onnx.TensorProto) -> None:
        del t.dims[:]
        t.dims.extend(dims)
        t.raw_data = b"\0" * nbytes

    return edit


def _float_data(t: onnx.TensorProto) -> None:
    t.ClearField("raw_data")
    t.float_data.extend([1.0] * 10)


def _external(tmp: Path, **entries: str) -> Path:
    model = _matmul()
    onnx.save(model, tmp / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    stored = onnx.load(tmp / "m.onnx", load_external_data=False)
    for entry in stored.graph.initializer[0].external_data:
        if entry.key in entries:
            entry.value = entries.pop(entry.key)
    for key, value in entries.items():
        stored.graph.initializer[0].external_data.add(key=key, value=value)
    return _save(stored, tmp / "m.onnx")


def _duplicate_initializer(tmp: Path) -> Path:
    model = _matmul()
    model.graph.initializer.append(model.graph.initializer[0])
    return _save(model, tmp / "m.onnx")


def _bad_constant_node(tmp: Path) -> Path:
    model = _matmul()
    value = _tensor("c", [1 << 20, 1 << 20], b"\0" * 4)
    model.graph.node.insert(0, helper.make_node("Constant", [], ["c"], "const", value=value))
    return _save(model, tmp / "m.onnx")


def _bad_subgraph_tensor(tmp: Path) -> Path:
    model = _matmul()
    bad = _tensor("b", [-3, 4])
    branch = helper.make_graph(
        [helper.make_node("Identity", ["b"], ["o"])], "br", [], [helper.make_tensor_value_info("o", 1, None)], [bad]
    )
    model.graph.input.append(helper.make_tensor_value_info("c", TensorProto.BOOL, []))
    model.graph.node.append(helper.make_node("If", ["c"], ["z"], "if", then_branch=branch, else_branch=branch))
    return _save(model, tmp / "m.onnx")


def _nested_subgraphs(tmp: Path) -> Path:
    """60 nested If bodies, built in place (copying them would hit the limit already): past protobuf's
    recursion limit of 100 messages, refused as unreadable."""
    model = _matmul()
    model.graph.input.append(helper.make_tensor_value_info("c", TensorProto.BOOL, []))
    out = helper.make_tensor_value_info("o", TensorProto.FLOAT, None)
    leaf = helper.make_graph([helper.make_node("Identity", ["x"], ["o"])], "leaf", [], [out])
    node = model.graph.node.add(op_type="If", input=["c"], output=["z"], name="if")
    for _ in range(60):
        node.attribute.add(name="else_branch", type=onnx.AttributeProto.GRAPH).g.CopyFrom(leaf)
        body = node.attribute.add(name="then_branch", type=onnx.AttributeProto.GRAPH).g
        body.name = "b"
        body.output.add().CopyFrom(out)
        node = body.node.add(op_type="If", input=["c"], output=["o"])
    node.op_type, node.input[:] = "Identity", ["x"]
    return _save(model, tmp / "m.onnx")


def _value_info(dims: list) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        model = _matmul()
        model.graph.input.append(helper.make_tensor_value_info("big", TensorProto.FLOAT, dims))
        model.graph.node.append(helper.make_node("ReduceSum", ["big"], ["z"], "sum"))
        model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
        return _save(model, tmp / "m.onnx")

    return build


BAD_MODELS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "dims_product_huge": (lambda t: _with_initializer(t, _raw([1 << 20, 1 << 20])), "holds 4 bytes of raw_data"),
    "dims_product_overflows_int64": (
        lambda t: _with_initializer(t, _raw([1 << 40, 1 << 40])),
        "1208925819614629174706176",
    ),
    "negative_dims": (lambda t: _with_initializer(t, _raw([-1, 64])), "negative dims"),
    "float_data_count": (lambda t: _with_initializer(t, _float_data), "holds 10 values, not 8192"),
    "bad_data_type": (lambda t: _with_initializer(t, lambda x: setattr(x, "data_type", 999)), "no valid data type"),
    "external_offset_negative": (lambda t: _external(t, offset="-64"), "offset must be non-negative"),
    "external_offset_text": (lambda t: _external(t, offset="abc"), "bad external data entry"),
    "external_location_nul": (lambda t: _external(t, location="m.data\0x"), "NUL byte"),
    "external_length_huge": (lambda t: _external(t, length=str(1 << 62)), "truncated"),
    "duplicate_initializer": (_duplicate_initializer, "initializer 'w' is defined more than once"),
    "constant_node_bomb": (_bad_constant_node, "tensor 'c' has dims [1048576, 1048576]"),
    "subgraph_tensor_negative_dims": (_bad_subgraph_tensor, "tensor 'b' has negative dims"),
    "nested_subgraphs": (_nested_subgraphs, "not a valid ONNX model"),
    "value_info_huge_dims": (_value_info([10**9, 10**9]), "data memory budget"),
    "value_info_negative_dim": (_value_info([4, -3]), "declares size -3 at axis 1"),
    "value_info_rank_100": (_value_info([1] * 100), "rank 100"),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_bad_tensor_metadata_is_one_line(case, tmp_path, capsys):
    build, message = BAD_MODELS[case]
    source = build(tmp_path)
    err = _cli(tmp_path, capsys, source, "--no-measure", code=2)
    assert message in err, err


# --- bad data files, options and values (findings 9, 12, 14, 15) ------------------------------------------


def _npz_member(tmp: Path, name: str, payload: bytes) -> Path:
    with zipfile.ZipFile(tmp / "d.npz", "w") as archive:
        archive.writestr(name, payload)
    return tmp / "d.npz"


def _forged_header(shape: tuple[int, ...], data: bytes = b"\0" * 16) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + data


def _pb_folder(tmp: Path, files: dict[str, bytes]) -> Path:
    folder = tmp / "data" / "test_data_set_0"
    folder.mkdir(parents=True)
    for name, payload in files.items():
        (folder / name).write_bytes(payload)
    return tmp / "data"


def _data_case(write: Callable[[Path], Path | str], *extra: str, model=_matmul) -> Callable[[Path], list]:
    def build(tmp: Path) -> list:
        source = _save(model(), tmp / "m.onnx")
        return [source, "--calibration-data", write(tmp), *extra]

    return build


def _savez(**arrays) -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        np.savez(tmp / "d.npz", **arrays)
        return tmp / "d.npz"

    return write


def _with_value(value: float, index: int = 3, dtype=np.float32) -> Callable[[Path], Path]:
    x = _x().astype(dtype)
    x[index, 5] = value
    return _savez(x=x)


def _symbolic_channel(tmp: Path) -> list:
    model = conv_model(32, 16)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "C"
    return [_save(model, tmp / "m.onnx"), "--calibration-data", "random"]


def _ten_thousand_members(tmp: Path) -> Path:
    with zipfile.ZipFile(tmp / "d.npz", "w") as archive:
        for i in range(10_000):
            archive.writestr(f"m{i}.npy", b"")
    return tmp / "d.npz"


def _fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / "d.npy")
    return tmp / "d.npy"


def _not_a_zip(tmp: Path) -> Path:
    (tmp / "d.npz").write_bytes(b"garbage" * 10)
    return tmp / "d.npz"


def _duplicate_member(tmp: Path) -> Path:
    with zipfile.ZipFile(tmp / "d.npz", "w") as archive, pytest.warns(UserWarning, match="Duplicate name"):
        archive.writestr("x.npy", b"")
        archive.writestr("x.npy", b"")
    return tmp / "d.npz"


def _scalar_conflict() -> onnx.ModelProto:
    model = _scalar_sr()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    return model


def _newline_input() -> onnx.ModelProto:
    model = _matmul()
    model.graph.input[0].name = "a\nb"
    model.graph.node[0].input[0] = "a\nb"
    return model


def _value_info_string() -> onnx.ModelProto:
    model = _matmul()
    model.graph.input.append(helper.make_tensor_value_info("text", TensorProto.STRING, [1]))
    model.graph.node.append(helper.make_node("Identity", ["text"], ["t"], "id"))
    model.graph.output.append(helper.make_tensor_value_info("t", TensorProto.STRING, None))
    return model


BAD_DATA: dict[str, tuple[Callable[[Path], list], str]] = {
    "symbolic_channel_random": (_symbolic_channel, "'x' axis 1 (C)"),
    "npz_object_array": (_data_case(_savez(x=np.array([{"a": 1}] * 8, dtype=object))), "never unpickles"),
    "npz_not_a_zip": (_data_case(_not_a_zip), "not a valid .npz"),
    "pb_badly_named": (_data_case(lambda t: _pb_folder(t, {"input_a.pb": b""})), "not named input_<number>.pb"),
    "pb_garbage": (_data_case(lambda t: _pb_folder(t, {"input_0.pb": b"\xff" * 64})), "not a valid TensorProto"),
    "pb_huge_dims": (
        _data_case(
            lambda t: _pb_folder(t, {"input_0.pb": _tensor("x", [1 << 30, 128], b"\0" * 8).SerializeToString()})
        ),
        "holds 8 bytes of raw_data",
    ),
    "pb_no_inputs": (_data_case(lambda t: _pb_folder(t, {"output_0.pb": b""})), "no input_<number>.pb files"),
    "max_samples_negative": (_data_case(_savez(x=_x()), "--max-samples", "-1"), "--max-samples -1"),
    "max_samples_zero": (_data_case(_savez(x=_x()), "--max-samples", "0"), "--max-samples 0"),
    "nan_sample": (_data_case(_with_value(np.nan)), "input 'x' sample 3 holds NaN"),
    "inf_sample": (_data_case(_with_value(-np.inf, 6)), "input 'x' sample 6 holds NaN, Inf"),
    "huge_float64_sample": (_data_case(_with_value(1e30, 0, np.float64)), "input 'x' sample 0"),
    "nan_shared_value": (
        _data_case(_savez(x=_x(), s=np.full(64, np.nan, np.float32)), model=_two_inputs),
        "in the value shared by every sample",
    ),
    "npz_member_forged_1gib": (
        _data_case(lambda t: _npz_member(t, "x.npy", _forged_header((1 << 21, 128)))),
        "only 16 bytes follow",
    ),
    "npz_member_negative_shape": (
        _data_case(lambda t: _npz_member(t, "x.npy", _forged_header((-4, 128)))),
        "d.npz member 'x'",
    ),
    "npz_member_not_npy": (_data_case(lambda t: _npz_member(t, "x.npy", b"hello" * 20)), "not a readable .npy"),
    "npz_duplicate_member": (
        _data_case(_duplicate_member),
        "same member name twice",
    ),
    "npz_10000_members": (_data_case(_ten_thousand_members), "and 9992 more"),
    "npz_structured_dtype": (
        _data_case(_savez(x=np.zeros(8, dtype=[("a", "f4"), ("b", "i4")]))),
        "give a numeric array",
    ),
    "zero_samples": (_data_case(_savez(x=np.zeros((0, 128), np.float32))), "hold 0 samples"),
    "data_is_a_fifo": (_data_case(_fifo), "not a regular file"),
    "scalar_per_sample_with_batch_2": (
        _data_case(_savez(x=_x(), sr=np.full(8, 1, np.int64)), model=_scalar_conflict),
        "different fixed batch sizes [1, 2]",
    ),
    "input_name_with_newline": (_data_case(_savez(x=_x()), model=_newline_input), "'a\\nb'"),
    "unknown_rank_random": (lambda t: [_save(_scalar_sr(None), t / "m.onnx")], "input 'sr' declares no shape"),
    "bfloat16_input_random": (_typed_input(TensorProto.BFLOAT16), "cannot be fed bfloat16 arrays"),
    "string_input_random": (
        lambda t: [_save(_value_info_string(), t / "m.onnx"), "--calibration-data", "random"],
        "synthetic data cannot fill it",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_one_line(case, tmp_path, capsys):
    build, message = BAD_DATA[case]
    args = build(tmp_path)
    err = _cli(tmp_path, capsys, *args, "--no-measure", code=2)
    assert message in err, err


def test_validation_data_with_nan_is_refused(tmp_path, capsys):
    source = _save(_matmul(), tmp_path / "m.onnx")
    x = _x()
    x[2, 0] = np.nan
    np.save(tmp_path / "v.npy", x)
    err = _cli(tmp_path, capsys, source, "--validation-data", tmp_path / "v.npy", "--no-measure", code=2)
    assert "input 'x' sample 2 holds NaN" in err


def test_npz_bomb_over_the_budget_names_the_member(tmp_path, capsys, monkeypatch):
    """A compressed member of 2 MiB of zeros: refused before inflating once it passes the budget, while the
    calibration reads only the rows it uses (512 of 4096) and stays under it."""
    monkeypatch.setattr(calibration, "data_budget", lambda: 1 << 20)
    np.savez_compressed(tmp_path / "d.npz", x=np.zeros((4096, 128), np.float32))
    assert (tmp_path / "d.npz").stat().st_size < 64 << 10
    source = _save(_matmul(), tmp_path / "m.onnx")
    err = _cli(tmp_path, capsys, source, "--validation-data", tmp_path / "d.npz", "--no-measure", code=2)
    assert "d.npz member 'x': shape (4096, 128) float32 needs" in err and "memory budget" in err
    head = load_dataset(tmp_path / "d.npz", _matmul(), max_samples=512)
    assert head.n_samples == 512


# --- readers, batching and measurement --------------------------------------------------------------------


def test_reader_is_read_only_until_enough_samples():
    calls = []

    class Reader:
        def get_next(self):
            calls.append(1)
            return {"x": _x(2)}

    dataset = load_dataset(Reader(), _matmul(), max_samples=7)
    assert dataset.n_samples == 7 and len(calls) == 4
    generator = ({"x": _x(1)} for _ in range(10**9))
    assert load_dataset(generator, _matmul(), max_samples=3).n_samples == 3


def test_reader_of_non_dicts_is_refused():
    with pytest.raises(ConfigError, match="produced a list, not a dict"):
        load_dataset([[1, 2]], _matmul())


def test_batches_keep_shared_inputs_whole_and_scalars_scalar():
    model = _scalar_sr()
    per_sample = Dataset({"x": _x(3), "sr": np.array([8000, 16000, 8000])}, "t")
    feeds = list(batches(per_sample, model))
    assert [f["sr"].shape for f in feeds] == [(), (), ()] and [f["x"].shape for f in feeds] == [(1, 128)] * 3
    shared = random_dataset(_two_inputs(), 5, np.random.default_rng(0))
    assert shared.n_samples == 5 and shared.arrays["s"].shape == (64,)
    assert all(f["s"].shape == (64,) and f["x"].shape == (1, 128) for f in batches(shared, _two_inputs()))
    assert shared.head(2).arrays["s"].shape == (64,)


def test_load_measurement_falls_back_to_getrusage(monkeypatch, tmp_path):
    source = _save(_matmul(), tmp_path / "m.onnx")
    monkeypatch.setattr(validate, "STATUS_FILE", str(tmp_path / "no-proc" / "status"))
    stats = validate.measure_load(source, repeats=1)
    assert stats.rss_source == "getrusage" and stats.peak_rss_mib > 0


def test_failed_load_probe_is_a_note_not_a_crash(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(validate, "_LOAD_PROBE", "raise SystemExit(3)")
    monkeypatch.setattr(validate, "measure_latency_ms", lambda paths, feed: [1.0, 1.0])
    source = _save(_matmul(), tmp_path / "m.onnx")
    _cli(tmp_path, capsys, source, *FAST[1:], code=0)
    report = (tmp_path / "out.onnx.report.json").read_text()
    assert '"load_skipped": "the load probe failed' in report


def test_many_tiny_nodes_stay_fast(tmp_path, capsys):
    """5 000 nodes in seconds: the passes are linear (100 000 took 66 s on a loaded 2-core machine,
    44 s of it in onnxruntime's two session builds)."""
    n = 5_000
    nodes = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"], f"r{i}") for i in range(n)]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("t0", 1, [1, 4])],
        [helper.make_tensor_value_info(f"t{n}", 1, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    source = _save(model, tmp_path / "m.onnx")
    start = time.perf_counter()
    _cli(tmp_path, capsys, source, "--no-validate", code=0)
    assert time.perf_counter() - start < 30
