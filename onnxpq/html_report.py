"""A compression report as one self-contained HTML page: the pictures a person looks at instead of the JSON.

``onnxpq report OUT.report.json --html report.html`` draws, with matplotlib, where the bits go (bits per
weight of every layer, and each layer's share of the compressed size), where the error is (each layer's
output or weight SQNR, worst first), the rate-degradation curve of a budget search, and lists the sizes,
validation numbers and warnings. Images are embedded as PNG data URIs, so the page is one file that opens
offline and can be attached to a CI run.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from onnxpq.errors import ConfigError

__all__ = ["load_report", "render_html"]

#: Layers drawn in the per-layer plots (the largest, or the worst); the page's table lists them all.
PLOTTED_LAYERS = 40
#: The report sections the page and the table need; anything else written by onnxpq is optional.
REQUIRED = ("versions", "input", "output", "files", "pqf", "layers", "warnings", "subgraph_weights_left")

Figure = Any


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read an onnxpq report, refusing a file that is not one (with the reason)."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: report not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not a readable JSON report: {err}") from None
    missing = [k for k in REQUIRED if not isinstance(report, dict) or k not in report]
    if missing:
        raise ConfigError(f"{path}: not an onnxpq report (no {', '.join(missing)})")
    return report


def render_html(report: Mapping[str, Any]) -> str:
    """The page: a summary, then one figure per picture the report has data for, then the tables."""
    plt = _pyplot()
    figures = [
        ("Bits per weight of each layer", _bits_figure),
        ("Where the compressed bytes go", _bytes_figure),
        ("Error per layer, worst first", _error_figure),
        ("Budget search: degradation against size", _search_figure),
    ]
    body = [f"<h1>onnxpq {_e(report['versions'].get('onnxpq', ''))} report</h1>", _summary(report)]
    for title, draw in figures:
        figure = draw(plt, report)
        if figure is not None:
            body.append(f"<h2>{_e(title)}</h2>\n<img alt='{_e(title)}' src='{_png(plt, figure)}'>")
    body += [_validation(report), _warnings(report), _layer_table(report["layers"])]
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
    )
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>onnxpq report</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(b for b in body if b) + "\n</body></html>\n"
    )


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend, or a ConfigError saying how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("the HTML report draws with matplotlib: pip install 'onnxpq[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(plt: Any, figure: Figure) -> str:
    """The figure as a PNG data URI (and closed)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _e(value: object) -> str:
    """Text safe inside HTML: weight names are the model's and may hold anything."""
    return html.escape(str(value), quote=True)


def _layer_bits(row: Mapping[str, Any]) -> float:
    """A layer's bits per weight in PQF's accounting (float layers: 32)."""
    return 8 * row["bytes_pqf"] / row["elements"]


def _barh(plt: Any, labels: Sequence[str], values: Sequence[float], color: Any, xlabel: str) -> Figure:
    """One horizontal bar per layer, the first at the top, sized to the number of bars."""
    figure, ax = plt.subplots(figsize=(10, 0.25 * len(labels) + 1.2))
    ax.barh([label[:40] for label in labels], values, color=color)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    return figure


def _bits_figure(plt: Any, report: Mapping[str, Any]) -> Figure | None:
    """Bits/weight of the largest layers against the model's: which layers the budget favoured."""
    rows = sorted(report["layers"], key=lambda r: -r["elements"])[:PLOTTED_LAYERS]
    if not rows:
        return None
    colors = ["tab:blue" if r["skip_reason"] is None else "tab:gray" for r in rows]
    xlabel = "bits per weight (PQF accounting; grey: kept in float)"
    figure = _barh(plt, [r["weight"] for r in rows], [_layer_bits(r) for r in rows], colors, xlabel)
    ax = figure.axes[0]
    ax.axvline(report["pqf"]["bits_per_weight_all_parameters"], color="tab:red", linestyle="--", label="model")
    ax.set_xscale("log")
    ax.set_title(f"largest {len(rows)} layers")
    ax.legend(loc="lower right")
    return figure


