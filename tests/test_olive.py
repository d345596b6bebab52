"""The Olive pass (``onnxpq.olive_pass``): its options are ``CompressConfig``'s, and a real Olive workflow (the one
docs/OLIVE.md shows, word for word) compresses the bundled MNIST model through Olive's data config."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ROOT, conv_model

pytest.importorskip("olive", reason="Olive is not installed (pip install 'onnxpq[olive]'); the Olive pass needs it")

from olive.hardware import DEFAULT_CPU_ACCELERATOR
from olive.model import ONNXModelHandler
from olive.package_config import OlivePackageConfig
from olive.passes.olive_pass import create_pass_from_dict
from olive.workflows import run as olive_run
from pydantic import ValidationError

from onnxpq.config import COMPRESS, CompressConfig, FinetuneConfig
from onnxpq.errors import ConfigError, ValidationFailedError
from onnxpq.olive_pass import (
    PACKAGE_CONFIG,
    REPORT_NAME,
    OnnxPQCompression,
    compress_config,
    package_config,
)

#: docs/OLIVE.md's workflow. Its paths are relative to the repository root, where the docs run it after writing
#: the calibration samples as one raw float32 file (``CALIBRATION_RAW``) for Olive's built-in RawDataContainer.
WORKFLOW = {
    "input_model": {"type": "ONNXModel", "model_path": "models/mnist_cnn.onnx"},
    "data_configs": [
        {
            "name": "mnist_calib",
            "type": "RawDataContainer",
            "load_dataset_config": {
                "params": {"data_dir": "mnist_calib_raw", "input_names": ["input"], "input_shapes": [[512, 1, 28, 28]]}
            },
        }
    ],
    "passes": {
        "compress": {
            "type": "OnnxPQCompression",
            "data_config": "mnist_calib",
            "target_bpw": 1.5,
            "max_degradation": 0.03,
        }
    },
    "output_dir": "mnist_olive",
}
CALIBRATION_RAW = Path("mnist_calib_raw/input/calib.raw")


def _pass_config(**values: object) -> object:
    return OnnxPQCompression.generate_config(DEFAULT_CPU_ACCELERATOR, values, disable_search=True)


def test_options_cover_every_command_line_setting_with_its_default():
    params = OnnxPQCompression.default_config(DEFAULT_CPU_ACCELERATOR)
    assert {s.field for s in COMPRESS if s.flags} <= params.keys()
    assert compress_config(_pass_config()) == CompressConfig()


def test_options_reach_compress_config_and_are_checked():
    config = compress_config(
        _pass_config(target_bpw=1.5, op_types=["Conv"], shrinkage_grid=[0.5], finetune={"steps": 3})
    )
    assert config == CompressConfig(
        target_bpw=1.5, op_types=("Conv",), shrinkage_grid=(0.5,), finetune=FinetuneConfig(steps=3)
    )
    assert compress_config(_pass_config(target_mib="auto")).target_mib == "auto"
    with pytest.raises(ValidationError, match="block_size"):
        _pass_config(block_size="huge")  # a choice: refused by Olive when it reads the workflow
    with pytest.raises(ConfigError, match="n_codewords=1"):
        compress_config(_pass_config(n_codewords=1))  # a bound: refused by onnxpq before any work
    with pytest.raises(ConfigError, match="unknown field"):
        compress_config(_pass_config(finetune={"stpes": 3}))


def test_package_config_adds_the_pass_to_olives_own():
    alone = OlivePackageConfig.parse_file_or_obj(str(PACKAGE_CONFIG))
    assert alone.import_pass_module("OnnxPQCompression") is OnnxPQCompression
    merged = OlivePackageConfig.model_validate(package_config())
    assert {"onnxpqcompression", "onnxconversion", "onnxpeepholeoptimizer"} <= merged.passes.keys()


def test_docs_show_the_workflow_the_test_runs():
    docs = (ROOT / "docs" / "OLIVE.md").read_text()
    assert json.loads(re.search(r"```json\n(.*?)```", docs, re.DOTALL).group(1)) == WORKFLOW
    assert str(CALIBRATION_RAW) in docs


def _raw_data(folder: Path, samples: np.ndarray) -> dict[str, object]:
    """An inline data config (as a pass run outside a workflow takes it) of ``samples`` as one raw batch."""
    (folder / "x").mkdir(parents=True)
    samples.astype(np.float32).tofile(folder / "x" / "batch.raw")
    params = {"data_dir": str(folder), "input_names": ["x"], "input_shapes": [list(samples.shape)]}
    return {"name": folder.name, "type": "RawDataContainer", "load_dataset_config": {"params": params}}


def _run_pass(tmp_path: Path, **config: object) -> ONNXModelHandler:
    source = tmp_path / "conv.onnx"
    onnx.save(conv_model(), source)
    the_pass = create_pass_from_dict(OnnxPQCompression, config, disable_search=True)
    return the_pass.run(ONNXModelHandler(model_path=str(source)), str(tmp_path / "out"))


def test_pass_reads_calibration_and_validation_data_configs(tmp_path):
    rng = np.random.default_rng(0)
    calib = _raw_data(tmp_path / "calib", rng.standard_normal((16, 16, 12, 12)))
    held_out = _raw_data(tmp_path / "held_out", rng.standard_normal((6, 16, 12, 12)))
    out = _run_pass(tmp_path, data_config=calib, validation_data_config=held_out, n_codewords=16)
    summary = out.model_attributes["onnxpq"]
    assert summary["validation"]["n_samples"] == 6 and summary["validation"]["gate"] is None
    report = json.loads((Path(out.model_path).parent / REPORT_NAME).read_text())
    assert report["calibration"]["samples"] == 16 and report["config"]["n_codewords"] == 16
    assert summary["files"]["compressed_bytes"] == Path(out.model_path).stat().st_size


def test_a_failed_gate_fails_the_pass(tmp_path):
    with pytest.raises(ValidationFailedError, match="max_abs"):
        _run_pass(tmp_path, metric="max_abs", max_degradation=0.0)  # data-free: no weight comes back exact


def _top1(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0].argmax(axis=1)


@pytest.mark.slow
def test_olive_workflow_compresses_the_bundled_mnist_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Olive's cache and output, and the workflow's relative paths
    monkeypatch.setenv("OLIVE_DISABLE_TELEMETRY", "1")
    (tmp_path / "models").symlink_to(ROOT / "models")
    CALIBRATION_RAW.parent.mkdir(parents=True)
    np.load(ROOT / "models" / "mnist_calib.npz")["input"].tofile(CALIBRATION_RAW)

    best = olive_run(WORKFLOW, package_config=str(PACKAGE_CONFIG)).get_best_candidate()

    assert Path(best.model_path) == tmp_path / "mnist_olive"  # a folder: the model and its report
    model = Path(best.model_path) / best.model_config["onnx_file_name"]
    original = ROOT / "models" / "mnist_cnn.onnx"
    assert model.stat().st_size * 15 < original.stat().st_size
    x = np.load(ROOT / "models" / "mnist_test.npz")["input"][:500]
    assert np.mean(_top1(model, x) == _top1(original, x)) >= 0.97

    summary = best.model_config["model_attributes"]["onnxpq"]
    assert summary["report"] == REPORT_NAME
    assert best.model_config["model_attributes"]["additional_files"] == [str(model.parent / REPORT_NAME)]
    report = json.loads((model.parent / REPORT_NAME).read_text())
    assert summary["files"] == report["files"] and summary["pqf"] == report["pqf"]
    assert summary["files"]["compressed_bytes"] == model.stat().st_size
    assert summary["pqf"]["bits_per_weight_all_parameters"] <= 1.5
    assert summary["validation"]["gate"] == {"metric": "top1", "max_degradation": 0.03, "failure": None}
    assert summary["validation"]["outputs"][0]["top1_agreement"] >= 0.97
