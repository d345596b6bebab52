"""Hostile paths, options and signals: no run may destroy a file, and every failure is one line.

Every case asserts the exit code, no traceback in stdout or stderr, the input and its
external data byte for byte unchanged, and nothing left in the output's folder (or at the
report path) beyond what the case expects: no model, no report, no ``.onnxpq-*`` staging
folder, no temp file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import ROOT, conv_model, make_model
from onnx import TensorProto, helper

from onnxpq import pipeline
from onnxpq.cli import main
from onnxpq.model import files
from onnxpq.report import write_json

#: Keeps path cases fast: nothing is compressed (the only Conv is the first one) and nothing measured.
FAST = ("--no-validate",)


def _tree(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` with a digest of its bytes (or its kind), to compare before and after."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = f"link -> {os.readlink(path)}"
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "dir" if path.is_dir() else "special"
    return out


@dataclass
class Case:
    """What a case runs (``args`` after ``compress``) and what must come out of it."""

    args: list[str | Path]
    code: int
    message: str = ""
    #: Names the run may add to the folder (a successful or gate-failed run's model and report).
    added: set[str] = field(default_factory=set)
    command: str = "compress"


def _run(tmp: Path, case: Case, capsys) -> str:
    before = _tree(tmp)
    code = main([case.command, *map(str, case.args)])
    out, err = capsys.readouterr()
    assert code == case.code, err
    assert "Traceback" not in out + err
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("onnxpq: error: "), err
    assert case.message in err, err
    after = _tree(tmp)
    kept = set(before) - case.added
    assert {k: after.get(k) for k in kept} == {k: before[k] for k in kept}
    assert set(after) - set(before) <= case.added
    assert not [p for p in after if ".onnxpq-" in p or p.endswith(".tmp")]
    return err


def _model(tmp: Path) -> Path:
    path = tmp / "m.onnx"
    onnx.save(conv_model(), path)
    return path


def _external(tmp: Path, location: str = "m.data") -> Path:
    path = tmp / "m.onnx"
    onnx.save(conv_model(), path, save_as_external_data=True, location=location, size_threshold=0)
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _socket(path: Path) -> Path:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()
    return path


def _matmul_logits(tmp: Path) -> Path:
    """x[N, 64] -> 10 class scores: a model accuracy can be measured on."""
    w = np.random.default_rng(0).standard_normal((64, 10)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], "mm")], [("x", ["N", 64])], ["y"], {"w": w})
    onnx.save(model, tmp / "m.onnx")
    np.savez(tmp / "data.npz", x=np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32))
    return tmp / "m.onnx"


# --- outputs that would destroy a file, or cannot be a file --------------------------------------------------


def _report_is_input(tmp: Path) -> Case:
    src = _model(tmp)
    return Case([src, tmp / "o.onnx", "--report", src, *FAST], 2, "report is the input model")


def _report_is_output(tmp: Path) -> Case:
    src = _model(tmp)
    return Case([src, tmp / "o.onnx", "--report", tmp / "o.onnx", *FAST], 2, "also the output path")


def _report_is_existing_output(tmp: Path) -> Case:
    src = _model(tmp)
    (tmp / "o.onnx").write_bytes(b"keep")
    return Case([src, tmp / "o.onnx", "--report", tmp / "o.onnx", "--force", *FAST], 2, "also the output path")


def _report_is_output_data(tmp: Path) -> Case:
    src = _model(tmp)
    return Case([src, tmp / "o.onnx", "--report", tmp / "o.onnx.data", *FAST], 2, "also the output's data file")


def _report_is_input_data(tmp: Path) -> Case:
    src = _external(tmp)
    return Case([src, tmp / "o.onnx", "--report", tmp / "m.data", "--force", *FAST], 2, "input's external data file")


def _output_is_calibration_data(tmp: Path) -> Case:
    src = _model(tmp)
    np.savez(tmp / "calib.npz", x=np.zeros((2, 16, 12, 12), np.float32))
    return Case([src, tmp / "calib.npz", "--calibration-data", tmp / "calib.npz", "--force", *FAST], 2, "data")


def _validate_report_exists(tmp: Path) -> Case:
    src = _model(tmp)
    (tmp / "notes.txt").write_text("precious")
    return Case([src, src, "--report", tmp / "notes.txt", "--no-measure"], 2, "exists", command="validate")


def _validate_report_is_its_data(tmp: Path) -> Case:
    src = _model(tmp)
    np.savez(tmp / "d.npz", x=np.zeros((2, 16, 12, 12), np.float32))
    args = [src, src, "--data", tmp / "d.npz", "--report", tmp / "d.npz", "--force", "--no-measure"]
    return Case(args, 2, "data", command="validate")


def _output_is_input_data(tmp: Path) -> Case:
    src = _external(tmp)
    return Case([src, tmp / "m.data", "--force", *FAST], 2, "output is the input's external data file")


def _output_data_is_input_data(tmp: Path) -> Case:
    """OUT.data of a >2 GB output would be the input's own data file, no --force needed."""
    src = _external(tmp, location="o.onnx.data")
    return Case([src, tmp / "o.onnx", *FAST], 2, "output's data file is the input's external data file")


