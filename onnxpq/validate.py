"""Compare the compressed model with the original in onnxruntime, and check the deployment claims.

Fidelity: per-output max-abs error, relative L2, cosine and (for class scores)
top-1 agreement and the KL divergence of the class distributions, optionally
accuracy against labels. Deployment: the decode chain must be folded by onnxruntime at load; load time and peak RSS are
measured in fresh processes, latency on a warm session.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from onnxpq.calibration import Dataset, batches, run_session
from onnxpq.errors import ConfigError
from onnxpq.model.graph import constant_foldable_nodes
from onnxpq.model.session import session

__all__ = [
    "METRICS",
    "STATUS_FILE",
    "Gate",
    "LoadStats",
    "OutputMetrics",
    "check_gate",
    "compare_models",
    "compare_outputs",
    "decode_nodes_left",
    "default_metric",
    "degradation",
    "file_bytes",
    "kl_divergence",
    "measure_latency_ms",
    "measure_load",
    "same_fusions",
    "validate_compressed",
]

#: Gate metrics and how each one turns into a degradation (higher is worse).
METRICS = ("top1", "kl", "cosine", "rel_l2", "max_abs", "accuracy")
#: How far the last axis of an output may sum from 1 and still be read as probabilities (a softmax output)
#: rather than logits; float32 softmax over a thousand classes sums to 1 within about 1e-6.
PROBABILITY_SUM_TOLERANCE = 1e-3
#: Floor for a probability under the logarithm: a class the compressed model rounds to exactly 0.
_PROBABILITY_FLOOR = 1e-12


@dataclass(frozen=True)
class OutputMetrics:
    """How one output of the compressed model differs from the original's over all samples."""

    name: str
    max_abs: float
    rel_l2: float
    cosine: float
    top1_agreement: float | None
    kl: float | None = None
    accuracy_original: float | None = None
    accuracy_compressed: float | None = None
    nonfinite_original: int = 0
    nonfinite_mismatch: int = 0


@dataclass(frozen=True)
class LoadStats:
    """Cold-start cost of a model in a fresh process (medians over repeats)."""

    load_s: float
    peak_rss_mib: float
    rss_after_load_mib: float
    rss_source: str = "proc"


def _looks_like_logits(out: np.ndarray) -> bool:
    """Class scores: float, at least (samples, classes), more than one class."""
    return np.issubdtype(out.dtype, np.floating) and out.ndim >= 2 and out.shape[-1] > 1


def _are_probabilities(scores: np.ndarray) -> bool:
    """Whether class scores already are probabilities (a softmax output): non-negative, summing to 1."""
    return bool(scores.min() >= 0) and bool(np.all(np.abs(scores.sum(axis=-1) - 1) <= PROBABILITY_SUM_TOLERANCE))


def _distribution(scores: np.ndarray, probabilities: bool) -> np.ndarray:
    """Class probabilities along the last axis, float64: the scores themselves when they are probabilities,
    else their softmax."""
    scores = scores.astype(np.float64)
    if probabilities:
        return scores
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def kl_divergence(ref: np.ndarray, test: np.ndarray) -> float:
    """Mean over positions of KL(original || compressed) between the class distributions of two score
    arrays (nats); positions where either model is not finite are left out. Whether the scores are
    probabilities is decided once, from the original: both outputs are then read the same way."""
    probabilities = _are_probabilities(ref[np.isfinite(ref).all(axis=-1)])
    p, q = _distribution(ref, probabilities), _distribution(test, probabilities)
    finite = np.isfinite(p).all(axis=-1) & np.isfinite(q).all(axis=-1)
    p, q = p[finite], np.maximum(q[finite], _PROBABILITY_FLOOR)
    if not p.size:
        return 0.0
    terms = np.where(p > 0, p * (np.log(np.maximum(p, _PROBABILITY_FLOOR)) - np.log(q)), 0.0)
    return float(np.mean(terms.sum(axis=-1)))


