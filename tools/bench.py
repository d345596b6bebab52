"""Benchmarks on real models against the anchors a user would otherwise ship.

Appends every row to docs/results.jsonl (suite ``full``, or ``quick``) with its commit, and re-renders
docs/BENCHMARKS.md and the README's results table from that file (``tools/results.py``), and
docs/bench_rate.png (``--quick``: bench_rate_quick.png). One table per model: bits/weight (every float
parameter counted, PQF's accounting), file size and ratio, the task metrics, compression time, and the
deployment costs measured by onnxruntime in fresh processes (load time and peak RSS) and on a warm session
(latency), each as a ratio to fp32 measured in the same run.

Rows:
- anchors: fp32; onnxruntime ``quantize_dynamic`` int8 per channel; ``MatMulNBits``
  4-bit (block 32, where a model has constant MatMul weights); per-channel symmetric
  round-to-nearest at 4/3/2 bits (dense fake-quant: accuracy only, the file stays fp32);
  plain k-means product quantization at PQF's settings (d=9/4, k=256, data-free).
- onnxpq modes at each ``--targets`` bits/weight: data-free; data-free + permute;
  data-aware (the default with calibration data); data-aware + fine-tune (the
  data-aware model distilled for ``--finetune-time`` seconds; its time adds both).
  A budget the model cannot meet (too many parameters kept in float) is listed as such.

Models and data (calibration never overlaps evaluation) are those of bench_quantize.py,
except that PP-OCRv4 rec is scored on its recognizer alone (each line straight into RapidOCR's
recognizer, no detection), plus PP-OCRv4 det: calibrated on 64 rendered 320x480 pages of calibration words,
evaluated with RapidOCR on 6 rendered 600x800 pages of the evaluation lines (a line is
found when a detected box has IoU >= 0.5 with its ink box).

``--quick`` (about 25 minutes on 2 cores once the wheels and photos are cached) runs
every model with the anchors, plain k-means, the data-aware fixed layout, the defaults (the same size,
allocated) and ``--target-bpw 3``, on 128 calibration samples. ``--samples-curve`` runs the defaults
without data and with 16, 32, 64, 128 and 256 calibration samples (suite ``samples``).

Usage: python tools/bench.py [--quick] [--models mnist mobilenetv2 ppocr ppocr_det minilm]
       [--targets 1 1.5 2 3] [--finetune-time 120]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import results as results_store
from bench_quantize import (
    DATA_FREE,
    NO_VALIDATION,
    MiniLM,
    Mnist,
    MobileNet,
    PpOcrRec,
    Task,
    constants_to_initializers,
    int8_model,
    parameters,
    rapidocr_model,
    rtn_model,
)

from onnxpq import CompressConfig, compress
from onnxpq.calibration import load_dataset
from onnxpq.config import FinetuneConfig
from onnxpq.errors import ConfigError
from onnxpq.finetune.training import finetune
from onnxpq.model.files import load_model, save_model
from onnxpq.validate import measure_latency_ms, measure_load

ROOT = Path(__file__).resolve().parent.parent


class PpOcrRecLines(PpOcrRec):
    """PP-OCRv4 rec alone: RapidOCR's recognizer on each rendered line, without detection in front of it.

    40x faster than the full pipeline of bench_quantize.py, and it measures the recognizer only.
    """

    @staticmethod
    def read(engine, bgr: np.ndarray) -> str:
        result, _ = engine(bgr, use_det=False, use_cls=False, use_rec=True)
        return result[0][0].strip() if result else ""


class PpOcrDet(Task):
    """PP-OCRv4 text detection: line recall and precision on rendered pages."""

    name = "PP-OCRv4 det"

    def __init__(self, work: Path) -> None:
        from ocr_data import calibration_pages, eval_pages

        self.source = rapidocr_model("det")
        self.calibration = work / "pages_calib.npz"
        np.savez(self.calibration, x=calibration_pages())
        self.pages = eval_pages()

    def metrics(self, path: Path) -> dict[str, float]:
        from ocr_data import box_iou
        from rapidocr_onnxruntime import RapidOCR

        engine = RapidOCR(det_model_path=str(path))
        truth = found = detected = matched = 0
        ious = []
        for rgb, boxes in self.pages:
            quads, _ = engine(np.ascontiguousarray(rgb[:, :, ::-1]), use_det=True, use_cls=False, use_rec=False)
            dets = [(*np.min(q, axis=0), *np.max(q, axis=0)) for q in quads or []]
            best = [max((box_iou(g, d) for d in dets), default=0.0) for g in boxes]
            truth, detected = truth + len(boxes), detected + len(dets)
            found += sum(b >= 0.5 for b in best)
            matched += sum(max((box_iou(g, d) for g in boxes), default=0.0) >= 0.5 for d in dets)
            ious += best
        return {
            "recall": found / truth,
            "precision": matched / detected if detected else 0.0,
            "mean_iou": float(np.mean(ious)),
        }


TASKS: dict[str, Callable[[Path], Task]] = {
    "mnist": Mnist,
    "mobilenetv2": MobileNet,
    "ppocr": PpOcrRecLines,
    "ppocr_det": PpOcrDet,
    "minilm": MiniLM,
}


@dataclass(frozen=True)
class Costs:
    """Deployment costs of fp32, against which every row's ratios are taken."""

    file_bytes: int
    load_s: float
    peak_rss_mib: float