def _output_is_symlink_to_input(tmp: Path) -> Case:
    src = _model(tmp)
    (tmp / "link.onnx").symlink_to(src)
    return Case([src, tmp / "link.onnx", "--force", *FAST], 2, "output is the input model")


def _output_is_symlink_to_input_data(tmp: Path) -> Case:
    src = _external(tmp)
    (tmp / "link.onnx").symlink_to(tmp / "m.data")
    return Case([src, tmp / "link.onnx", "--force", *FAST], 2, "input's external data file")


def _output_is_hard_link_to_input(tmp: Path) -> Case:
    src = _model(tmp)
    os.link(src, tmp / "hard.onnx")
    return Case([src, tmp / "hard.onnx", "--force", *FAST], 2, "output is the input model")


def _output_is_dotdot_spelling(tmp: Path) -> Case:
    src = _model(tmp)
    (tmp / "sub").mkdir()
    return Case([src, tmp / "sub" / ".." / "m.onnx", "--force", *FAST], 2, "output is the input model")


def _output_through_symlinked_folder(tmp: Path) -> Case:
    src = _model(tmp)
    (tmp / "alias").symlink_to(tmp, target_is_directory=True)
    return Case([src, tmp / "alias" / "m.onnx", "--force", *FAST], 2, "output is the input model")


def _output_is_input_directory(tmp: Path) -> Case:
    return Case([_model(tmp), tmp, "--force", *FAST], 2, "is a directory")


def _output_is_fifo(tmp: Path) -> Case:
    return Case([_model(tmp), _fifo(tmp / "o.onnx"), "--force", *FAST], 2, "is a FIFO")


def _output_is_socket(tmp: Path) -> Case:
    return Case([_model(tmp), _socket(tmp / "o.onnx"), "--force", *FAST], 2, "is a socket")


def _output_is_dev_null(tmp: Path) -> Case:
    return Case([_model(tmp), "/dev/null", "--force", *FAST], 2, "is a character device")


def _report_is_fifo(tmp: Path) -> Case:
    src = _model(tmp)
    return Case([src, tmp / "o.onnx", "--report", _fifo(tmp / "r.json"), "--force", *FAST], 2, "is a FIFO")


def _output_data_is_directory(tmp: Path) -> Case:
    src = _model(tmp)
    (tmp / "o.onnx.data").mkdir()
    return Case([src, tmp / "o.onnx", *FAST], 2, "o.onnx.data: is a directory")


def _output_is_dangling_link(tmp: Path) -> Case:
    src = _model(tmp)
    (tmp / "o.onnx").symlink_to(tmp / "nowhere.onnx")
    return Case([src, tmp / "o.onnx", *FAST], 2, "pass --force")


def _existing_report_needs_force(tmp: Path) -> Case:
    src = _model(tmp)
    (tmp / "o.onnx.report.json").write_text("{}")
    return Case([src, tmp / "o.onnx", *FAST], 2, "o.onnx.report.json: exists; pass --force")


def _report_in_missing_folder(tmp: Path) -> Case:
    src = _model(tmp)
    return Case([src, tmp / "o.onnx", "--report", tmp / "no" / "r.json", *FAST], 2, "does not exist")


def _report_name_too_long(tmp: Path) -> Case:
    """OUT itself fits in 255 bytes; ``OUT.report.json`` does not."""
    return Case([_model(tmp), tmp / ("o" * 250 + ".onnx"), *FAST], 2, "report file name is 267 bytes")


