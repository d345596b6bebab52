"""The spellings onnxruntime and ModelOpt users already type, and node patterns that mean what they say."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_model, rand
from onnx import helper

from onnxpq.cli import main
from onnxpq.config import CompressConfig
from onnxpq.quantize.selection import find_candidates, pattern_counts

#: Conv_1 is a prefix of Conv_10 and Conv_11: a regex search for it would catch all three.
NODES = ("Conv_1", "Conv_10", "Conv_11")
FAST = ("--no-validate", "--min-elements", "1", "--no-keep-first", "--kmeans-iters", "2")


def _chain() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    values = ["x", "a", "b", "y"]
    nodes = [
        helper.make_node("Conv", [values[i], f"w{i}"], [values[i + 1]], name, pads=[1, 1, 1, 1])
        for i, name in enumerate(NODES)
    ]
    weights = {f"w{i}": rand(rng, 16, 16, 3, 3) for i in range(len(NODES))}
    return make_model(nodes, [("x", [1, 16, 8, 8])], ["y"], weights)


@pytest.fixture
def model_path(tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(_chain(), path)
    return path


def _skipped(**patterns: tuple[str, ...]) -> set[str]:
    config = CompressConfig(min_elements=1, keep_first=False, **patterns)
    return {c.uses[0].node for c in find_candidates(_chain(), config) if not c.compressed}


def test_a_pattern_equal_to_a_node_name_matches_that_node_only():
    # The bug this catches: ``--nodes-to-exclude Conv_1`` as a regex search also kept Conv_10 and Conv_11 float.
    assert _skipped(nodes_to_exclude=("Conv_1",)) == {"Conv_1"}
    assert _skipped(nodes_to_exclude=("Conv_1.*",)) == set(NODES)  # not a node name: a regex search
    assert _skipped(nodes_to_include=("Conv_1",)) == set(NODES[1:])


def test_pattern_counts_say_how_many_nodes_each_matched():
    config = CompressConfig(nodes_to_exclude=("Conv_1", "Conv_1[01]"), nodes_to_include=("^Conv",))
    assert pattern_counts(_chain(), config) == [
        {"pattern": "^Conv", "option": "nodes_to_include", "matched": 3, "exact": False},
        {"pattern": "Conv_1", "option": "nodes_to_exclude", "matched": 1, "exact": True},
        {"pattern": "Conv_1[01]", "option": "nodes_to_exclude", "matched": 2, "exact": False},
    ]


def _compress(tmp_path: Path, name: str, *args: str | Path) -> tuple[bytes, dict]:
    out = tmp_path / f"{name}.onnx"
    assert main(["compress", *(str(a) for a in args), "--report", str(tmp_path / f"{name}.json"), *FAST]) == 0
    return out.read_bytes(), json.loads((tmp_path / f"{name}.json").read_text())


@pytest.fixture
def calibration_path(tmp_path) -> Path:
    path = tmp_path / "calib.npz"
    np.savez(path, x=rand(np.random.default_rng(1), 8, 16, 8, 8))
    return path


@pytest.mark.parametrize(
    ("dashed", "alias"),
    [
        (["--nodes-to-exclude", "Conv_10"], ["--nodes_to_exclude", "Conv_10"]),
        (["--op-types", "MatMul"], ["--op_types_to_quantize", "MatMul"]),
        (["--calibration-data", "CALIB"], ["--calibration_data_path", "CALIB"]),
        (
            ["--calibration-data", "random", "--calibration-shapes", "x:1x16x8x8"],
            ["--calibration-data", "random", "--calibration_shapes", "x:1x16x8x8"],
        ),
    ],
)
def test_aliases_give_the_same_bytes_and_config(model_path, calibration_path, tmp_path, dashed, alias):
    def spelled(args: list[str]) -> list[str]:
        return [str(calibration_path) if a == "CALIB" else a for a in args]

    one = _compress(tmp_path, "dashed", model_path, tmp_path / "dashed.onnx", *spelled(dashed))
    two = _compress(tmp_path, "alias", model_path, tmp_path / "alias.onnx", *spelled(alias))
    assert one[0] == two[0]
    assert one[1]["config"] == two[1]["config"]


def test_input_model_and_output_model_stand_for_in_and_out(model_path, tmp_path):
    positional = _compress(tmp_path, "a", model_path, tmp_path / "a.onnx")[0]
    assert _compress(tmp_path, "b", "--input_model", model_path, "--output_model", tmp_path / "b.onnx")[0] == positional
    # A positional path fills whichever of IN and OUT the options leave.
    assert _compress(tmp_path, "c", "--input_model", model_path, tmp_path / "c.onnx")[0] == positional


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input_model", "IN"], "give the output model"),
        (["IN", "OUT", "--output_model", "OUT"], "unexpected extra path"),
    ],
)
def test_model_paths_given_twice_or_not_at_all(model_path, tmp_path, capsys, args, message):
    paths = {"IN": str(model_path), "OUT": str(tmp_path / "o.onnx")}
    assert main(["compress", *(paths.get(a, a) for a in args), *FAST]) == 2
    assert message in capsys.readouterr().err


def test_report_and_table_show_per_pattern_counts(model_path, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    assert main(["compress", str(model_path), str(out), "--nodes-to-exclude", "Conv_1", "Conv_1[01]", *FAST]) == 0
    report = json.loads((tmp_path / "o.onnx.report.json").read_text())
    assert report["selection"]["patterns"] == [
        {"pattern": "Conv_1", "option": "nodes_to_exclude", "matched": 1, "exact": True},
        {"pattern": "Conv_1[01]", "option": "nodes_to_exclude", "matched": 2, "exact": False},
    ]
    printed = capsys.readouterr().out
    assert "--nodes-to-exclude 'Conv_1': 1 node(s) matched (exact name)" in printed
    assert "--nodes-to-exclude 'Conv_1[01]': 2 node(s) matched (regex search)" in printed


def test_a_pattern_matching_no_node_is_refused_with_close_names(model_path, tmp_path, capsys):
    # A typo (Conv_2 for Conv_1?) would otherwise compress what the user meant to keep in float.
    assert main(["compress", str(model_path), str(tmp_path / "o.onnx"), "--nodes_to_exclude", "Conv_2", *FAST]) == 2
    err = capsys.readouterr().err
    assert "--nodes-to-exclude pattern 'Conv_2' matches no node; close names: Conv_1" in err
    assert not (tmp_path / "o.onnx").exists()


def test_calibration_shapes_with_real_samples_is_refused(model_path, calibration_path, tmp_path, capsys):
    args = ["--calibration_data_path", str(calibration_path), "--calibration_shapes", "x:1x16x8x8"]
    assert main(["compress", str(model_path), str(tmp_path / "o.onnx"), *args, *FAST]) == 2
    assert "real samples already give every dim" in capsys.readouterr().err
