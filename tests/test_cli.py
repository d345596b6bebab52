"""Every bad input ends in one clear line and a non-zero exit; nothing is lost or half-written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import ROOT, conv_model, run

from onnxpq.cli import main, options_markdown
from onnxpq.encode import pq_name
from onnxpq.model import files


@pytest.fixture
def model_path(tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(conv_model(64, 32), path)
    return path


def cli(*args: str | Path) -> int:
    return main([str(a) for a in args])


def _bad_inputs(tmp: Path, good: Path) -> dict[str, tuple[Path, str]]:
    (tmp / "empty.onnx").write_bytes(b"")
    (tmp / "random.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp / "truncated.onnx").write_bytes(good.read_bytes()[:-2000])
    (tmp / "model.json").write_text('{"graph": {}}')
    (tmp / "model.ort").write_bytes(b"\x1c\x00\x00\x00ORTM" + b"\x00" * 64)
    old = conv_model()
    old.opset_import[0].version = 9
    onnx.save(old, tmp / "old.onnx")
    external = conv_model()
    onnx.save(external, tmp / "ext.onnx", save_as_external_data=True, location="ext.data", size_threshold=0)
    (tmp / "ext.data").unlink()
    return {
        "missing": (tmp / "nope.onnx", "no such file"),
        "directory": (tmp, "is a directory"),
        "empty": (tmp / "empty.onnx", "file is empty"),
        "random": (tmp / "random.onnx", "not a valid ONNX model"),
        "truncated": (tmp / "truncated.onnx", "not a valid ONNX model"),
        "json": (tmp / "model.json", "JSON file"),
        "ort_format": (tmp / "model.ort", "ORT-format"),
        "old_opset": (tmp / "old.onnx", "opset 9 is older than 11"),
        "missing_external_data": (tmp / "ext.onnx", "external data file 'ext.data'"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "directory",
        "empty",
        "random",
        "truncated",
        "json",
        "ort_format",
        "old_opset",
        "missing_external_data",
    ],
)
def test_bad_input_models(case, tmp_path, model_path, capsys):
    bad, message = _bad_inputs(tmp_path, model_path)[case]
    assert cli("compress", bad, tmp_path / "out.onnx") == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "out.onnx").exists()


def test_refuses_output_equal_to_input(model_path, capsys):
    before = model_path.read_bytes()
    assert cli("compress", model_path, model_path, "--force") == 2
    assert "output is the input" in capsys.readouterr().err
    assert model_path.read_bytes() == before


def test_refuses_to_overwrite_without_force(model_path, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"keep me")
    assert cli("compress", model_path, out, "--no-validate") == 2
    assert "pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert cli("compress", model_path, out, "--no-validate", "--force", "--min-elements", "1") == 0
    # --force wrote the compressed model, not the input or a stub: a codebook instead of the weight, same outputs.
    written = onnx.load(out)
    names = {t.name for t in written.graph.initializer}
    assert "w" not in names and pq_name("w", "codebook") in names
    x = np.random.default_rng(0).standard_normal((1, 32, 12, 12)).astype(np.float32)  # conv_model(64, 32)
    assert run(written, {"x": x})[0].shape == run(model_path, {"x": x})[0].shape


def test_missing_or_unwritable_output_directory(model_path, tmp_path, capsys):
    assert cli("compress", model_path, tmp_path / "no" / "out.onnx") == 2
    assert "does not exist" in capsys.readouterr().err


def test_unknown_op_type_and_bad_pattern(model_path, tmp_path, capsys):
    assert cli("compress", model_path, tmp_path / "o.onnx", "--op-types", "Convv") == 2
    assert "unknown op type(s) Convv" in capsys.readouterr().err
    assert cli("compress", model_path, tmp_path / "o.onnx", "--nodes-to-exclude", "cnv") == 2
    assert "matches no node; close names: conv" in capsys.readouterr().err


def test_interrupted_write_leaves_no_partial_file(model_path, tmp_path, monkeypatch):
    def explode(model, path, **kwargs):
        Path(path).write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(files.onnx, "save_model", explode)
    assert cli("compress", model_path, tmp_path / "out.onnx", "--no-validate", "--min-elements", "1") == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_inspect_lists_candidates(model_path, capsys):
    assert cli("inspect", model_path, "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["nodes"] == ["conv"] and rows[0]["shape"] == [64, 32, 3, 3]


def test_compress_writes_report_and_validate_gates(model_path, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert cli("compress", model_path, out, "--min-elements", "1", "--no-keep-first", "--no-measure") == 0
    report = json.loads((tmp_path / "out.onnx.report.json").read_text())
    assert report["validation"]["inputs"] == "synthetic"
    assert report["validation"]["decode_folded"] is True
    assert report["layers"][0]["k"] == 256 and report["output"]["sha256"]
    printed = capsys.readouterr().out
    assert "synthetic" in printed
    # Data-free quantization is the silent default without data (issue 24): the run says so.
    assert any(w.startswith("quantized without data (no --calibration-data)") for w in report["warnings"])
    # ... before the table, where it is read, not among the warnings after it.
    assert printed.splitlines()[1].startswith("WARNING: quantized without data")
    assert cli("validate", model_path, out, "--no-measure", "--metric", "cosine", "--max-degradation", "0.5") == 0
    assert cli("validate", model_path, out, "--no-measure", "--metric", "max_abs", "--max-degradation", "0") == 1
    assert "accuracy gate failed: output 'y' max_abs" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--calibration-data", "--validation-data"])
def test_bad_data_fails_before_anything_is_written(model_path, tmp_path, capsys, flag):
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 32, 12, 12), np.float32))
    assert cli("compress", model_path, tmp_path / "out.onnx", flag, tmp_path / "bad.npz") == 2
    assert "no data for model input(s) ['x']" in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--calibration-shapes", "x:1x32x12x12"], "--calibration-shapes only applies to --calibration-data random"),
        (["--calibration-data", "random", "--calibration-shapes", "x=1x2"], "bad shape 'x=1x2'"),
        (["--calibration-data", "random", "--calibration-shapes", "y:1x32x12x12"], "unknown input(s) y"),
        (["--calibration-data", "random", "--calibration-shapes", "x:1x3x12x12"], "does not match its declared shape"),
        (["--target-bpw", "0"], "target_bpw=0.0 must be in (0, 32]"),
        (["--sequential", "-1"], "sequential=-1 must be >= 0"),
    ],
)
def test_bad_calibration_options_are_named(model_path, tmp_path, capsys, args, message):
    assert cli("compress", model_path, tmp_path / "out.onnx", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()


def test_random_calibration_with_shapes_is_flagged_in_the_report(model_path, tmp_path):
    out = tmp_path / "out.onnx"
    args = ["--calibration-data", "random", "--calibration-shapes", "x:1x32x12x12", "--no-measure", "--no-keep-first"]
    assert cli("compress", model_path, out, *args) == 0
    report = json.loads(out.with_name(out.name + ".report.json").read_text())
    assert report["calibration"]["source"] == "random" and report["calibration"]["layers_with_statistics"] == 1
    assert any("synthetic random inputs" in w for w in report["warnings"])


def test_console_script_runs_without_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "onnxpq.cli", "compress", str(tmp_path / "x.onnx"), "y.onnx"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 2 and "no such file" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_bundled_mnist_passes_accuracy_gate(tmp_path, capsys):
    """The CI accuracy gate: at 1.5 bits/weight, calibrated on held-out training images, the bundled
    model keeps its test accuracy within one point on 2000 test images."""
    out = tmp_path / "mnist_pq.onnx"
    code = cli(
        "compress",
        ROOT / "models/mnist_cnn.onnx",
        out,
        "--calibration-data",
        ROOT / "models/mnist_calib.npz",
        "--target-bpw",
        "1.5",
        "--validation-data",
        ROOT / "models/mnist_test.npz",
        "--labels",
        ROOT / "models/mnist_test_labels.npy",
        "--max-samples",
        "2000",
        "--no-measure",
        "--metric",
        "accuracy",
        "--max-degradation",
        "0.01",
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.with_name(out.name + ".report.json").read_text())
    assert report["files"]["ratio"] >= 15
    assert 0.98 * 1.5 <= report["pqf"]["bits_per_weight_all_parameters"] <= 1.5
    assert report["validation"]["gate"]["failure"] is None


def test_inspect_groups_lists_and_checks_the_channel_groups(capsys):
    assert cli("inspect", ROOT / "models/mnist_cnn.onnx", "--groups") == 0
    out = capsys.readouterr().out
    assert "4 of 5 groups free" in out and "equivalent" in out and "FROZEN: graph output logits" in out


def test_compress_with_permute_reports_the_search(tmp_path):
    out = tmp_path / "out.onnx"
    assert cli("compress", ROOT / "models/mnist_cnn.onnx", out, "--permute", "--no-validate") == 0
    report = json.loads(out.with_name(out.name + ".report.json").read_text())
    assert report["permutation"]["free"] == 4 and report["config"]["permute"] is True


def test_readme_option_table_is_the_parsers() -> None:
    """The README's option table is rendered from the parser, which the settings table builds: regenerate it with
    ``python tools/readme_options.py`` after changing an option."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("<!-- options:begin (tools/readme_options.py) -->\n")[1].split("<!-- options:end -->")[0]
    assert section == options_markdown()