def _output_name_too_long(tmp: Path) -> Case:
    return Case([_model(tmp), tmp / ("é" * 200 + ".onnx"), *FAST], 2, "output file name is 405 bytes")


def _newline_in_missing_folder(tmp: Path) -> Case:
    return Case([_model(tmp), tmp / "a\nb" / "o.onnx", *FAST], 2, "does not exist")


# --- inputs that are not regular files, or that onnxruntime cannot load ---------------------------------------


def _input_is_fifo(tmp: Path) -> Case:
    """Opening a FIFO for reading would block forever: refused from ``stat`` alone."""
    return Case([_fifo(tmp / "m.onnx"), tmp / "o.onnx"], 2, "is a FIFO (named pipe), not a regular file")


def _input_is_dev_zero(tmp: Path) -> Case:
    return Case(["/dev/zero", tmp / "o.onnx"], 2, "is a character device")


def _input_is_directory(tmp: Path) -> Case:
    (tmp / "d.onnx").mkdir()
    return Case([tmp / "d.onnx", tmp / "o.onnx"], 2, "is a directory")


def _input_is_symlink_loop(tmp: Path) -> Case:
    (tmp / "a.onnx").symlink_to(tmp / "b.onnx")
    (tmp / "b.onnx").symlink_to(tmp / "a.onnx")
    return Case([tmp / "a.onnx", tmp / "o.onnx"], 2, "cannot read")


def _ort_refuses(
    tmp: Path, edit: Callable[[onnx.ModelProto], None], *extra: str, message: str = "cannot load this model"
) -> Case:
    model = conv_model()
    edit(model)
    onnx.save(model, tmp / "m.onnx")
    return Case([tmp / "m.onnx", tmp / "o.onnx", *extra], 2, f"onnxruntime {message}")


def _custom_domain(model: onnx.ModelProto) -> None:
    model.graph.node.append(helper.make_node("Frobnicate", ["y"], ["z"], "custom", domain="com.example"))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    model.graph.output[0].name = "z"


def _cycle(model: onnx.ModelProto) -> None:
    model.graph.node.append(helper.make_node("Relu", ["r"], ["q"], "r1"))
    model.graph.node.append(helper.make_node("Relu", ["q"], ["r"], "r2"))
    model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))


def _undefined_input(model: onnx.ModelProto) -> None:
    model.graph.node.append(helper.make_node("Add", ["y", "ghost"], ["z"], "add"))
    model.graph.output[0].name = "z"


def _ir_version_99(model: onnx.ModelProto) -> None:
    model.ir_version = 99


def _channel_mismatch_refused(tmp: Path) -> Case:
    """A Conv input with fewer channels than its weight: onnxruntime 1.32 runs it, onnxpq must not."""
    model = conv_model()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 8
    onnx.save(model, tmp / "m.onnx")
    message = "Conv 'conv' reads 8 input channels from 'x', but its weight 'w' [32, 16, 3, 3] expects 16"
    return Case([tmp / "m.onnx", tmp / "o.onnx", "--no-measure"], 2, message)


# --- options and data checked before any work -------------------------------------------------------------------


def _option(flag: str, value: str, message: str, *extra: str) -> Callable[[Path], Case]:
    def make(tmp: Path) -> Case:
        return Case([_model(tmp), tmp / "o.onnx", f"{flag}={value}", *extra], 2, message)

    return make


def _accuracy_without_labels(tmp: Path) -> Case:
    src = _matmul_logits(tmp)
    return Case([src, tmp / "o.onnx", "--metric", "accuracy", "--no-measure"], 2, "--metric accuracy needs --labels")


def _labels_n_by_1_accepted(tmp: Path) -> Case:
    src = _matmul_logits(tmp)
    np.save(tmp / "labels.npy", np.arange(8).reshape(8, 1) % 10)
    args = ["--validation-data", tmp / "data.npz", "--labels", tmp / "labels.npy", "--metric", "accuracy"]
    return Case(
        [src, tmp / "o.onnx", *args, "--max-degradation", "1", "--no-measure"],
        0,
        added={"o.onnx", "o.onnx.report.json"},
    )


def _labels_as_text(tmp: Path) -> Case:
    src = _matmul_logits(tmp)
    np.save(tmp / "labels.npy", np.array(["cat"] * 8))
    args = ["--validation-data", tmp / "data.npz", "--labels", tmp / "labels.npy", "--no-measure"]
    return Case([src, tmp / "o.onnx", *args], 2, "expected integer class indices")


