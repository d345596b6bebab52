"""Profile one data-aware ``--target-bpw`` compression under cProfile (issue 21's "profile first").

Builds the model and its calibration samples as the benchmarks do (MobileNetV2 on calibration
photo crops, PP-OCRv4 rec on rendered lines, all-MiniLM-L6-v2 on sentences, MNIST on training
digits), runs ``compress`` with validation off, and writes the wall time, the stage split from
the report and the top functions by cumulative time to ``docs/profile/<model>-<label>.md``.

Usage: python tools/profile_compress.py MODEL [--target-bpw 3] [--samples 256] [--label before]
       [--top 15] [--jobs N|auto]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from onnxpq import CompressConfig, compress  # noqa: E402
from onnxpq.parallel import Workers  # noqa: E402
from onnxpq.pipeline import ValidationSettings  # noqa: E402


def _task(name: str, work: Path):
    """The benchmark task ``name``: its ``source`` model and ``calibration`` file."""
    from bench import TASKS

    return TASKS[name](work)


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "onnxpq"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["mnist", "mobilenetv2", "ppocr", "minilm"])
    parser.add_argument("--target-bpw", type=float, default=3.0)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--label", default="run")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--jobs", type=lambda t: None if t == "auto" else int(t), default=None)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        task = _task(args.model, work)
        config = CompressConfig(target_bpw=args.target_bpw, calibration_samples=args.samples)
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        result = compress(
            task.source,
            work / "out.onnx",
            config,
            calibration=task.calibration,
            validation=ValidationSettings(enabled=False),
            workers=Workers(jobs=args.jobs),
            force=True,
        )
        profiler.disable()
        wall = time.perf_counter() - start
        bpw = round(result.report["pqf"]["bits_per_weight_all_parameters"], 3)
        stages = result.report.get("seconds", {})

    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(args.top)
    lines = [line for line in text.getvalue().splitlines() if line.strip()]
    table = lines[next(i for i, line in enumerate(lines) if "ncalls" in line) :]
    command = " ".join(["python", "tools/profile_compress.py", *(argv or sys.argv[1:])])
    out = ROOT / "docs" / "profile" / f"{args.model}-{args.label}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    body = [
        f"# Profile: {args.model}, --target-bpw {args.target_bpw}, {args.samples} samples ({args.label})",
        "",
        f"- command: `{command}`",
        f"- commit: {_commit()}; validation off; jobs {args.jobs or 'auto'}",
        f"- wall time under cProfile: {wall:.1f} s; bits/weight {bpw}",
        f"- stages (s): {', '.join(f'{k} {v:.1f}' for k, v in stages.items()) or 'not recorded by this version'}",
        "",
        f"Top {args.top} functions by cumulative time:",
        "",
        "```",
        *table,
        "```",
        "",
    ]
    out.write_text("\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