def output_metrics(name: str, ref: np.ndarray, test: np.ndarray, labels: np.ndarray | None) -> OutputMetrics:
    """Errors over the values both models give finitely; a model that already outputs NaN or Inf would
    otherwise turn every metric into NaN. Values finite in one model and not the other are counted."""
    ref64, test64 = ref.astype(np.float64).ravel(), test.astype(np.float64).ravel()
    finite_ref, finite_test = np.isfinite(ref64), np.isfinite(test64)
    same_nonfinite = ~finite_ref & ~finite_test & ((ref64 == test64) | (np.isnan(ref64) & np.isnan(test64)))
    mismatch = int(np.sum(~(finite_ref & finite_test) & ~same_nonfinite))
    both = finite_ref & finite_test
    ref64, test64 = ref64[both], test64[both]
    diff = ref64 - test64
    ref_norm = float(np.linalg.norm(ref64))
    denom = ref_norm * float(np.linalg.norm(test64))
    cosine = float(ref64 @ test64 / denom) if denom > 0 else float(np.array_equal(ref64, test64))
    top1 = kl = acc_ref = acc_test = None
    if _looks_like_logits(ref):
        ref_top, test_top = ref.argmax(-1), test.argmax(-1)
        top1 = float(np.mean(ref_top == test_top))
        kl = kl_divergence(ref, test)
        if labels is not None:
            if labels.shape != ref_top.shape:
                raise ConfigError(
                    f"labels of shape {labels.shape} do not match output {name!r} predictions {ref_top.shape}"
                )
            acc_ref, acc_test = float(np.mean(ref_top == labels)), float(np.mean(test_top == labels))
    return OutputMetrics(
        name=name,
        max_abs=float(np.max(np.abs(diff))) if diff.size else 0.0,
        rel_l2=float(np.linalg.norm(diff) / ref_norm) if ref_norm > 0 else float(np.linalg.norm(diff)),
        cosine=cosine,
        top1_agreement=top1,
        kl=kl,
        accuracy_original=acc_ref,
        accuracy_compressed=acc_test,
        nonfinite_original=int(np.sum(~finite_ref)),
        nonfinite_mismatch=mismatch,
    )


def compare_models(
    original: str | os.PathLike[str],
    compressed: str | os.PathLike[str],
    dataset: Dataset,
    model: onnx.ModelProto,
    *,
    labels: np.ndarray | None = None,
) -> list[OutputMetrics]:
    """Run both models on the dataset and measure each output's difference.

    ``model`` is the original's graph (weights not needed): it gives the input specs and output names.
    """
    ref = run_session(session(original), dataset, model)
    test = run_session(session(compressed), dataset, model)
    return compare_outputs(model, ref, test, labels)


def compare_outputs(
    model: onnx.ModelProto, ref: Sequence[np.ndarray], test: Sequence[np.ndarray], labels: np.ndarray | None
) -> list[OutputMetrics]:
    """Each output's difference; ``labels`` score the first output that holds class scores."""
    names = [o.name for o in model.graph.output]
    first_logits = next((i for i, r in enumerate(ref) if _looks_like_logits(r)), None)
    return [
        output_metrics(n, r, t, labels if i == first_logits else None)
        for i, (n, r, t) in enumerate(zip(names, ref, test, strict=True))
    ]


class Gate:
    """The accuracy gate on fixed validation samples, for judging many compressed models (a budget search):
    the original's outputs are computed once, each compressed model costs one onnxruntime run."""

    def __init__(
        self,
        original: str | os.PathLike[str] | bytes,
        model: onnx.ModelProto,
        data: tuple[Dataset, np.ndarray | None],
        metric: str | None,
        max_degradation: float,
    ) -> None:
        self.model, (self.dataset, self.labels) = model, data
        self.reference = run_session(session(original), self.dataset, model)
        same = to_json(compare_outputs(model, self.reference, self.reference, self.labels))
        self.metric = metric or default_metric(same)
        self.max_degradation = max_degradation
        check_gate(same, self.metric, max_degradation)  # the metric applies to some output, or a ConfigError

    def degradation(self, compressed: bytes) -> float:
        """The worst degradation over the outputs the metric applies to (infinite when a value turns NaN/Inf)."""
        test = run_session(session(compressed), self.dataset, self.model)
        outputs = to_json(compare_outputs(self.model, self.reference, test, self.labels))
        if any(o["nonfinite_mismatch"] for o in outputs):
            return math.inf
        return max(d for _, d in _applicable(outputs, self.metric))


def degradation(output: Mapping[str, Any], metric: str) -> float | None:
    """Loss of one output on ``metric`` as a number where higher is worse; None when it does not apply."""
    if metric == "top1":
        agreement = output["top1_agreement"]
        return None if agreement is None else 1.0 - agreement
    if metric == "kl":
        return output.get("kl")
    if metric == "cosine":
        return 1.0 - output["cosine"]
    if metric == "accuracy":
        if output["accuracy_original"] is None:
            return None
        return output["accuracy_original"] - output["accuracy_compressed"]
    return float(output[metric])