def _unicode_and_newline_output(tmp: Path) -> Case:
    name = "modèle\nñ 模型.onnx"
    return Case([_model(tmp), tmp / name, *FAST], 0, added={name, name + ".report.json"})


def _output_symlink_elsewhere_replaced_not_followed(tmp: Path) -> Case:
    """--force replaces the link itself; the file it pointed to is left alone (checked by the tree digest)."""
    src = _model(tmp)
    (tmp / "keep.bin").write_bytes(b"precious")
    (tmp / "o.onnx").symlink_to(tmp / "keep.bin")
    return Case([src, tmp / "o.onnx", "--force", *FAST], 0, added={"o.onnx", "o.onnx.report.json"})


CASES: dict[str, Callable[[Path], Case]] = {
    "report_is_input": _report_is_input,
    "report_is_output": _report_is_output,
    "report_is_existing_output": _report_is_existing_output,
    "report_is_output_data": _report_is_output_data,
    "report_is_input_data": _report_is_input_data,
    "output_is_input_data": _output_is_input_data,
    "output_data_is_input_data": _output_data_is_input_data,
    "output_is_symlink_to_input": _output_is_symlink_to_input,
    "output_is_symlink_to_input_data": _output_is_symlink_to_input_data,
    "output_is_hard_link_to_input": _output_is_hard_link_to_input,
    "output_is_dotdot_spelling": _output_is_dotdot_spelling,
    "output_through_symlinked_folder": _output_through_symlinked_folder,
    "output_is_input_directory": _output_is_input_directory,
    "output_is_fifo": _output_is_fifo,
    "output_is_socket": _output_is_socket,
    "output_is_dev_null": _output_is_dev_null,
    "report_is_fifo": _report_is_fifo,
    "output_data_is_directory": _output_data_is_directory,
    "output_is_dangling_link": _output_is_dangling_link,
    "existing_report_needs_force": _existing_report_needs_force,
    "report_in_missing_folder": _report_in_missing_folder,
    "report_name_too_long": _report_name_too_long,
    "output_name_too_long": _output_name_too_long,
    "newline_in_missing_folder": _newline_in_missing_folder,
    "input_is_fifo": _input_is_fifo,
    "input_is_dev_zero": _input_is_dev_zero,
    "input_is_directory": _input_is_directory,
    "input_is_symlink_loop": _input_is_symlink_loop,
    "ort_custom_domain": lambda tmp: _ort_refuses(tmp, _custom_domain),
    "ort_custom_domain_no_validate": lambda tmp: _ort_refuses(tmp, _custom_domain, "--no-validate"),
    "ort_cycle": lambda tmp: _ort_refuses(tmp, _cycle, "--no-validate"),
    "ort_undefined_input": lambda tmp: _ort_refuses(tmp, _undefined_input, "--no-validate"),
    "ort_ir_version_99": lambda tmp: _ort_refuses(tmp, _ir_version_99, "--no-validate"),
    "channel_mismatch": _channel_mismatch_refused,
    "max_degradation_nan": _option("--max-degradation", "nan", "--max-degradation nan: must be a finite number"),
    "max_degradation_negative": _option("--max-degradation", "-0.1", "max_degradation=-0.1 must be"),
    "target_size_nan": _option("--target-size", "nan", "--target-size nan: must be a finite number"),
    "target_bpw_inf": _option("--target-bpw", "inf", "--target-bpw inf: must be a finite number"),
    "finetune_lr_nan": _option("--finetune-lr", "nan", "--finetune-lr nan: must be a finite number"),
    "finetune_time_inf": _option("--finetune-time", "inf", "--finetune-time inf: must be a finite number"),
    "finetune_features_nan": _option("--finetune-features", "NaN", "--finetune-features nan"),
    "finetune_ema_inf": _option("--finetune-ema", "-inf", "--finetune-ema -inf: must be a finite number"),
    "accuracy_without_labels": _accuracy_without_labels,
    "labels_n_by_1_accepted": _labels_n_by_1_accepted,
    "labels_as_text": _labels_as_text,
    "unicode_and_newline_output": _unicode_and_newline_output,
    "output_symlink_elsewhere": _output_symlink_elsewhere_replaced_not_followed,
    "output_is_calibration_data": _output_is_calibration_data,
    "validate_report_exists": _validate_report_exists,
    "validate_report_is_its_data": _validate_report_is_its_data,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_path_or_option(name, tmp_path, capsys):
    case = CASES[name](tmp_path)
    _run(tmp_path, case, capsys)


def _float_flags() -> list[tuple[str, str]]:
    from onnxpq.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return [(cmd, a.option_strings[-1]) for cmd, p in sub.choices.items() for a in p._actions if a.type is float]


@pytest.mark.parametrize(("command", "flag"), _float_flags())
def test_every_float_option_refuses_nan(command, flag, tmp_path, capsys):
    """Found from the parser, so an option added later is covered too: ``nan`` compares false and would
    switch a check off silently (``--max-degradation nan`` passed every gate)."""
    src = _model(tmp_path)
    second = [tmp_path / "o.onnx"] if command != "inspect" else []
    _run(
        tmp_path, Case([src, *second, flag, "nan"], 2, f"{flag} nan: must be a finite number", command=command), capsys
    )


def test_read_only_output_folder(tmp_path, capsys):
    """Refused in one line; root writes anywhere, so there the run succeeds instead, cleanly."""
    src = _model(tmp_path)
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        root = os.geteuid() == 0
        added = {"ro/o.onnx", "ro/o.onnx.report.json"} if root else set()
        _run(tmp_path, Case([src, folder / "o.onnx", *FAST], 0 if root else 2, "", added), capsys)
    finally:
        folder.chmod(0o755)


# --- failures after the work started: nothing is published ------------------------------------------------------


def _disk_full(model, path, *args, **kwargs):
    Path(path).write_bytes(b"half a model")
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def test_disk_full_while_writing_the_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(files.onnx, "save_model", _disk_full)
    _run(tmp_path, Case([_model(tmp_path), tmp_path / "o.onnx", *FAST], 2, "No space left on device"), capsys)


def test_disk_full_while_writing_the_report(tmp_path, monkeypatch, capsys):
    """The model is already staged: it must not be published without its report."""

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "write_json", full)
    _run(tmp_path, Case([_model(tmp_path), tmp_path / "o.onnx", *FAST], 2, "No space left on device"), capsys)


