"""The compression report: sizes in real bytes and in PQF's accounting, per-layer errors, validation.

One JSON document a machine can parse, and a table a person can read; both
come from the same ``dict`` so they never disagree.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime

from onnxpq.quantize.layer import LayerError
from onnxpq.quantize.selection import Candidate
from onnxpq.quantize.size import MIB, layer_bits
from onnxpq.version import __version__

__all__ = [
    "DATA_FREE_NOTE",
    "Report",
    "Stopwatch",
    "format_table",
    "layer_rows",
    "sha256_file",
    "validation_lines",
    "versions",
    "write_json",
    "write_text",
]


#: The warning of a run that quantized without calibration data, printed before the table, not after it: on
#: real models it costs most of the accuracy at these sizes (docs/BENCHMARKS.md, suites quick and samples).
DATA_FREE_NOTE = (
    "quantized without data (no --calibration-data): the codebooks fit the weights, not the outputs, which on "
    "real models costs most of their accuracy at these sizes, while a few dozen calibration samples recover most "
    "of it (docs/BENCHMARKS.md, suite samples); pass samples of the model's inputs with --calibration-data"
)


class Stopwatch:
    """Wall seconds per stage of one run, in the order the stages ran: the report's ``seconds`` section.

    Users asked where the minutes go (statistics, allocation, quantization ...); the
    report says it for every run instead of only under a profiler.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Add the time the ``with`` body takes to stage ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def section(self) -> dict[str, float]:
        """Each stage's seconds, rounded to milliseconds, and the run's ``total`` so far."""
        total = time.perf_counter() - self._start
        return {**{k: round(v, 3) for k, v in self.seconds.items()}, "total": round(total, 3)}


@dataclass
class Report:
    """A compression's report, section by section, in the order of its JSON document (``to_json``; the keys
    are the field names). The sections' contents are plain JSON values made by the stages that know them:
    ``pqf`` by ``quantize.size``, ``layers`` by ``layer_rows``, ``validation`` by ``validate``."""

    versions: dict[str, str]
    config: dict[str, Any]
    input: dict[str, Any]
    output: dict[str, Any]
    files: dict[str, Any]
    pqf: dict[str, Any]
    calibration: dict[str, Any] | None
    permutation: dict[str, Any] | None
    bias_corrected: list[str]
    allocation: dict[str, Any] | None
    search: dict[str, Any] | None
    finetune: dict[str, Any] | None
    layers: list[dict[str, Any]]
    selection: dict[str, Any]
    subgraph_weights_left: int
    validation: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON document: one key per field, in field order (the sections are already JSON values)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def gate_failure(self) -> str | None:
        """Why the accuracy gate failed, or None (no gate, or it passed)."""
        return ((self.validation or {}).get("gate") or {}).get("failure")


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    return {
        "onnxpq": __version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def layer_rows(candidates: Sequence[Candidate], errors: Mapping[str, LayerError]) -> list[dict[str, Any]]:
    """One row per candidate weight, compressed ones worst-first by SQNR, then the ones kept in float."""
    rows = []
    for c in candidates:
        err = errors.get(c.name)
        rows.append(
            {
                "weight": c.name,
                "nodes": list(c.node_names),
                "op_type": c.kind,
                "shape": list(c.shape),
                "elements": c.size,
                "k": c.n_codewords or None,
                "d": c.subvector_dim or None,
                "bytes_pqf": layer_bits(c) / 8 if c.compressed else 4 * c.size,
                "sqnr_db": None if err is None else _finite(err.sqnr_db),
                "rel_l2": None if err is None else _finite(err.rel_l2),
                "output_sqnr_db": _output_sqnr(err),
                "statistics": None if err is None else err.statistics,
                "skip_reason": c.skip_reason,
            }
        )
    done = sorted((r for r in rows if r["skip_reason"] is None), key=_badness)
    return done + [r for r in rows if r["skip_reason"] is not None]


def _output_sqnr(err: LayerError | None) -> float | str | None:
    """The layer's output SQNR on the calibration data, in dB: what a worst-first table should sort by."""
    if err is None or err.output_rel is None:
        return None
    return _finite(float("inf") if err.output_rel <= 0 else -10.0 * math.log10(err.output_rel))


def _badness(row: Mapping[str, Any]) -> float:
    """Sort key, worst first: output SQNR when the layer had data, else weight SQNR."""
    value = row["output_sqnr_db"] if row["output_sqnr_db"] is not None else row["sqnr_db"]
    return float(value) if value is not None else 0.0


def _finite(x: float) -> float | str:
    """JSON has no inf; write it as a string a reader can still parse with float()."""
    return x if math.isfinite(x) else str(x)


def write_json(report: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write the report atomically (``write_text``).

    JSON has no NaN or Infinity: non-finite numbers are written as strings (``"nan"``,
    ``"inf"``), as ``_finite`` does, so any JSON parser reads the report.
    """
    write_text(json.dumps(_json_safe(report), indent=2, sort_keys=False, allow_nan=False) + "\n", path)


def write_text(text: str, path: str | os.PathLike[str]) -> None:
    """Write ``text`` atomically: a temp file unique to this run beside ``path``, then a rename, so a reader never
    sees half a file and a failure leaves the old one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:64]}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); a report is as readable as any file the user writes.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process's umask (reading it means setting it: restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (Python or numpy) replaced by its string form."""
    if isinstance(value, float | np.floating):
        return _finite(float(value))
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _fmt(x: Any, spec: str = ".2f") -> str:
    if x is None:
        return "-"
    return format(x, spec) if isinstance(x, float) else str(x)


