"""Measure fine-tuning: each model before and after distillation at the same size, next to the int8 anchors.

Writes docs/FINETUNE.md and docs/finetune.json. Every onnxpq row is one
``compress()`` call, the way a user runs it; the fine-tuned row repeats the
quantization and adds distillation, and its seconds include both. No labels
are used anywhere: the teacher is the original model.

Data (calibration never overlaps evaluation; see bench_quantize.py for the evaluation sets):
- MNIST CNN: 1024 images of the MNIST validation split (not used to train the model).
- MobileNetV2: two views (centre crop, and a wider mirrored crop) of the 505 Debian calibration
  photos = 1010 images; evaluated on the 66 crops of the scikit-image/scikit-learn/matplotlib photos.
- PP-OCRv4 rec: 1024 rendered lines of random calibration words.

Usage: python tools/bench_finetune.py [--models mnist mobilenetv2 ppocr]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from bench_quantize import Mnist, MobileNet, PpOcrRec, Task, int8_model, rtn_model

from onnxpq import CompressConfig, compress
from onnxpq.config import FinetuneConfig
from onnxpq.pipeline import ValidationSettings
from onnxpq.report import versions

ROOT = Path(__file__).resolve().parent.parent
NO_VALIDATION = ValidationSettings(enabled=False)


@dataclass(frozen=True)
class Setting:
    """One model's compression settings and fine-tuning budget."""

    label: str
    config: CompressConfig
    finetune: FinetuneConfig


#: Per model, the settings compared before and after fine-tuning (default learning rate everywhere).
SETTINGS = {
    "mnist": [
        Setting(
            "large blocks, --target-bpw 1.3",
            CompressConfig(block_size="large", target_bpw=1.3, calibration_samples=1024),
            FinetuneConfig(time_s=120),
        )
    ],
    "mobilenetv2": [
        Setting("default small blocks", CompressConfig(calibration_samples=1024), FinetuneConfig(time_s=660)),
        Setting(
            "small blocks, --target-bpw 2.64 (same size)",
            CompressConfig(target_bpw=2.64, calibration_samples=1024),
            FinetuneConfig(time_s=660),
        ),
    ],
    "ppocr": [Setting("defaults", CompressConfig(calibration_samples=1024), FinetuneConfig(time_s=420))],
}


def _mnist(work: Path) -> Task:
    from wheels import load_mnist

    task = Mnist(work)
    task.calibration = work / "mnist_calib.npz"
    np.savez(task.calibration, input=load_mnist()["valid"][0][:1024])
    return task


def _mobilenet(work: Path) -> Task:
    from calibration_photos import calibration_crops

    task = MobileNet(work)
    np.savez(task.calibration, input=calibration_crops(views=2)[0])
    return task


def _ppocr(work: Path) -> Task:
    from ocr_data import calibration_lines

    task = PpOcrRec(work)
    np.savez(task.calibration, x=calibration_lines(1024))
    return task


TASKS = {"mnist": _mnist, "mobilenetv2": _mobilenet, "ppocr": _ppocr}


def _row(label: str, bpw: float, path: Path, seconds: float, metrics: dict[str, float], **extra) -> dict:
    return {
        "method": label,
        "bpw_all": bpw,
        "file_mib": path.stat().st_size / 2**20,
        "seconds": seconds,
        **metrics,
        **extra,
    }


def _onnxpq(task: Task, work: Path, label: str, config: CompressConfig) -> dict:
    out = work / "out.onnx"
    start = time.perf_counter()
    report = compress(task.source, out, config, calibration=task.calibration, validation=NO_VALIDATION, force=True)
    seconds = time.perf_counter() - start
    tuned = report.report["finetune"]
    extra = {}
    if tuned:
        extra = {
            "finetune_seconds": tuned["seconds"],
            "finetune_steps": tuned["steps"],
            "holdout_loss": [tuned["loss_start"], tuned["loss_exported"]],
        }
    bpw = report.report["pqf"]["bits_per_weight_all_parameters"]
    return _row(label, bpw, out, seconds, task.metrics(out), **extra)


def run_task(key: str, work: Path) -> list[dict]:
    task = TASKS[key](work)
    rows = [_row("fp32", 32.0, task.source, 0.0, task.metrics(task.source))]
    int8 = work / "int8.onnx"
    bpw = int8_model(task.source, int8)
    rows.append(_row("onnxruntime quantize_dynamic int8 per-channel", bpw, int8, 0.0, task.metrics(int8)))
    rtn = work / "rtn8.onnx"
    bpw = rtn_model(task.source, rtn, 8)
    rows.append(_row("round-to-nearest 8-bit per channel (dense)", bpw, rtn, 0.0, task.metrics(rtn)))
    for row in rows:
        print(json.dumps(row), flush=True)
    for setting in SETTINGS[key]:
        rows.append(_onnxpq(task, work, f"onnxpq {setting.label}, no fine-tuning", setting.config))
        print(json.dumps(rows[-1]), flush=True)
        tuned = replace(setting.config, finetune=setting.finetune)
        budget = f"{setting.finetune.time_s:.0f} s" if setting.finetune.time_s else f"{setting.finetune.steps} steps"
        rows.append(_onnxpq(task, work, f"onnxpq {setting.label} + fine-tuning ({budget})", tuned))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(results: dict[str, list[dict]], commands: dict[str, str]) -> str:
    fixed = ("method", "bpw_all", "file_mib", "seconds", "finetune_seconds", "finetune_steps", "holdout_loss")
    lines = [
        "# Fine-tuning: before and after distillation at the same size",
        "",
        f"Generated by `tools/bench_finetune.py` on {platform.machine()} ({os.cpu_count()} CPU cores, no GPU) with "
        f"{', '.join(f'{k} {v}' for k, v in versions().items())}; each model's command is under its title.",
        "",
        "No labels: the teacher is the original model. Seconds are the whole `compress()` call (statistics,",
        "quantization, fine-tuning); `holdout loss` is the distillation loss on the held-out calibration slice",
        "before and after (what picks the exported step). Bits/weight count every parameter (PQF's accounting).",
    ]
    for model, rows in results.items():
        keys = [k for k in rows[0] if k not in fixed]
        lines += ["", f"## {model}", "", f"`{commands.get(model, '')}`", ""]
        lines.append("| method | bits/weight | file MiB | " + " | ".join(keys) + " | seconds | steps | holdout loss |")
        lines.append("| --- " * (len(keys) + 6) + "|")
        for r in rows:
            values = " | ".join(f"{r[k]:.4f}" for k in keys)
            loss = " → ".join(f"{v:.4f}" for v in r["holdout_loss"]) if "holdout_loss" in r else ""
            lines.append(
                f"| {r['method']} | {r['bpw_all']:.3f} | {r['file_mib']:.3f} | {values} | {r['seconds']:.0f} | "
                f"{r.get('finetune_steps', '')} | {loss} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args(argv)
    command = ("python tools/bench_finetune.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    saved_path = args.out / "finetune.json"
    saved = json.loads(saved_path.read_text()) if saved_path.exists() else {}
    results, commands = saved.get("results", {}), saved.get("commands", {})
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models:
            rows = run_task(key, Path(tmp))
            name = {"mnist": Mnist.name, "mobilenetv2": MobileNet.name, "ppocr": PpOcrRec.name}[key]
            results[name], commands[name] = rows, command
            # Written after every model, so a long run that stops early still leaves its numbers.
            saved_path.write_text(json.dumps({"commands": commands, "results": results}, indent=2) + "\n")
            (args.out / "FINETUNE.md").write_text(markdown(results, commands))


if __name__ == "__main__":
    main()