def test_compressed_model_onnxruntime_cannot_load_is_our_bug(tmp_path, monkeypatch, capsys):
    real = pipeline.session

    def picky(path, **kwargs):
        if ".onnxpq-" in str(path):
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : simulated\nsecond line")
        return real(path, **kwargs)

    monkeypatch.setattr(pipeline, "session", picky)
    case = Case([_model(tmp_path), tmp_path / "o.onnx", *FAST], 2, "an onnxpq bug (please report it)")
    assert "simulated second line" in _run(tmp_path, case, capsys)


@pytest.mark.parametrize("error", [RecursionError("maximum recursion depth"), MemoryError(), ValueError("odd")])
def test_unexpected_errors_are_one_line_exit_2(error, tmp_path, monkeypatch, capsys):
    def boom(*args, **kwargs):
        raise error

    monkeypatch.setattr(pipeline, "budget_candidates", boom)
    _run(tmp_path, Case([_model(tmp_path), tmp_path / "o.onnx", *FAST], 2, type(error).__name__), capsys)


def test_verbose_shows_the_traceback_and_still_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "budget_candidates", lambda *a, **k: 1 / 0)
    assert main(["-v", "compress", str(_model(tmp_path)), str(tmp_path / "o.onnx"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("(unexpected; -v shows where)")
    assert not (tmp_path / "o.onnx").exists()


def test_failed_gate_publishes_model_and_report_then_exits_1(tmp_path, capsys):
    src = _model(tmp_path)
    args = [src, tmp_path / "o.onnx", "--no-keep-first", "--no-measure", "--metric", "max_abs"]
    case = Case([*args, "--max-degradation", "0"], 1, "accuracy gate failed", {"o.onnx", "o.onnx.report.json"})
    _run(tmp_path, case, capsys)
    json.loads((tmp_path / "o.onnx.report.json").read_text())


def test_two_concurrent_runs_on_one_output(tmp_path):
    """Without --force exactly one run publishes; the other is refused and leaves nothing."""
    src = _model(tmp_path)
    codes: list[int] = []
    runs = [
        threading.Thread(target=lambda: codes.append(main(["compress", str(src), str(tmp_path / "o.onnx"), *FAST])))
        for _ in range(2)
    ]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    assert sorted(codes) == [0, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "o.onnx", "o.onnx.report.json"]
    onnx.checker.check_model(str(tmp_path / "o.onnx"))


def test_report_json_never_holds_bare_nan(tmp_path):
    path = tmp_path / "r.json"
    write_json({"a": math.nan, "b": [np.float32("inf"), -math.inf], "c": {"d": np.float64(1.5)}}, path)

    def refuse(name: str) -> float:
        raise AssertionError(f"bare {name} in the JSON")

    assert json.loads(path.read_text(), parse_constant=refuse) == {"a": "nan", "b": ["inf", "-inf"], "c": {"d": 1.5}}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


# --- the other commands -------------------------------------------------------------------------------------------


def test_validate_models_with_different_inputs(tmp_path, capsys):
    a = _model(tmp_path)
    other = conv_model()
    other.graph.input[0].name = "image"
    other.graph.node[0].input[0] = "image"
    onnx.save(other, tmp_path / "b.onnx")
    case = Case([a, tmp_path / "b.onnx", "--no-measure"], 2, "the models take different inputs", command="validate")
    _run(tmp_path, case, capsys)


def test_validate_report_may_not_be_a_model(tmp_path, capsys):
    a = _model(tmp_path)
    onnx.save(conv_model(), tmp_path / "b.onnx")
    args = [a, tmp_path / "b.onnx", "--no-measure", "--report", tmp_path / "b.onnx"]
    _run(tmp_path, Case(args, 2, "report is the input model", command="validate"), capsys)


def test_inspect_groups_on_a_cyclic_graph(tmp_path, capsys):
    model = conv_model()
    _cycle(model)
    onnx.save(model, tmp_path / "m.onnx")
    _run(tmp_path, Case([tmp_path / "m.onnx", "--groups"], 2, "onnxruntime cannot load", command="inspect"), capsys)


# --- real signals to a real process -------------------------------------------------------------------------------


def _big_float_model(tmp: Path) -> Path:
    """16 MiB of weights left in float: writing, checking and loading it keeps the staging folder up a while."""
    w = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], "mm")], [("x", [1, 2048])], ["y"], {"w": w})
    onnx.save(model, tmp / "m.onnx")
    return tmp / "m.onnx"


