"""The benchmark results store: docs/results.jsonl, one JSON row per measurement with where it came from, and
the one renderer of docs/BENCHMARKS.md and of the README's results table.

Every row carries the git commit it was measured at (and whether onnxpq/ had uncommitted changes then), the
command, the date, the library versions and the machine. A row is **stale** when onnxpq/ changed after its
commit (or it was measured on uncommitted code): the renderer says so next to it, so a reader can tell which
numbers describe the current code. Rows are only ever appended; for each (suite, task, method, target) the
newest row is the one shown.

    python tools/results.py            # re-render docs/BENCHMARKS.md and the README table from the file
    python tools/results.py --check    # exit 1 when either differs from what the file renders (tests run it)
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results.jsonl"
BENCHMARKS = ROOT / "docs" / "BENCHMARKS.md"
README = ROOT / "README.md"
README_BEGIN, README_END = "<!-- results:begin (tools/results.py) -->", "<!-- results:end -->"
SPEED_BEGIN, SPEED_END = "<!-- speed:begin (tools/results.py) -->", "<!-- speed:end -->"
#: Row keys that are not task metrics.
FIXED = ("suite", "task", "method", "target_bpw", "bpw_all", "file_mib", "ratio", "seconds", "infeasible")
COSTS = ("load_ratio", "rss_ratio", "latency_ratio")
EXTRA = ("finetune_steps", "holdout_loss")
PROVENANCE = ("commit", "dirty", "date", "command", "versions", "machine")
#: The README's table: per task, these methods (the first row found at each target) in this order.
README_METHODS = (
    ("fp32", None),
    ("onnxruntime quantize_dynamic int8 per-channel", None),
    ("onnxpq data-aware, fixed layout (--no-auto-budget)", None),
    ("onnxpq data-aware (defaults)", None),
    ("onnxpq data-aware", 3.0),
)


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()


def commit_state() -> tuple[str, bool]:
    """The checked-out commit, and whether onnxpq/ differs from it (uncommitted code measured)."""
    return _git("rev-parse", "--short=10", "HEAD"), bool(_git("status", "--porcelain", "onnxpq"))


def commit_label() -> str:
    """``commit_state`` in one short string, as the per-tool JSON files record it: ``abc1234+dirty onnxpq/``."""
    commit, dirty = commit_state()
    return commit[:7] + ("+dirty onnxpq/" if dirty else "")


def provenance(command: str) -> dict[str, Any]:
    """Where a measurement comes from: the commit, whether onnxpq/ differed from it, the command and the setup."""
    from onnxpq.report import versions

    commit, dirty = commit_state()
    return {
        "commit": commit,
        "dirty": dirty,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "versions": versions(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }


def append(rows: Iterable[dict[str, Any]], path: Path = RESULTS) -> None:
    """Add rows at the end of the file, one JSON object per line (a stopped run keeps what it measured)."""
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")  # in the order the tool wrote it: a task's metrics, primary first


def load(path: Path = RESULTS) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def current(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest row of each (suite, task, method, target), in the order each key first appeared."""
    newest: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        newest[(row["suite"], row["task"], row["method"], row.get("target_bpw"))] = row
    return list(newest.values())


def last_change() -> str:
    """The last commit that changed onnxpq/: rows measured before it may no longer describe the code."""
    return _git("log", "-1", "--format=%H", "--", "onnxpq")


def stale(row: dict[str, Any], change: str) -> bool:
    """Measured on uncommitted onnxpq/ code, or at a commit that the last change to onnxpq/ is not part of."""
    if row.get("dirty"):
        return True
    ancestor = subprocess.run(["git", "merge-base", "--is-ancestor", change, row["commit"]], cwd=ROOT, check=False)
    return ancestor.returncode != 0


def _metric_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    keys = dict.fromkeys(k for r in rows for k in r if k not in FIXED + COSTS + EXTRA + PROVENANCE)
    return list(keys)


