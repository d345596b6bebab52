"""Per-layer work in local processes or on Ray gives exactly the serial run's bytes."""

from __future__ import annotations

import ctypes.util

import numpy as np
import onnx
import pytest
from conftest import make_model
from onnx import helper

from onnxpq import CompressConfig, compress, parallel
from onnxpq.cli import main
from onnxpq.heap import trim_heap
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


def _compress(source, out, workers, **options):
    config = CompressConfig(permute=True, permute_iters=200, min_elements=1, **options)
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


@pytest.mark.slow
def test_jobs_give_the_serial_bytes(tmp_path):
    source = _mlp(tmp_path)
    serial = _compress(source, tmp_path / "serial.onnx", Workers(jobs=1))
    assert _compress(source, tmp_path / "jobs.onnx", Workers(jobs=2)) == serial


@pytest.mark.slow
def test_bit_allocation_in_processes_gives_the_serial_bytes(tmp_path):
    """The allocator's per-layer estimates run in the workers too; a result returned out of order or
    attributed to the wrong layer would change the chosen settings."""
    source = _mlp(tmp_path)
    serial = _compress(source, tmp_path / "serial.onnx", Workers(jobs=1), target_bpw=3.0)
    assert _compress(source, tmp_path / "jobs.onnx", Workers(jobs=2), target_bpw=3.0) == serial


@pytest.mark.slow
def test_ray_local_cluster_gives_the_serial_bytes(tmp_path):
    pytest.importorskip("ray")
    source = _mlp(tmp_path)
    serial = _compress(source, tmp_path / "serial.onnx", Workers(jobs=1))
    assert _compress(source, tmp_path / "ray.onnx", Workers(ray_address="local")) == serial


def test_auto_jobs_stay_serial_on_small_models_and_fit_memory_on_large_ones(monkeypatch):
    monkeypatch.setattr(parallel, "usable_cores", lambda: 8)
    monkeypatch.setattr(parallel, "available_memory", lambda: 4 << 30)
    assert Workers().resolved(parallel.PARALLEL_FROM_WEIGHTS - 1, 0).jobs == 1
    assert Workers().resolved(10**8, 0).jobs == 8
    # 4 GiB hold three workers of 300 MiB each with two 512 MiB tasks in flight, not eight.
    assert Workers().resolved(10**8, 512 << 20).jobs == 3
    assert Workers().resolved(10**8, 64 << 30).jobs == 1
    assert Workers(jobs=5).resolved(10, 64 << 30).jobs == 5


def test_jobs_option_takes_a_count_or_auto(tmp_path, capsys):
    source = _mlp(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["compress", str(source), str(tmp_path / "o.onnx"), "--jobs", "many"])
    assert exit_.value.code == 2
    assert "'many' is neither a number of processes nor 'auto'" in capsys.readouterr().err
    assert main(["compress", str(source), str(tmp_path / "o.onnx"), "--jobs", "auto", "--no-validate"]) == 0


def test_bad_worker_options_are_named(tmp_path, capsys):
    source = _mlp(tmp_path)
    assert main(["compress", str(source), str(tmp_path / "o.onnx"), "--jobs", "0"]) == 2
    assert "--jobs 0 must be >= 1" in capsys.readouterr().err


def _rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


@pytest.mark.skipif(not ctypes.util.find_library("c"), reason="no C library to trim")
def test_trim_heap_gives_freed_heap_memory_back():
    """Blocks freed between live ones stay in the process (glibc) until trimmed; on other C libraries
    trimming is a no-op that must not fail."""
    np.ones(1 << 18)  # freeing a 2 MiB mapping raises glibc's mmap threshold above the blocks below
    blocks = [np.ones(1 << 15) for _ in range(4000)]  # 256 KiB each, ~1 GiB of heap in all
    kept = blocks[::16]  # live blocks all along the heap: it cannot shrink from the top
    held = _rss_kib()
    del blocks
    trim_heap()
    assert _rss_kib() < held - (512 << 10)
    assert all(k[0] == 1.0 for k in kept)


def test_workers_return_each_tasks_result_after_trimming():
    assert map_tasks(pow, [(2, 3), (3, 2)], Workers(jobs=2), total=2, desc="pow") == [8, 9]
