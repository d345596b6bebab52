"""Compress a generated model larger than protobuf's 2 GB limit and measure the peak memory it takes.

The model (not committed; made here, by default 12 MatMul layers of 4096x16384
fp32 = 3.0 GiB of external data) is written layer by layer, so making it never
holds more than one layer either. ``onnxpq compress`` then runs in a child process
whose peak RSS (``ru_maxrss``) is read when it exits. The claim under test: peak
RSS stays within 2 GiB plus one layer's working set, because external data is
read one tensor at a time and streamed from the input's data file to the output's.

Validation is off for this run (``--no-validate``): it runs both models in
onnxruntime, which holds the whole original in memory by design.

Writes docs/LARGE.md and docs/large.json.

Usage: python tools/bench_large.py [--layers 12] [--width 4096] [--expand 4] [--kmeans-iters 2] [--jobs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxpq.report import versions

ROOT = Path(__file__).resolve().parent.parent


def make_model(path: Path, layers: int, width: int, expand: int, seed: int = 0) -> int:
    """An MLP of ``layers`` MatMul+Relu with every weight in ``path``.data; returns the data bytes."""
    rng = np.random.default_rng(seed)
    data = path.with_name(path.name + ".data")
    inits, nodes = [], []
    current = "x"
    with data.open("wb") as f:
        for i in range(layers):
            rows, cols = (width, width * expand) if i % 2 == 0 else (width * expand, width)
            offset = f.tell()
            for start in range(0, rows, 1024):  # 64 MiB at a time: making the model stays small too
                block = rng.standard_normal((min(1024, rows - start), cols), dtype=np.float32)
                block /= np.float32(np.sqrt(rows))
                f.write(block.tobytes())
            tensor = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[rows, cols])
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(f.tell() - offset))):
                tensor.external_data.add(key=key, value=value)
            tensor.data_location = TensorProto.EXTERNAL
            inits.append(tensor)
            nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"h{i}"], f"mm{i}"))
            nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"], f"relu{i}"))
            current = f"r{i}"
        size = f.tell()
    graph = helper.make_graph(
        nodes,
        "large_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, [1, width if layers % 2 == 0 else width * expand])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, path)
    return size


def compress_command(source: Path, target: Path, *extra: str) -> list[str]:
    """``onnxpq compress SOURCE TARGET --no-validate --force EXTRA...`` as a child-process command."""
    return [
        sys.executable,
        "-m",
        "onnxpq.cli",
        "compress",
        str(source),
        str(target),
        "--no-validate",
        "--force",
        *extra,
    ]


def run_measured(command: list[str]) -> tuple[int, float, float]:
    """Exit code, wall seconds and peak RSS (MiB) of a child process."""
    start = time.perf_counter()
    child = subprocess.Popen(command)
    _, status, usage = os.wait4(child.pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_maxrss / 1024.0


#: The runs: every layer compressed (a small single-file output), and two thirds of the layers kept in
#: float, so the output itself is over 2 GB and its float weights are streamed to its data file.
SCENARIOS = {
    "every layer compressed": [],
    "8 of 12 layers kept in float (output > 2 GB)": ["--nodes-to-exclude", "^mm[0-7]$"],
}


def compress_measured(source: Path, target: Path, extra: list[str], iters: int, jobs: int) -> dict:
    """One ``onnxpq compress`` child process: its peak RSS, time and output."""
    command = compress_command(source, target, "--kmeans-iters", str(iters), "--jobs", str(jobs), *extra)
    code, seconds, peak = run_measured(command)
    if code != 0:
        raise SystemExit(f"onnxpq exited with {code}")
    report = json.loads(target.with_name(target.name + ".report.json").read_text())
    files = sorted(p for p in target.parent.iterdir() if p.name.startswith(target.name) and "report" not in p.name)
    row = {
        "compress_command": " ".join(["onnxpq", *command[3:]]).replace(str(source.parent) + "/", ""),
        "compressed_layers": sum(r["skip_reason"] is None for r in report["layers"]),
        "output_mib": report["files"]["compressed_bytes"] / 2**20,
        "ratio": report["files"]["ratio"],
        "output_files": [p.name for p in files],
        "compress_seconds": seconds,
        "peak_rss_mib": peak,
    }
    for path in files:
        path.unlink()
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--expand", type=int, default=4)
    parser.add_argument("--kmeans-iters", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "large")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    source, target = args.work / "large.onnx", args.work / "large_pq.onnx"
    start = time.perf_counter()
    data_bytes = make_model(source, args.layers, args.width, args.expand)
    layer_mib = args.width * args.width * args.expand * 4 / 2**20
    result = {
        "command": "python tools/bench_large.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "versions": versions(),
        "input_gib": (source.stat().st_size + data_bytes) / 2**30,
        "layers": args.layers,
        "largest_layer_mib": layer_mib,
        "make_seconds": time.perf_counter() - start,
        "bound_mib": 2048 + layer_mib,
        "runs": {},
    }
    try:
        for label, extra in SCENARIOS.items():
            row = compress_measured(source, target, extra, args.kmeans_iters, args.jobs)
            row["within_bound"] = row["peak_rss_mib"] <= result["bound_mib"]
            result["runs"][label] = row
            print(label, json.dumps(row), flush=True)
    finally:
        for path in args.work.iterdir():
            path.unlink()
    args.out.mkdir(exist_ok=True)
    (args.out / "large.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "LARGE.md").write_text(markdown(result))


def markdown(r: dict) -> str:
    lines = [
        "# A model over 2 GB in bounded memory",
        "",
        f"Generated by `{r['command']}` on {r['machine']} with "
        f"{', '.join(f'{k} {v}' for k, v in r['versions'].items())}.",
        "",
        f"The tool writes an MLP of {r['layers']} MatMul layers ({r['input_gib']:.2f} GiB of weights in external",
        f"data; each layer {r['largest_layer_mib']:.0f} MiB) and compresses it in a child process, reading the",
        f"child's peak RSS when it exits. Bound: 2 GiB plus one layer = {r['bound_mib']:.0f} MiB.",
        "",
        "| run | layers compressed | output | ratio | output files | compress s | peak RSS | within bound |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, row in r["runs"].items():
        lines.append(
            f"| {label} | {row['compressed_layers']} | {row['output_mib']:.1f} MiB | {row['ratio']:.1f}× | "
            f"{', '.join(row['output_files'])} | {row['compress_seconds']:.0f} | {row['peak_rss_mib']:.0f} MiB | "
            f"{'yes' if row['within_bound'] else 'NO'} |"
        )
    lines += ["", "Commands:", ""]
    lines += [f"- {label}: `{row['compress_command']}`" for label, row in r["runs"].items()]
    lines += [
        "",
        "Validation is off in these runs: it runs both models in onnxruntime, which holds the whole original.",
        "k-means runs 2 Lloyd iterations per layer here (each layer has 16.8 M subvectors of d=4) to keep the",
        "run short; the memory bound does not depend on the iteration count.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