def _applicable(outputs: Sequence[Mapping[str, Any]], metric: str) -> list[tuple[Mapping[str, Any], float]]:
    """Each output the metric applies to, with its degradation; a ``ConfigError`` when there is none."""
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    applicable = [(o, d) for o in outputs if (d := degradation(o, metric)) is not None]
    if not applicable:
        raise ConfigError(
            f"metric {metric!r} applies to no output of this model (top1, kl and accuracy need class scores, "
            "accuracy also --labels)"
        )
    return applicable


def check_gate(outputs: Sequence[Mapping[str, Any]], metric: str, max_degradation: float) -> str | None:
    """None when every output is within the gate, else a message naming the failing output and value."""
    applicable = _applicable(outputs, metric)
    for output in outputs:
        if output.get("nonfinite_mismatch"):
            return (
                f"accuracy gate failed: output {output['name']!r} has {output['nonfinite_mismatch']} NaN/Inf "
                "value(s) where the original's are finite (or the reverse)"
            )
    for output, value in applicable:
        if value > max_degradation:
            return (
                f"accuracy gate failed: output {output['name']!r} {metric} degradation {value:.6g} > "
                f"--max-degradation {max_degradation:g}"
            )
    return None


def _optimized_graph(model: str | os.PathLike[str] | bytes, level: ort.GraphOptimizationLevel) -> onnx.GraphProto:
    """The graph onnxruntime runs at ``level``, as it writes it to ``optimized_model_filepath`` (weights left out,
    and never packed: only the graph is read)."""
    with tempfile.TemporaryDirectory(prefix="onnxpq-optimized-") as tmp:
        out = os.path.join(tmp, "optimized.onnx")
        session(model, level=level, optimized_path=out, prepack=False)
        return onnx.load(out, load_external_data=False).graph