def _cell(value: object) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _rounded(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _commit_cell(row: dict[str, Any], change: str) -> str:
    return f"{row['commit'][:7]} **stale**" if stale(row, change) else row["commit"][:7]


def task_table(rows: Sequence[dict[str, Any]], change: str) -> list[str]:
    """One task's rows as a markdown table: size, metrics, time, deployment costs, and the commit."""
    keys = _metric_keys(rows)
    head = ["method", "target", "bits/weight", "file MiB", "ratio", *keys, "compress s", "load", "peak RSS",
            "latency", "commit"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "| --- " * len(head) + "|"]
    for r in rows:
        target = f"{r['target_bpw']:g}" if r.get("target_bpw") else ""
        if r.get("infeasible"):
            filler = " |" * (len(head) - 4)
            commit = _commit_cell(r, change)
            lines.append(f"| {r['method']} | {target} | infeasible: {r['infeasible']} |{filler} {commit} |")
            continue
        method = r["method"] + (f" ({r['finetune_steps']} steps)" if "finetune_steps" in r else "")
        cells = [
            method, target, f"{r['bpw_all']:.3f}", f"{r['file_mib']:.3f}", f"{r['ratio']:.1f}×",
            *(_cell(r.get(k)) for k in keys), f"{r['seconds']:.0f}", *(f"{r[k]:.2f}×" for k in COSTS),
            _commit_cell(r, change),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def speed_table(rows: Sequence[dict[str, Any]], change: str) -> list[str]:
    """The ``speed`` suite's rows (``tools/bench_speed.py``): wall time, its stages, memory and fidelity."""
    lines = [
        "| target | samples | jobs | wall s | stages (s) | peak RSS MiB | ORT session MiB | bits/weight | fidelity "
        "| commit |",
        "| --- " * 10 + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['target_bpw']:g} | {r['samples']} | {r['jobs']} | {r['wall_s']:.0f} | {_stages(r)} "
            f"| {r['peak_rss_mib']} | {r['ort_session_peak_rss_mib']} | {r.get('bits_per_weight', '')} "
            f"| {_fidelity(r)} | {_commit_cell(r, change)} |"
        )
    return lines


def _stages(row: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in row.get("seconds", {}).items() if k != "total" and v >= 0.5)


def _fidelity(row: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in row.get("metrics", {}).items()) or row.get("error", "")[-80:]


def render_speed_lines(rows: Sequence[dict[str, Any]], change: str) -> str:
    """The README's speed list: each model's newest ``speed`` row in one line."""
    lines = []
    for r in (r for r in current(rows) if r["suite"] == "speed"):
        lines.append(
            f"- {r['task']}, `--target-bpw {r['target_bpw']:g}`, {r['samples']} samples: {r['wall_s']:.0f} s "
            f"({_stages(r)}), peak RSS {r['peak_rss_mib']} MiB (an onnxruntime session of the original: "
            f"{r['ort_session_peak_rss_mib']} MiB), {_fidelity(r)}; {_commit_cell(r, change)}"
        )
    return "\n".join(lines) + "\n"


def zoo_table(rows: Sequence[dict[str, Any]], change: str) -> list[str]:
    """The ``zoo`` suite (``tools/bench_zoo.py``): every model at each budget in one table."""
    head = ["model", "flags", "status", "wall s", "CPU µs/param", "peak RSS MiB", "params", "bits/weight", "cosine",
            "top-1", "folded", "Silero Δp max", "commit"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "| --- " * len(head) + "|"]
    for r in rows:
        cells = [r["task"], r["method"], r["status"], _rounded(r["wall_s"], ".0f"),
                 _rounded(r["us_per_parameter"], ".1f"), _rounded(r["peak_rss_mib"], ".0f"), f"{r['parameters']:,}",
                 _rounded(r["bits_per_weight"], ".3f"), _cell(r["cosine"]),
                 _cell(r["top1_agreement"]), _cell(r["decode_folded"]), _cell(r["silero_max_dp"]),
                 _commit_cell(r, change)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def search_table(rows: Sequence[dict[str, Any]], change: str) -> list[str]:
    """The ``search`` suite (``tools/bench_search.py``): the hand sweep, then ``--target-bpw auto``, then how
    the search compares with the smallest budget that passed by hand."""
    head = ["method", "target", "bits/weight", "degradation", "gate", "wall s", "tries", "task metrics", "commit"]
    lines = ["| " + " | ".join(head) + " |", "| --- " * len(head) + "|"]
    auto = next((r for r in rows if r["target_bpw"] is None), None)
    if auto is not None:  # a hand run judged by another gate says nothing about this search
        rows = [r for r in rows if (r["metric"], r["max_degradation"]) == (auto["metric"], auto["max_degradation"])]
    ordered = sorted(rows, key=lambda r: (r["target_bpw"] is None, r["target_bpw"] or 0))
    for r in ordered:
        tries = r.get("tries") or []
        finals = sum(t["kind"] == "final" for t in tries)
        kinds = f"{len(tries) - finals} estimates, {finals} finals"
        cells = [r["method"], _rounded(r["target_bpw"], "g"), _rounded(r.get("bits_per_weight"), ".3f"),
                 _rounded(r.get("degradation"), ".4f"), "pass" if r.get("passed") else "fail", f"{r['wall_s']:.0f}",
                 kinds if tries else "", _fidelity(r) if tries else "", _commit_cell(r, change)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, "", *_search_summary(ordered)]


def _search_summary(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The search against the hand sweep: how far above the smallest passing hand budget, at what time."""
    hand = [r for r in rows if r["target_bpw"] is not None and r.get("passed")]
    auto = next((r for r in rows if r["target_bpw"] is None), None)
    if not hand or auto is None or not auto.get("passed"):
        return []
    best = min(hand, key=lambda r: r["target_bpw"])
    gate = f"gate: {auto['metric']} <= {auto['max_degradation']:g}"
    return [
        f"Smallest passing budget by hand ({gate}): {best['target_bpw']:g} bits/weight, {best['wall_s']:.0f} s. "
        f"The search: {auto['bits_per_weight']:.3f} bits/weight ({auto['bits_per_weight'] - best['target_bpw']:+.3f}), "
        f"{auto['wall_s']:.0f} s = {auto['wall_s'] / best['wall_s']:.2f}x that one run "
        f"({len(hand) + sum(not r.get('passed') for r in rows if r['target_bpw'] is not None)} hand runs took "
        f"{sum(r['wall_s'] for r in rows if r['target_bpw'] is not None):.0f} s)."
    ]


#: Each suite's plot in docs/, drawn by the tool that measures the suite.
PLOTS = {"quick": "bench_rate_quick.png", "full": "bench_rate.png", "zoo": "zoo_time_per_parameter.png"}
#: How each suite's tables are drawn (``task_table`` for the others); ``WHOLE`` suites get one table, not one per task.
TABLES = {"speed": speed_table, "zoo": zoo_table, "search": search_table}
WHOLE = frozenset({"zoo"})


def render_benchmarks(rows: Sequence[dict[str, Any]], change: str) -> str:
    """docs/BENCHMARKS.md: how the rows are made, then one section per suite and one table per task."""
    shown = current(rows)
    lines = [
        "# Benchmarks: onnxpq against the anchors on real models",
        "",
        "Rendered by `tools/results.py` from [results.jsonl](results.jsonl), which `tools/bench.py` appends to.",
        "Each row names the commit it was measured at; **stale** marks a row measured before the last change to",
        f"`onnxpq/` (at the time of rendering: {change[:7]}) or on uncommitted code. Each row's command, date, library",
        "versions and machine are in the file. Models, data and row definitions: `tools/bench.py`'s docstring.",
        "",
        "- **bits/weight** counts every float parameter (log2(k)-bit indices, fp16 codebooks, all else 32-bit);",
        "  for onnxruntime's int8 and MatMulNBits models it is the file size over the parameters. Round-to-nearest",
        "  rows are dense fake-quant: their bits/weight is what a packed format would need, their file is fp32.",
        "- **ratio** is the fp32 file over this file. **load** and **peak RSS** are onnxruntime session creation",
        "  in a fresh process (median of 5, 3 in the quick suite), **latency** one warm `run` of one sample, each",
        "  divided by fp32's in the same run. Ratios of loads of a few milliseconds (MNIST, PP-OCR) and of",
        "  sub-millisecond latencies are mostly noise.",
        "- **compress s** is the wall time of one compression on the 2-core machine.",
    ]
    for suite in dict.fromkeys(r["suite"] for r in shown):
        lines += ["", f"## Suite: {suite}"]
        if (BENCHMARKS.parent / PLOTS.get(suite, "-")).exists():
            lines += ["", f"Plot: [{PLOTS[suite]}]({PLOTS[suite]}) (drawn by the suite's tool from the same rows)."]
        if suite in WHOLE:
            suite_rows = [r for r in shown if r["suite"] == suite]
            commands = sorted({r["command"] for r in suite_rows})
            lines += ["", *(f"`{c}`" for c in commands), "", *TABLES[suite](suite_rows, change)]
            continue
        for task in dict.fromkeys(r["task"] for r in shown if r["suite"] == suite):
            task_rows = [r for r in shown if r["suite"] == suite and r["task"] == task]
            commands = sorted({r["command"] for r in task_rows})
            table = TABLES.get(suite, task_table)(task_rows, change)
            lines += ["", f"### {task}", "", *(f"`{c}`" for c in commands), "", *table]
    return "\n".join(lines) + "\n"


#: The metric the README quotes per task (the others are in BENCHMARKS.md); lower is better for ``kl``.
PRIMARY_METRIC = {
    "MNIST CNN": "accuracy",
    "MobileNetV2": "kl",
    "PP-OCRv4 rec": "char_accuracy",
    "PP-OCRv4 det": "mean_iou",
    "all-MiniLM-L6-v2": "mean_cosine",
}


def render_readme_table(rows: Sequence[dict[str, Any]], change: str, suite: str = "quick") -> str:
    """The README's results: per task, fp32, onnxruntime's int8, onnxpq's fixed layout, its defaults (the same
    size, allocated) and ``--target-bpw 3``, with the task's ``PRIMARY_METRIC`` and bits/weight."""
    shown = [r for r in current(rows) if r["suite"] == suite and not r.get("infeasible")]
    lines = ["| model | metric | " + " | ".join(m if t is None else f"{m}, --target-bpw {t:g}"
                                                for m, t in README_METHODS) + " | commit |",
             "| --- " * (len(README_METHODS) + 3) + "|"]  # fmt: skip
    for task in dict.fromkeys(r["task"] for r in shown):
        task_rows = [r for r in shown if r["task"] == task]
        metric = PRIMARY_METRIC.get(task) or _metric_keys(task_rows)[0]
        cells = []
        for method, target in README_METHODS:
            row = next((r for r in task_rows if r["method"] == method and r.get("target_bpw") == target), None)
            cells.append(f"{row[metric]:.4f} at {row['bpw_all']:.2f} bits/weight" if row else "not run")
        commits = sorted({_commit_cell(r, change) for r in task_rows})
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + f" | {', '.join(commits)} |")
    return "\n".join(lines) + "\n"


def between(text: str, markers: tuple[str, str], block: str) -> str:
    """``text`` with ``block`` between the two markers."""
    head, rest = text.split(markers[0])
    _, tail = rest.split(markers[1])
    return f"{head}{markers[0]}\n{block}{markers[1]}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    args = parser.parse_args(argv)
    rows, change = load(), last_change()
    wanted = {
        BENCHMARKS: render_benchmarks(rows, change),
        README: between(
            between(README.read_text(), (README_BEGIN, README_END), render_readme_table(rows, change)),
            (SPEED_BEGIN, SPEED_END),
            render_speed_lines(rows, change),
        ),
    }
    if args.check:
        differ = [path.name for path, text in wanted.items() if path.read_text() != text]
        if differ:
            print(f"{', '.join(differ)} differ from docs/results.jsonl: run python tools/results.py", file=sys.stderr)
        return 1 if differ else 0
    for path, text in wanted.items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