def matmul_nbits_model(src: Path, dst: Path) -> float | None:
    """onnxruntime's weight-only 4-bit ``MatMulNBits`` (block 32, symmetric); None when no MatMul qualifies."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = constants_to_initializers(onnx.load(str(src)))
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=True)
    quantizer.process()
    out = quantizer.model.model
    if not any(n.op_type == "MatMulNBits" for n in out.graph.node):
        return None
    onnx.save(out, str(dst))
    return dst.stat().st_size * 8 / parameters(src)


class Bench:
    """One model's rows, each with its metrics and its deployment costs next to fp32's."""

    def __init__(self, task: Task, work: Path, quick: bool, log: Callable[[dict], None]) -> None:
        self.task, self.work, self.quick, self.log = task, work, quick, log
        self.rows: list[dict] = []
        self.feed = {k: v[:1] for k, v in np.load(task.calibration).items()}
        self.repeats = 3 if quick else 5
        self.baseline = measure_load(task.source, repeats=self.repeats)
        self.fp32 = Costs(task.source.stat().st_size, self.baseline.load_s, self.baseline.peak_rss_mib)

    def add(self, method: str, path: Path | None, bpw: float | None, seconds: float, **extra) -> None:
        """Measure ``path`` (None: the budget was infeasible) and record the row."""
        row = {"method": method, "bpw_all": bpw, "seconds": seconds, **extra}
        if path is not None:
            # fp32 itself is the baseline: its ratios are 1 by definition (the noise shows between rows).
            load = self.baseline if path == self.task.source else measure_load(path, repeats=self.repeats)
            latency, base = measure_latency_ms([path, self.task.source], self.feed, min_seconds=0.5)
            size = path.stat().st_size
            row |= {
                "file_mib": size / 2**20,
                "ratio": self.fp32.file_bytes / size,
                **self.task.metrics(path),
                "load_ratio": load.load_s / self.fp32.load_s,
                "rss_ratio": load.peak_rss_mib / self.fp32.peak_rss_mib,
                "latency_ratio": latency / base,
            }
        self.rows.append(row)
        self.log(row)

    def anchors(self) -> None:
        src, work = self.task.source, self.work
        self.add("fp32", src, 32.0, 0.0)
        start = time.perf_counter()
        bpw = int8_model(src, work / "int8.onnx")
        self.add("onnxruntime quantize_dynamic int8 per-channel", work / "int8.onnx", bpw, time.perf_counter() - start)
        start = time.perf_counter()
        bpw = matmul_nbits_model(src, work / "nbits.onnx")
        if bpw is not None:
            self.add("onnxruntime MatMulNBits 4-bit, block 32", work / "nbits.onnx", bpw, time.perf_counter() - start)
        for bits in (4,) if self.quick else (4, 3, 2):
            bpw = rtn_model(src, work / f"rtn{bits}.onnx", bits)
            self.add(f"round-to-nearest {bits}-bit per channel (dense)", work / f"rtn{bits}.onnx", bpw, 0.0)

    def onnxpq(self, method: str, config: CompressConfig, data: bool, target: float | None = None) -> Path | None:
        """One ``compress()`` call as a user runs it; returns the output (None when the budget is infeasible)."""
        out = self.work / f"pq_{len(self.rows)}.onnx"
        start = time.perf_counter()
        try:
            result = compress(
                self.task.source,
                out,
                replace(config, target_bpw=target),
                calibration=self.task.calibration if data else None,
                validation=NO_VALIDATION,
                force=True,
            )
        except ConfigError as err:
            self.add(method, None, None, time.perf_counter() - start, target_bpw=target, infeasible=str(err))
            return None
        bpw = result.report["pqf"]["bits_per_weight_all_parameters"]
        self.add(method, out, bpw, time.perf_counter() - start, target_bpw=target)
        return out

    def finetuned(self, compressed: Path, samples: int, budget: float, target: float | None) -> None:
        """Distil the data-aware model: the pipeline's fine-tuning pass, on the same calibration samples."""
        seconds = self.rows[-1]["seconds"]
        original = load_model(self.task.source)
        dataset = load_dataset(self.task.calibration, original, max_samples=samples)
        start = time.perf_counter()
        tuned = finetune(original, load_model(compressed), dataset, FinetuneConfig(time_s=budget), seed=0)
        out = self.work / f"ft_{len(self.rows)}.onnx"
        save_model(tuned.model, out)
        bpw = self.rows[-1]["bpw_all"]
        self.add(
            "onnxpq data-aware + fine-tune",
            out,
            bpw,
            seconds + time.perf_counter() - start,
            target_bpw=target,
            finetune_steps=tuned.report["steps"],
            holdout_loss=[tuned.report["loss_start"], tuned.report["loss_exported"]],
        )