def _start(tmp: Path, src: Path) -> subprocess.Popen:
    args = ["compress", str(src), str(tmp / "o.onnx"), "--min-elements", str(2**30), "--no-measure"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "onnxpq.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )


def _wait_for_staging(tmp: Path, proc: subprocess.Popen, limit_s: float = 120.0) -> bool:
    end = time.monotonic() + limit_s
    while time.monotonic() < end and proc.poll() is None:
        if any(p.name.startswith(".onnxpq-") for p in tmp.iterdir()):
            return True
        time.sleep(0.002)
    return False


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, pytest.param(signal.SIGHUP, marks=pytest.mark.slow)], ids=["SIGTERM", "SIGHUP"]
)
def test_signal_during_the_write_leaves_nothing(signum, tmp_path):
    """On a loaded machine the run can publish between the staging folder being seen and the signal being
    sent (the window is the write and load check of 16 MiB): such a try says nothing, so it is repeated."""
    src = _big_float_model(tmp_path)
    before = _tree(tmp_path)
    for _ in range(3):
        proc = _start(tmp_path, src)
        seen = _wait_for_staging(tmp_path, proc)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            break
        for published in ("o.onnx", "o.onnx.report.json"):
            (tmp_path / published).unlink(missing_ok=True)
    assert seen, f"the run ended before its staging folder was seen: {err}"
    assert proc.returncode == 128 + signum, err
    assert f"interrupted by {signal.Signals(signum).name}" in err and "Traceback" not in out + err
    assert _tree(tmp_path) == before


def test_sigterm_early_in_the_run_leaves_nothing(tmp_path):
    """Whenever the signal lands (import, load, quantization), nothing is left and there is no traceback."""
    src = _big_float_model(tmp_path)
    before = _tree(tmp_path)
    proc = _start(tmp_path, src)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode in (128 + signal.SIGTERM, -signal.SIGTERM), err
    assert "Traceback" not in out + err
    assert _tree(tmp_path) == before
