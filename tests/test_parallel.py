"""Per-layer work in local processes or on Ray gives exactly the serial run's bytes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import make_model
from onnx import helper

from onnxpq import CompressConfig, compress
from onnxpq.cli import main
from onnxpq.parallel import Workers, map_tasks
from onnxpq.pipeline import ValidationSettings


def _mlp(tmp_path):
    """Three MatMuls through Relu: two free channel groups to permute, three layers to quantize."""
    rng = np.random.default_rng(0)
    weights = {
        f"w{i}": rng.standard_normal(shape).astype(np.float32) for i, shape in enumerate([(64, 96), (96, 80), (80, 32)])
    }
    nodes = []
    current = "x"
    for i in range(3):
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"h{i}"], f"mm{i}"))
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"], f"relu{i}"))
        current = f"r{i}"
    path = tmp_path / "mlp.onnx"
    onnx.save(make_model(nodes, [("x", [4, 64])], [current], weights), path)
    return path


def _compress(source, out, workers):
    config = CompressConfig(permute=True, permute_iters=200, min_elements=1)
    compress(
        source,
        out,
        config,
        calibration="random",
        validation=ValidationSettings(enabled=False),
        force=True,
        workers=workers,
    )
    return out.read_bytes()


def test_map_tasks_keeps_task_order_in_processes():
    tasks = [(n,) for n in range(7)]
    assert map_tasks(abs, ((-n,) for (n,) in tasks), Workers(jobs=2), total=7, desc="t") == list(range(7))


def test_jobs_give_the_serial_bytes(tmp_path):
    source = _mlp(tmp_path)
    serial = _compress(source, tmp_path / "serial.onnx", Workers())
    assert _compress(source, tmp_path / "jobs.onnx", Workers(jobs=2)) == serial


def test_ray_local_cluster_gives_the_serial_bytes(tmp_path):
    pytest.importorskip("ray")
    source = _mlp(tmp_path)
    serial = _compress(source, tmp_path / "serial.onnx", Workers())
    assert _compress(source, tmp_path / "ray.onnx", Workers(ray_address="local")) == serial


def test_bad_worker_options_are_named(tmp_path, capsys):
    source = _mlp(tmp_path)
    assert main(["compress", str(source), str(tmp_path / "o.onnx"), "--jobs", "0"]) == 2
    assert "--jobs 0 must be >= 1" in capsys.readouterr().err
