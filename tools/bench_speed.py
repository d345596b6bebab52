"""Issue 21's speed benchmark: data-aware ``--target-bpw`` compression, end to end, with its fidelity.

For each model (MobileNetV2 on calibration photo crops, PP-OCRv4 rec on rendered lines,
all-MiniLM-L6-v2 on sentences, MNIST), runs ``onnxpq compress SRC OUT --calibration-data ...
--calibration-samples 256 --target-bpw B --no-validate`` as a child process and records its wall
time, the per-stage seconds of its report, the peak of the summed RSS of the child and its
worker processes (sampled from /proc every 0.2 s), the peak RSS of an onnxruntime session of the
original (``measure_load``), and the task's fidelity metrics on held-out data (those of
tools/bench.py). Each row is appended to docs/results.jsonl (suite ``speed``, rendered into
docs/BENCHMARKS.md and the README by ``tools/results.py``) and merged into docs/speed.json by (model, target,
jobs, label), the history rendered into docs/SPEED.md, each with the commit that produced it.

Run it with nothing else on the machine: the wall times are the point. To measure another commit,
check its ``onnxpq/`` out into this tree (the row records the commit of the code it imported): with
onnxpq installed editable, as the README installs it, the editable finder takes precedence over
``PYTHONPATH``, so pointing that at a worktree measures this tree's code.

Usage: python tools/bench_speed.py [--models mobilenetv2 ppocr minilm] [--target-bpw 3]
       [--samples 256] [--jobs auto] [--label LABEL]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import results as results_store  # noqa: E402
from bench import TASKS  # noqa: E402
from processes import TreePeak  # noqa: E402

import onnxpq  # noqa: E402
from onnxpq.validate import measure_load  # noqa: E402

RESULTS = ROOT / "docs" / "speed.json"
#: The method name of the rows in docs/results.jsonl.
SPEED_METHOD = "onnxpq compress --target-bpw, validation off"
PAGE = ROOT / "docs" / "SPEED.md"


def run_measured(cmd: list[str], log: Path) -> tuple[int, float, float]:
    """(exit code, wall seconds, peak summed RSS MiB of the process tree)."""
    with log.open("w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        with TreePeak(proc.pid) as peak:
            code = proc.wait()
            wall = time.perf_counter() - start
    return code, wall, peak.mib


def _commit() -> str:
    """The commit of the onnxpq being measured (``PYTHONPATH`` may point at another worktree), +dirty if edited."""
    code = Path(onnxpq.__file__).resolve().parent.parent
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=code, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "onnxpq"], cwd=code, capture_output=True, text=True)
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def measure(name: str, args: argparse.Namespace, work: Path) -> dict:
    task = TASKS[name](work)
    out, report = work / f"{name}_pq.onnx", work / f"{name}_pq.report.json"
    cmd = [
        *(sys.executable, "-m", "onnxpq.cli", "compress", str(task.source), str(out)),
        *("--calibration-data", str(task.calibration), "--calibration-samples", str(args.samples)),
        *("--target-bpw", str(args.target_bpw), "--jobs", args.jobs, "--no-validate", "--force"),
        *("--report", str(report)),
    ]
    code, wall, peak = run_measured(cmd, work / f"{name}.log")
    row = {
        "model": task.name,
        "target_bpw": args.target_bpw,
        "samples": args.samples,
        "jobs": args.jobs,
        "label": args.label,
        "commit": _commit(),
        "exit_code": code,
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(peak),
        "ort_session_peak_rss_mib": round(measure_load(task.source).peak_rss_mib),
        "command": " ".join(["onnxpq", *cmd[3:]]).replace(str(work), "<work>"),
    }
    if code != 0:
        row["error"] = (work / f"{name}.log").read_text()[-400:]
        return row
    data = json.loads(report.read_text())
    row["seconds"] = data.get("seconds", {})  # not in reports before 0.3.0
    row["bits_per_weight"] = round(data["pqf"]["bits_per_weight_all_parameters"], 3)
    row["metrics"] = {k: round(v, 4) for k, v in task.metrics(out).items()}
    return row


def note(row: dict) -> str:
    """A row's ``note`` (added by hand: what else ran, what the label means), in brackets."""
    return f" ({row['note']})" if row.get("note") else ""


def render(rows: list[dict]) -> str:
    lines = [
        "# Speed: data-aware `--target-bpw` compression, end to end",
        "",
        "Written by `python tools/bench_speed.py` (its docstring says how); every row records its commit.",
        "Wall time of the `onnxpq compress` process with validation off; peak RSS summed over it and its",
        "worker processes; the onnxruntime session column is the peak RSS of loading the original model",
        "in a fresh process. Fidelity on held-out data, as in BENCHMARKS.md.",
        "",
        "| model | target | samples | jobs | label | commit | wall s | stages (s) | peak RSS MiB | ORT session MiB "
        "| bits/weight | fidelity |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r.get("seconds", {}).items() if k != "total" and v >= 0.5)
        metrics = ", ".join(f"{k} {v}" for k, v in r.get("metrics", {}).items()) or r.get("error", "")[-80:]
        lines.append(
            f"| {r['model']} | {r['target_bpw']} | {r['samples']} | {r['jobs']} | {r['label']}{note(r)} "
            f"| {r['commit']} "
            f"| {r['wall_s']} | {stages} | {r['peak_rss_mib']} | {r['ort_session_peak_rss_mib']} "
            f"| {r.get('bits_per_weight', '')} | {metrics} |"
        )
    lines += ["", "Commands:", ""]
    lines += sorted({f"- `{r['command']}`" for r in rows})
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenetv2", "ppocr", "minilm"], choices=sorted(TASKS))
    parser.add_argument("--target-bpw", type=float, default=3.0)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--jobs", default="auto")
    parser.add_argument("--label", default="")
    args = parser.parse_args(argv)
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    origin = results_store.provenance(("python tools/bench_speed.py " + " ".join(argv or sys.argv[1:])).strip())
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            row = measure(name, args, Path(tmp))
        print(json.dumps(row))
        key = (row["model"], row["target_bpw"], row["jobs"], row["label"])
        rows = [r for r in rows if (r["model"], r["target_bpw"], r["jobs"], r["label"]) != key] + [row]
        RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
        PAGE.write_text(render(rows))
        speed = {k: v for k, v in row.items() if k not in ("model", "commit", "command")}
        results_store.append([{"suite": "speed", "task": row["model"], "method": SPEED_METHOD, **speed, **origin}])
    results_store.main([])


if __name__ == "__main__":
    main()