def _bytes_figure(plt: Any, report: Mapping[str, Any]) -> Figure | None:
    """The layers holding most of the compressed size: where a smaller model has to cut."""
    rows = sorted(report["layers"], key=lambda r: -r["bytes_pqf"])
    if not rows:
        return None
    shown = rows[: PLOTTED_LAYERS // 2]
    rest = sum(r["bytes_pqf"] for r in rows[len(shown) :])
    labels = [r["weight"] for r in shown] + ([f"{len(rows) - len(shown)} other layers"] if rest else [])
    sizes = [r["bytes_pqf"] / 1024 for r in shown] + ([rest / 1024] if rest else [])
    return _barh(plt, labels, sizes, "tab:green", "KiB in PQF accounting (indices + fp16 codebook, or float)")


def _error_figure(plt: Any, report: Mapping[str, Any]) -> Figure | None:
    """Each compressed layer's SQNR, worst first (the report's order): where the error comes from."""
    rows = [r for r in report["layers"] if r["skip_reason"] is None and _sqnr(r) is not None][:PLOTTED_LAYERS]
    if not rows:
        return None
    measured = {r["output_sqnr_db"] is not None for r in rows}
    what = {
        frozenset({True}): "output SQNR on the calibration data",
        frozenset({False}): "weight SQNR (no calibration data)",
    }.get(frozenset(measured), "output SQNR on the calibration data (weight SQNR where a layer had none)")
    return _barh(
        plt, [r["weight"] for r in rows], [_sqnr(r) for r in rows], "tab:orange", f"{what}, dB (lower is worse)"
    )


def _sqnr(row: Mapping[str, Any]) -> float | None:
    value = row["output_sqnr_db"] if row["output_sqnr_db"] is not None else row["sqnr_db"]
    try:
        return float(value) if value is not None and abs(float(value)) != float("inf") else None
    except (TypeError, ValueError):
        return None


def _search_figure(plt: Any, report: Mapping[str, Any]) -> Figure | None:
    """A budget search's tries: degradation against bits/weight, the gate and the budget chosen."""
    search = report.get("search")
    if not search or not search.get("tries"):
        return None
    figure, ax = plt.subplots(figsize=(8, 4.5))
    for kind, marker in (("estimate", "o"), ("final", "s")):
        # The JSON writes an infinite degradation (NaN outputs) as "inf": such tries have no point to draw.
        points = sorted((t["bits_per_weight"], float(t["degradation"])) for t in search["tries"] if t["kind"] == kind)
        points = [(x, y) for x, y in points if math.isfinite(y)]
        if points:
            ax.plot([x for x, _ in points], [y for _, y in points], marker=marker, label=f"{kind} tries")
    threshold = float(search["max_degradation"])
    if math.isfinite(threshold):
        ax.axhline(threshold, color="tab:red", linestyle="--", label="--max-degradation")
    if search.get("winner_bits_per_weight") is not None:
        ax.axvline(search["winner_bits_per_weight"], color="tab:green", linestyle=":", label="chosen")
    # Degradations span decades; a perfect (0) or better-than-original (< 0) try needs the linear part near 0.
    ax.set_yscale("symlog", linthresh=threshold / 10 if 0 < threshold < math.inf else 1e-6)
    ax.set_xlabel("bits per weight over all parameters")
    ax.set_ylabel(f"{search.get('metric') or 'gate'} degradation")
    ax.legend()
    return figure


def _table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An HTML table, every cell escaped."""
    cells = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _summary(report: Mapping[str, Any]) -> str:
    """What a reader wants first: the files, the size and the time."""
    files, pqf = report["files"], report["pqf"]
    rows = [
        ("input", (report.get("input") or {}).get("path") or "(in memory)"),
        ("output", (report.get("output") or {}).get("path") or "(in memory)"),
        ("file size", f"{files['original_bytes']:,} -> {files['compressed_bytes']:,} bytes ({files['ratio']:.1f}x)"),
        ("bits/weight, all parameters", f"{pqf['bits_per_weight_all_parameters']:.3f}"),
        ("bits/weight, compressed layers", f"{pqf['bits_per_weight_compressed_layers']:.3f}"),
        ("parameters compressed", f"{100 * pqf['compressible_fraction']:.1f}% of {pqf['parameters']:,}"),
    ]
    seconds = report.get("seconds") or {}
    if seconds:
        rows.append(("time", ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())))
    return "<h2>Summary</h2>" + _table(("", ""), rows)


def _validation(report: Mapping[str, Any]) -> str:
    """Per-output fidelity, the gate's verdict and the deployment costs, or that validation did not run."""
    v = report.get("validation")
    if not v:
        return "<h2>Validation</h2><p>not run</p>"
    keys = ("max_abs", "rel_l2", "cosine", "top1_agreement", "kl", "accuracy_original", "accuracy_compressed")
    rows = [(o["name"], *(_number(o.get(k)) for k in keys)) for o in v["outputs"]]
    parts = [
        f"<h2>Validation</h2><p>{_e(v['n_samples'])} {_e(v['inputs'])} samples</p>",
        _table(("output", *keys), rows),
    ]
    gate = v.get("gate")
    if gate:
        verdict = gate["failure"] or f"passed: {gate['metric']} within {gate['max_degradation']:g}"
        parts.append(f"<p>gate: {_e(verdict)}</p>")
    if "load" in v:
        load = v["load"]
        parts.append(
            f"<p>load peak RSS {load['original']['peak_rss_mib']:.0f} -> {load['compressed']['peak_rss_mib']:.0f} MiB"
            f", latency ratio {v.get('latency_ms', {}).get('ratio', float('nan')):.2f}</p>"
        )
    return "\n".join(parts)


def _number(value: object) -> str:
    """A metric cell: six significant digits, blank for a metric that does not apply."""
    return f"{value:.6g}" if isinstance(value, float) else "" if value is None else str(value)


def _warnings(report: Mapping[str, Any]) -> str:
    """The run's warnings, as the table prints them."""
    notes = report.get("warnings") or []
    if not notes:
        return ""
    return "<h2>Warnings</h2><ul>" + "".join(f"<li>{_e(w)}</li>" for w in notes) + "</ul>"


def _layer_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Every layer, in the report's worst-first order: the plots show only the largest or worst."""
    head = ("weight", "op", "shape", "k", "d", "bits/weight", "KiB", "SQNR dB", "output SQNR dB", "note")
    cells: list[Sequence[object]] = [
        (
            r["weight"],
            r["op_type"],
            "x".join(map(str, r["shape"])),
            r["k"] or "",
            r["d"] or "",
            f"{_layer_bits(r):.3f}",
            f"{r['bytes_pqf'] / 1024:.1f}",
            _number(r["sqnr_db"]),
            _number(r["output_sqnr_db"]),
            r["skip_reason"] or "",
        )
        for r in rows
    ]
    return "<h2>Layers, worst first</h2>" + _table(head, cells)