def decode_nodes_left(path: str | os.PathLike[str], decode_nodes: Sequence[str]) -> list[str]:
    """Names of onnxpq decode nodes that survive onnxruntime's basic optimisation (should be none).

    A folded decode chain is gone from the graph ORT runs, replaced by a plain initializer.
    """
    wanted = set(decode_nodes)
    graph = _optimized_graph(path, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    return sorted(n.name for n in graph.node if n.name in wanted)


def same_fusions(original: str | os.PathLike[str] | bytes, compressed: bytes, extra: Collection[str]) -> bool:
    """Whether onnxruntime's extended optimisations (fusions) leave the compressed model, its ``extra`` nodes
    aside, the operator types of the original and no more nodes of any type; False when a session fails.

    An embedding lookup followed by a Reshape (``encode``'s row lookups) no longer matches fusions
    that start at the lookup, as onnxruntime's EmbedLayerNormalization (Gather -> Add ->
    LayerNormalization) in BERT graphs with an Attention node: those would run unfused, as more
    Gather, Add and LayerNormalization nodes. Fewer nodes are fine: two lookups of one table whose
    outputs were graph outputs become one when a Reshape follows each (common subexpressions).
    """
    level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    try:
        before = Counter(n.op_type for n in _optimized_graph(original, level).node)
        after = Counter(n.op_type for n in _optimized_graph(compressed, level).node if n.name not in extra)
    except Exception:  # onnxruntime raises its own exception types, not a common base
        return False
    return set(before) == set(after) and all(after[op] <= before[op] for op in after)


#: Where the probe reads its peak and current RSS; only Linux has it (tests point it elsewhere).
STATUS_FILE = "/proc/self/status"

_LOAD_PROBE = """
import json, sys, time
import onnxruntime as ort

def status(key):
    with open(sys.argv[2]) as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))

def rusage_peak():
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB elsewhere

try:  # Linux: reset the high-water mark so the peak is the load's, not the imports'.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
opts = ort.SessionOptions(); opts.log_severity_level = 3
t0 = time.perf_counter()
sess = ort.InferenceSession(sys.argv[1], opts, providers=["CPUExecutionProvider"])
t1 = time.perf_counter()
try:
    peak, rss, source = status("VmHWM:"), status("VmRSS:"), "proc"
except (OSError, StopIteration, ValueError, IndexError):
    peak = rss = rusage_peak()
    source = "getrusage"
print(json.dumps({"load_s": t1 - t0, "peak_rss_kib": peak, "rss_kib": rss, "source": source}))
"""


def measure_load(path: str | os.PathLike[str], repeats: int = 3) -> LoadStats:
    """Session creation time and peak RSS during it, each in a fresh interpreter (so caches do not help).

    The peak includes the interpreter and onnxruntime themselves, as a deployed process would.
    Without ``/proc`` (macOS, BSD) the peak is ``getrusage``'s, which also counts the imports and
    stands for the RSS after load too (``rss_source`` says which). Raises ``RuntimeError`` with the
    reason when the probe cannot run or the platform reports no memory use at all (Windows).
    """
    runs = []
    for _ in range(repeats):
        try:
            done = subprocess.run(
                [sys.executable, "-c", _LOAD_PROBE, str(path), STATUS_FILE], capture_output=True, text=True, check=True
            )
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        except (OSError, subprocess.CalledProcessError, ValueError, IndexError) as err:
            raise RuntimeError(f"the load probe failed: {' '.join(str(err).split())[:200]}") from None
        if runs[-1]["peak_rss_kib"] is None:
            raise RuntimeError("this platform reports no memory use (no /proc, no getrusage)")
    return LoadStats(
        load_s=statistics.median(r["load_s"] for r in runs),
        peak_rss_mib=statistics.median(r["peak_rss_kib"] for r in runs) / 1024.0,
        rss_after_load_mib=statistics.median(r["rss_kib"] for r in runs) / 1024.0,
        rss_source=runs[0]["source"],
    )


def measure_latency_ms(
    paths: Sequence[str | os.PathLike[str]],
    feed: dict[str, np.ndarray],
    *,
    warmup: int = 5,
    min_runs: int = 30,
    min_seconds: float = 1.0,
) -> list[float]:
    """Median wall time (ms) of one warm ``run`` per model, runs interleaved so machine noise hits all alike.

    Runs at least ``min_runs`` times and ``min_seconds`` in all, so sub-millisecond models get enough samples.
    """
    sessions = [session(p) for p in paths]
    for sess in sessions:
        for _ in range(warmup):
            sess.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    while len(times[0]) < min_runs or time.perf_counter() - start < min_seconds:
        for sess, record in zip(sessions, times, strict=True):
            t0 = time.perf_counter()
            sess.run(None, feed)
            record.append(time.perf_counter() - t0)
    return [1000.0 * statistics.median(t) for t in times]


def to_json(items: Sequence[OutputMetrics] | LoadStats) -> object:
    return [asdict(m) for m in items] if isinstance(items, Sequence) else asdict(items)


def file_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes on disk of a model and the external data files it references."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    total = path.stat().st_size
    seen = set()
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                total += (path.parent / entry.value).stat().st_size
    return total


def validate_compressed(
    original: str | os.PathLike[str],
    compressed: str | os.PathLike[str],
    dataset: Dataset,
    *,
    labels: np.ndarray | None = None,
    measure: bool = True,
    reference: onnx.ModelProto | None = None,
) -> dict[str, object]:
    """The report's validation section: fidelity, decode folding, load cost and latency.

    ``reference``: the original's graph when the caller holds it (inputs and outputs are all that is read);
    loading it again held a second copy of every weight while both sessions ran.
    """
    reference = reference if reference is not None else onnx.load(str(original), load_external_data=False)
    metrics = compare_models(original, compressed, dataset, reference, labels=labels)
    graph = onnx.load(str(compressed), load_external_data=False).graph
    decode = [n.name for n in constant_foldable_nodes(graph) if n.name]
    left = decode_nodes_left(compressed, decode)
    section: dict[str, object] = {
        "inputs": "synthetic" if dataset.source == "random" else "file",
        "source": dataset.source,
        "n_samples": dataset.n_samples,
        "sha256": dataset.sha256(),
        "outputs": to_json(metrics),
        "decode_folded": not left,
        "unfolded_nodes": left,
    }
    if measure:
        try:
            base, comp = measure_load(original), measure_load(compressed)
        except RuntimeError as err:  # a measurement is not worth failing a run for; the report says why
            section["load_skipped"] = str(err)
        else:
            section["load"] = {
                "original": to_json(base),
                "compressed": to_json(comp),
                "rss_ratio": comp.peak_rss_mib / base.peak_rss_mib,
            }
        feed = next(batches(dataset, reference, batch_size=1))
        lat_o, lat_c = measure_latency_ms([original, compressed], feed)
        section["latency_ms"] = {"original": lat_o, "compressed": lat_c, "ratio": lat_c / lat_o}
    return section


def default_metric(outputs: Sequence[dict[str, object]]) -> str:
    """top1 when an output holds class scores, cosine otherwise (embeddings, feature maps)."""
    return "top1" if any(o["top1_agreement"] is not None for o in outputs) else "cosine"
