"""compress() on an onnx.ModelProto, returning the compressed ModelProto: what notebooks and other tools call."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import ROOT, run

from onnxpq import CompressConfig, InputModelError, ValidationFailedError, compress
from onnxpq.config import ConfigError
from onnxpq.pipeline import ValidationSettings

MNIST, CALIB = ROOT / "models" / "mnist_cnn.onnx", ROOT / "models" / "mnist_calib.npz"
CONFIG = CompressConfig(calibration_samples=64)
OFF = ValidationSettings(enabled=False)


def test_a_model_in_memory_compresses_to_the_same_bytes_as_on_disk(tmp_path, monkeypatch):
    """Same model, config and data: the returned ModelProto is the file the path API writes, the caller's model is
    left as it was, and with validation off nothing at all is written (the working folder stays empty)."""
    monkeypatch.chdir(tmp_path)
    model = onnx.load(str(MNIST))
    before = model.SerializeToString()
    result = compress(model, config=CONFIG, calibration=CALIB, validation=OFF)
    assert model.SerializeToString() == before
    assert result.output_paths == [] and result.report_path is None and list(tmp_path.iterdir()) == []
    on_disk = compress(MNIST, tmp_path / "out.onnx", CONFIG, calibration=CALIB, validation=OFF)
    assert result.model.SerializeToString() == (tmp_path / "out.onnx").read_bytes()
    assert result.report["output"] == {**on_disk.report["output"], "path": None}
    assert result.report["input"]["path"] is None and result.report["pqf"] == on_disk.report["pqf"]


def test_in_memory_validation_reports_fidelity_and_writes_nothing_it_keeps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = dict(np.load(CALIB))
    result = compress(
        onnx.load(str(MNIST)), config=CONFIG, calibration=CALIB, validation=ValidationSettings(measure=False)
    )
    (out,) = result.report["validation"]["outputs"]
    assert out["top1_agreement"] > 0.9 and result.report["validation"]["decode_folded"]
    assert list(tmp_path.iterdir()) == []
    (logits,) = run(result.model, {k: v[:4] for k, v in data.items()})
    assert logits.shape == (4, 10)


def test_a_model_in_memory_may_be_written_to_a_file(tmp_path):
    result = compress(onnx.load(str(MNIST)), tmp_path / "out.onnx", CONFIG, calibration=CALIB, validation=OFF)
    assert result.output_paths == [tmp_path / "out.onnx"] and result.report_path.exists()
    assert result.report["input"]["path"] is None and result.report["output"]["path"] == str(tmp_path / "out.onnx")


def test_a_failed_gate_in_memory_hands_back_the_model():
    gate = ValidationSettings(measure=False, metric="max_abs", max_degradation=0.0)
    with pytest.raises(ValidationFailedError) as failed:
        compress(onnx.load(str(MNIST)), config=CONFIG, calibration=CALIB, validation=gate)
    assert isinstance(failed.value.model, onnx.ModelProto) and failed.value.report["validation"]["gate"]["failure"]


def test_in_memory_refusals_say_what_to_do(tmp_path):
    onnx.save(onnx.load(str(MNIST)), tmp_path / "m.onnx", save_as_external_data=True, size_threshold=0)
    model = onnx.load(str(MNIST))
    referencing = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    with pytest.raises(InputModelError, match=r"<in-memory model>: references external data, .* or pass the path"):
        compress(referencing, validation=OFF)
    with pytest.raises(ConfigError, match="a report path needs an output path"):
        compress(model, report_path=tmp_path / "r.json", validation=OFF)
    with pytest.raises(InputModelError, match=r"expected an onnx\.ModelProto or a path, got GraphProto"):
        compress(model.graph, validation=OFF)
    compressed = compress(model, config=CONFIG, validation=OFF).model
    with pytest.raises(InputModelError, match="<in-memory model>: already compressed by onnxpq"):
        compress(compressed, validation=OFF)
