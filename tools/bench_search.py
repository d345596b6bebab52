"""Issue 24's budget search benchmark: ``--target-bpw auto`` against a hand sweep of ``--target-bpw B``.

For each model (MobileNetV2: 256 calibration photo crops, gated on the 66 held-out photo crops of
tools/photos.py; PP-OCRv4 rec: 256 rendered calibration lines, gated on the preprocessed evaluation
lines), with one gate (``--metric kl --max-degradation X``):

1. the hand sweep: ``onnxpq compress ... --target-bpw B`` for every B of ``--grid``, then every 0.1 between
   the largest failing and the smallest passing B of the grid, as a user finding the budget by hand would;
2. ``--target-bpw auto`` with the same gate.

Each run is a child process (wall time and peak RSS as in bench_speed.py), validation on the gate data,
``--no-measure`` (no load or latency probes, in every run alike). Rows go to docs/results.jsonl (suite
``search``): per run the budget, its degradation and gate verdict and the wall time; for the search also its
tries, the budget found and the task's own metrics on that model. ``tools/results.py`` renders them.

Run it with nothing else on the machine: the wall times are the point. To re-time the search beside the one
hand run it is compared with (the smallest passing budget), without the whole sweep:
``python tools/bench_search.py --models mobilenetv2 --grid 3.3 --no-fine``.

Usage: python tools/bench_search.py [--models mobilenetv2 ppocr] [--grid 1.5 2 2.5 3 3.5 4]
       [--max-degradation mobilenetv2=0.25 ppocr=0.15] [--skip-sweep] [--no-fine]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import results as results_store  # noqa: E402
from bench import TASKS  # noqa: E402
from bench_speed import run_measured  # noqa: E402

SAMPLES = 256
METRIC = "kl"
#: The gate of each model: mean KL (nats) between the class distributions on the held-out data.
#: PP-OCRv4 rec's KL on the evaluation lines is 0.107 at 3 bits/weight (character accuracy 0.996 there).
MAX_DEGRADATION = {"mobilenetv2": 0.25, "ppocr": 0.15}
#: Step of the hand sweep's second pass, between the grid's last failing and first passing budget.
FINE_STEP = 0.1


def gate_data(name: str, task, work: Path) -> Path:
    """The held-out samples the gate is judged on, as the model's input .npz."""
    path = work / "gate.npz"
    if name == "mobilenetv2":
        np.savez(path, input=task.x)
    else:
        from ocr_data import preprocess

        np.savez(path, x=preprocess([rgb for _, rgb in task.lines]))
    return path


def run(task, gate: Path, target: str, threshold: float, work: Path) -> dict:
    """One ``onnxpq compress`` at ``--target-bpw target`` with the gate; its row."""
    out = work / f"pq_{target}.onnx"
    report = work / f"pq_{target}.report.json"
    cmd = [
        *(sys.executable, "-m", "onnxpq.cli", "compress", str(task.source), str(out)),
        *("--calibration-data", str(task.calibration), "--calibration-samples", str(SAMPLES)),
        *("--target-bpw", target, "--validation-data", str(gate), "--metric", METRIC),
        *("--max-degradation", str(threshold), "--no-measure", "--force", "--report", str(report)),
    ]
    code, wall, peak = run_measured(cmd, work / "log.txt")
    row = {
        "target": target,
        "exit_code": code,
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(peak),
        "command": " ".join(["onnxpq", *cmd[3:]]).replace(str(work), "<work>"),
    }
    if code not in (0, 1):
        row["error"] = (work / "log.txt").read_text()[-400:]
        return row
    data = json.loads(report.read_text())
    outputs = data["validation"]["outputs"]
    row.update(
        bits_per_weight=round(data["pqf"]["bits_per_weight_all_parameters"], 3),
        degradation=round(max(o[METRIC] for o in outputs if o.get(METRIC) is not None), 5),
        passed=code == 0,
        seconds=data["seconds"],
    )
    if data.get("search"):
        row["tries"] = [
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in t.items()} for t in data["search"]["tries"]
        ]
        row["metrics"] = {k: round(v, 4) for k, v in task.metrics(out).items()}
    return row


def sweep(task, gate: Path, threshold: float, grid: list[float], work: Path, log, fine: bool) -> list[dict]:
    """The hand sweep: the grid, then (``fine``) the 0.1 steps between its last failing and first passing budget."""
    rows = {b: log(run(task, gate, f"{b:g}", threshold, work)) for b in grid}
    passing = [b for b in grid if rows[b].get("passed")]
    if passing and fine:
        first = min(passing)
        below = max((b for b in grid if b < first), default=None)
        if below is not None:
            for b in np.arange(below + FINE_STEP, first - 1e-9, FINE_STEP):
                rows[round(float(b), 3)] = log(run(task, gate, f"{b:.1f}", threshold, work))
    return list(rows.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenetv2", "ppocr"], choices=sorted(MAX_DEGRADATION))
    parser.add_argument("--grid", nargs="+", type=float, default=[1.5, 2.0, 2.5, 3.0, 3.5, 4.0])
    parser.add_argument("--max-degradation", nargs="+", default=[], metavar="MODEL=X")
    parser.add_argument("--skip-sweep", action="store_true", help="run only the search")
    parser.add_argument(
        "--no-fine", dest="fine", action="store_false", help="the grid only (to re-time one hand run beside the search)"
    )
    args = parser.parse_args(argv)
    gates = {**MAX_DEGRADATION, **{k: float(v) for k, v in (x.split("=") for x in args.max_degradation)}}
    origin = results_store.provenance(("python tools/bench_search.py " + " ".join(argv or sys.argv[1:])).strip())
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            task = TASKS[name](work)
            gate = gate_data(name, task, work)

            def log(row: dict, task=task, name=name) -> dict:
                method = "onnxpq --target-bpw auto" if row["target"] == "auto" else "hand sweep --target-bpw B"
                target = None if row["target"] == "auto" else float(row["target"])
                record = {"suite": "search", "task": task.name, "method": method, "target_bpw": target}
                extra = {"metric": METRIC, "max_degradation": gates[name], "samples": SAMPLES}
                measured = {k: v for k, v in row.items() if k != "command"}
                results_store.append([{**record, **extra, **measured, **origin}])
                print(json.dumps({k: v for k, v in row.items() if k not in ("tries", "command")}), flush=True)
                return row

            if not args.skip_sweep:
                sweep(task, gate, gates[name], args.grid, work, log, args.fine)
            log(run(task, gate, "auto", gates[name], work))
    results_store.main([])


if __name__ == "__main__":
    main()