def test_every_config_field_is_a_setting() -> None:
    """A field added to CompressConfig or FinetuneConfig without a Setting would escape validation and the CLI."""
    import dataclasses

    from onnxpq.config import COMPRESS, FINETUNE, CompressConfig, FinetuneConfig

    assert {f.name for f in dataclasses.fields(CompressConfig)} - {"finetune"} == {s.field for s in COMPRESS}
    assert {f.name for f in dataclasses.fields(FinetuneConfig)} == {s.field for s in FINETUNE}


def test_every_setting_with_flags_reaches_the_config(tmp_path) -> None:
    """Each option given on the command line arrives in the CompressConfig the CLI builds."""
    from onnxpq.cli import _compress_config, build_parser

    args = build_parser().parse_args(
        ["compress", "a.onnx", "b.onnx", "--anneal", "--no-refit", "-k", "64", "--target-size", "1.5",
         "--finetune-steps", "7", "--no-finetune-mixup", "--op-types", "Conv", "MatMul"]
    )  # fmt: skip
    config = _compress_config(args)
    assert config.anneal and not config.refit and config.n_codewords == 64 and config.target_mib == 1.5
    assert config.op_types == ("Conv", "MatMul") and config.finetune.steps == 7 and not config.finetune.mixup


def test_benchmarks_and_readme_numbers_are_rendered_from_the_results_file() -> None:
    """docs/BENCHMARKS.md and the README's results table are what tools/results.py renders from docs/results.jsonl
    now, stale marks included: a hand-edited number, or a change to onnxpq/ after the rows were measured
    without re-rendering, fails here. (Re-render with ``python tools/results.py``.)"""
    shallow = subprocess.run(
        ["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if shallow.returncode != 0 or shallow.stdout.strip() != "false":
        pytest.skip("the stale marks come from git history, which this copy has not (no repository, or shallow)")
    check = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "results.py"), "--check"], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("grid", [(0.1, 2.0), (float("nan"),), (-0.1, 0.5)])
def test_the_bounds_of_a_tuple_setting_hold_for_each_element(grid) -> None:
    """``shrinkage_grid`` is recorded in every model's metadata: a weight outside [0, 1] would quantize with a
    metric that is not a shrinkage of H, so it is refused at once, naming the field."""
    from onnxpq import CompressConfig
    from onnxpq.errors import ConfigError

    with pytest.raises(ConfigError, match=r"each of shrinkage_grid=.* must be in \[0, 1\]"):
        CompressConfig(shrinkage_grid=grid)