def run(bench: Bench, targets: list[float], finetune_time: float, samples: int) -> list[dict]:
    bench.anchors()
    bench.onnxpq("k-means PQ, PQF settings (d=9/4, k=256), data-free", DATA_FREE, False)
    data_aware = CompressConfig(calibration_samples=samples)
    if bench.quick:
        bench.onnxpq("onnxpq data-aware, fixed layout (--no-auto-budget)", replace(data_aware, auto_budget=False), True)
        bench.onnxpq("onnxpq data-aware (defaults)", data_aware, True)
        bench.onnxpq("onnxpq data-aware", data_aware, True, 3.0)
        return bench.rows
    for target in targets:
        bench.onnxpq("onnxpq data-free", CompressConfig(), False, target)
        bench.onnxpq("onnxpq data-free + permute", CompressConfig(permute=True), False, target)
        out = bench.onnxpq("onnxpq data-aware", data_aware, True, target)
        if out is not None:
            bench.finetuned(out, samples, finetune_time, target)
    return bench.rows


#: Calibration sample counts of the ``samples`` suite (issue 24: how few samples data-aware quantization needs).
SAMPLE_COUNTS = (16, 32, 64, 128, 256)


def samples_curve(bench: Bench) -> list[dict]:
    """The ``samples`` suite: the defaults without data, then with 16 ... 256 calibration samples (the first n of
    the same file), at the same size: what a handful of samples buys over none."""
    bench.add("fp32", bench.task.source, 32.0, 0.0)
    bench.onnxpq("onnxpq data-free (no samples)", CompressConfig(), False)
    for n in SAMPLE_COUNTS:
        bench.onnxpq(f"onnxpq data-aware (defaults), {n} samples", CompressConfig(calibration_samples=n), True)
    return bench.rows


def plot(results: dict[str, list[dict]], path: Path) -> None:
    """Rate-fidelity per model: the first task metric against bits/weight, one line per onnxpq mode
    (``results``: each task's current rows of one suite, from docs/results.jsonl)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(results))
    grid = -(-len(results) // cols)
    fig, axes = plt.subplots(grid, cols, figsize=(5.5 * cols, 4.5 * grid), squeeze=False)
    for ax in axes.ravel()[len(results) :]:
        ax.set_visible(False)
    for ax, (model, rows) in zip(axes.ravel(), results.items(), strict=False):
        metric = results_store._metric_keys(rows)[0]
        done = [r for r in rows if not r.get("infeasible") and r["method"] != "fp32"]
        for method in dict.fromkeys(r["method"] for r in done if r.get("target_bpw")):
            line = sorted((r for r in done if r["method"] == method), key=lambda r: r["bpw_all"])
            ax.plot([r["bpw_all"] for r in line], [r[metric] for r in line], "o-", label=method)
        for r in done:
            if not r.get("target_bpw"):
                ax.scatter([r["bpw_all"]], [r[metric]], marker="x")
                ax.annotate(r["method"][:30], (r["bpw_all"], r[metric]), fontsize=6)
        ax.axhline(rows[0][metric], color="gray", linestyle="--", label="fp32")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="bits/weight (all parameters)", ylabel=metric, title=model)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--quick", action="store_true", help="anchors, the defaults and --target-bpw 3 (about 25 min)")
    parser.add_argument(
        "--samples-curve", action="store_true", help="the defaults at 0, 16, ..., 256 calibration samples instead"
    )
    parser.add_argument("--targets", nargs="+", type=float, default=[1.0, 1.5, 2.0, 3.0])
    parser.add_argument("--finetune-time", type=float, default=120.0, help="seconds of distillation per budget")
    parser.add_argument("--calibration-samples", type=int, default=None, help="default 128 quick, 256 full")
    args = parser.parse_args(argv)
    samples = args.calibration_samples or (128 if args.quick else 256)
    suite = "samples" if args.samples_curve else "quick" if args.quick else "full"
    command = "python tools/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    origin = results_store.provenance(command.strip())

    def record(task: str):
        def write(row: dict) -> None:
            """Appended after every row, so a long run that stops early still leaves what it measured."""
            print(json.dumps(row), flush=True)
            results_store.append([{"suite": suite, "task": task, **row, **origin}])

        return write

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models:
            work = Path(tmp) / key
            work.mkdir()
            task = TASKS[key](work)
            bench = Bench(task, work, args.quick, record(task.name))
            if args.samples_curve:
                samples_curve(bench)
            else:
                run(bench, args.targets, args.finetune_time, samples)
    results_store.main([])
    shown = [r for r in results_store.current(results_store.load()) if r["suite"] == suite]
    by_task = {t: [r for r in shown if r["task"] == t] for t in dict.fromkeys(r["task"] for r in shown)}
    if suite != "samples":
        plot(by_task, ROOT / "docs" / f"bench_rate{'_quick' if args.quick else ''}.png")
    print(f"done in {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