def _size_lines(r: Mapping[str, Any]) -> list[str]:
    files, pqf = r["files"], r["pqf"]
    return [
        f"original     {files['original_bytes'] / MIB:9.3f} MiB on disk",
        f"compressed   {files['compressed_bytes'] / MIB:9.3f} MiB on disk   ratio {files['ratio']:.1f}x",
        f"PQF size     {pqf['original_mib']:.3f} -> {pqf['compressed_mib']:.3f} MiB   ratio {pqf['ratio']:.1f}x",
        f"bits/weight  {pqf['bits_per_weight_compressed_layers']:.3f} on compressed layers, "
        f"{pqf['bits_per_weight_all_parameters']:.3f} over all {pqf['parameters']} parameters "
        f"({100 * pqf['compressible_fraction']:.1f}% compressed)",
    ]


def _layer_lines(rows: Sequence[Mapping[str, Any]], limit: int) -> list[str]:
    head = f"{'weight':40} {'op':13} {'shape':>20} {'k':>4} {'d':>3} {'KiB':>9} {'SQNR dB':>8} {'out dB':>7}  note"
    lines = [head]
    for row in rows[:limit]:
        shape = "x".join(str(s) for s in row["shape"])
        sqnr = row["sqnr_db"] if isinstance(row["sqnr_db"], float) else None
        out = row["output_sqnr_db"] if isinstance(row["output_sqnr_db"], float) else None
        lines.append(
            f"{row['weight'][:40]:40} {row['op_type'][:13]:13} {shape:>20} {_fmt(row['k']):>4} {_fmt(row['d']):>3} "
            f"{row['bytes_pqf'] / 1024:9.1f} {_fmt(sqnr, '.1f'):>8} {_fmt(out, '.1f'):>7}  {row['skip_reason'] or ''}"
        )
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more rows in the JSON report")
    return lines


def validation_lines(v: Mapping[str, Any]) -> list[str]:
    lines = [f"validation on {v['n_samples']} {v['inputs']} samples"]
    for m in v["outputs"]:
        line = f"  {m['name']}: max_abs {m['max_abs']:.4g}  rel_l2 {m['rel_l2']:.4g}  cosine {m['cosine']:.6f}"
        if m["top1_agreement"] is not None:
            line += f"  top1 agreement {m['top1_agreement']:.4f}"
        if m.get("kl") is not None:
            line += f"  KL {m['kl']:.4g}"
        if m["accuracy_original"] is not None:
            line += f"  accuracy {m['accuracy_original']:.4f} -> {m['accuracy_compressed']:.4f}"
        lines.append(line)
    if "decode_folded" in v:
        lines.append(f"  decode folded by onnxruntime at load: {'yes' if v['decode_folded'] else 'NO'}")
    if "load" in v:
        o, c = v["load"]["original"], v["load"]["compressed"]
        lines.append(
            f"  load {o['load_s'] * 1000:.0f} -> {c['load_s'] * 1000:.0f} ms, peak RSS "
            f"{o['peak_rss_mib']:.0f} -> {c['peak_rss_mib']:.0f} MiB ({v['load']['rss_ratio']:.2f}x)"
        )
    if "latency_ms" in v:
        lat = v["latency_ms"]
        lines.append(f"  latency {lat['original']:.3f} -> {lat['compressed']:.3f} ms ({lat['ratio']:.2f}x)")
    if v.get("gate"):
        lines.append(f"  gate: {v['gate']}")
    return lines


def _pattern_lines(patterns: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per node pattern with the nodes it matched, so a pattern that caught more than meant shows."""
    return [
        f"--{p['option'].replace('_', '-')} {p['pattern']!r}: {p['matched']} node(s) matched "
        f"({'exact name' if p['exact'] else 'regex search'})"
        for p in patterns
    ]


def _search_line(search: Mapping[str, Any]) -> str:
    """The budget search in one line (each try was printed as it ran; the JSON keeps them all)."""
    finals = sum(t["kind"] == "final" for t in search["tries"])
    found = search["winner_bits_per_weight"]
    head = f"{found:.3f} bits/weight passes" if found is not None else "no budget passes"
    return (
        f"budget search ({search['metric']} <= {search['max_degradation']:g}): {head}; "
        f"{len(search['tries']) - finals} estimate and {finals} final tries"
    )


def format_table(report: Mapping[str, Any], *, max_layers: int = 25) -> str:
    """The human summary printed after a run; a data-free run says so first (``DATA_FREE_NOTE``)."""
    warnings = report["warnings"]
    lines = [f"onnxpq {report['versions']['onnxpq']}: {report['input']['path']} -> {report['output']['path']}"]
    lines += [f"WARNING: {w}" for w in warnings if w == DATA_FREE_NOTE]
    lines += _size_lines(report)
    lines.append("")
    lines += _layer_lines(report["layers"], max_layers)
    lines += _pattern_lines((report.get("selection") or {}).get("patterns", []))
    if report["subgraph_weights_left"]:
        lines.append(f"{report['subgraph_weights_left']} weights inside If/Loop/Scan subgraphs left in float")
    if report.get("search"):
        lines.append(_search_line(report["search"]))
    if report.get("validation"):
        lines.append("")
        lines += validation_lines(report["validation"])
    if report.get("seconds"):
        lines.append("time: " + ", ".join(f"{stage} {s:.1f} s" for stage, s in report["seconds"].items()))
    lines += [f"warning: {w}" for w in warnings if w != DATA_FREE_NOTE]
    return "\n".join(lines)
