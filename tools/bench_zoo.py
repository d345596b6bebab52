"""Compress every zoo model data-aware at two budgets, as a new user would, and record what happens.

Each compression runs the CLI in its own (niced) process, so a crash, a memory blow-up or a
hang costs one row, not the run; its peak RSS comes from ``os.wait4``'s rusage of that child.
A child's address space is capped (``--memory-limit-gb``) so a runaway allocation fails there
instead of starving the machine. Rows accumulate in docs/zoo.json (one per model, budget and
extra flags; a rerun replaces its own rows) and docs/ZOO.md is re-rendered from all of them.

    python tools/bench_zoo.py --small                      # the CI-sized zoo, budgets 2.5 and 4
    python tools/bench_zoo.py audio_cnn --budgets 2.5      # one full-size model
    python tools/bench_zoo.py resnext --extra "--permute"  # with extra compress flags
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results as results_store
import zoo
from processes import TreePeak

from onnxpq.validate import measure_load

ROOT = zoo.ROOT
DOCS = ROOT / "docs"
RESULTS = DOCS / "zoo.json"
LOGS = zoo.ZOO / "logs"
#: The issue's criterion for Silero: speech probabilities within this of the original's.
SILERO_TOLERANCE = 0.02


@dataclass
class Row:
    """One compression: what was run, how it ended, and what it cost and kept."""

    model: str
    small: bool
    budget: float
    extra: str
    command: str
    parameters: int
    exit_code: int | None = None
    wall_s: float | None = None
    cpu_s: float | None = None
    us_per_parameter: float | None = None
    peak_rss_mib: float | None = None
    #: Summed RSS of the compression and its workers, sampled (``processes.TreePeak``).
    tree_peak_rss_mib: float | None = None
    #: Peak RSS of loading the original in an onnxruntime session (``validate.measure_load``): issue 21's bound
    #: is this plus 1 GiB.
    ort_session_mib: float | None = None
    bits_per_weight: float | None = None
    cosine: float | None = None
    top1_agreement: float | None = None
    decode_folded: bool | None = None
    checker: str | None = None
    silero_max_dp: float | None = None
    silero_p99_dp: float | None = None
    #: The commit that measured the row (rows merge across runs; older rows may predate a fix).
    commit: str | None = None
    error: str | None = None


def run_child(cmd: list[str], log: Path, timeout_s: float, memory_limit: int) -> tuple[int, float, float, float, float]:
    """Run ``cmd`` niced with an address-space cap; (exit code, wall seconds, CPU seconds, peak RSS MiB of the
    largest process, sampled peak RSS MiB of the process tree).

    CPU seconds (user + system) are the comparable time on a shared machine, where a niced
    child's wall time mostly measures the other jobs.

    ``os.wait4`` gives this child's own rusage, so concurrent children of the runner cannot
    pollute the peak (``RUSAGE_CHILDREN`` would be a maximum over all of them).
    """

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(["nice", "-n", "10", *cmd], stdout=out, stderr=subprocess.STDOUT, preexec_fn=limit)
        with TreePeak(proc.pid) as tree:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.perf_counter() - start > timeout_s:
                    proc.send_signal(signal.SIGKILL)
                    pid, status, usage = os.wait4(proc.pid, 0)
                    out.write(f"\nkilled by bench_zoo after {timeout_s:.0f} s\n")
                    break
                time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    return proc.returncode, time.perf_counter() - start, cpu, usage.ru_maxrss / 1024, tree.mib


@functools.cache
def session_peak_mib(model: Path) -> float | None:
    """Peak RSS of an onnxruntime session of ``model`` in a fresh process, once per model; None where it cannot
    be measured (the row then shows no bound)."""
    try:
        return round(measure_load(model).peak_rss_mib, 1)
    except RuntimeError:
        return None


def last_error(log: Path) -> str:
    """The last meaningful line of a failed child's output (the exception or the CLI's one-line error)."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:400] if lines else "(no output)"


def checker(path: Path) -> str:
    """``ok`` or onnx.checker's complaint about the compressed file (full check, shapes inferred)."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    return "ok"


def fill_from_report(row: Row, report_path: Path) -> None:
    """bits/weight over all parameters, worst output's cosine and top-1, decode folding."""
    report = json.loads(report_path.read_text())
    row.bits_per_weight = report["pqf"]["bits_per_weight_all_parameters"]
    validation = report.get("validation") or {}
    outputs = validation.get("outputs") or []
    cosines = [o["cosine"] for o in outputs if o.get("cosine") is not None]
    tops = [o["top1_agreement"] for o in outputs if o.get("top1_agreement") is not None]
    row.cosine = min(cosines) if cosines else None
    row.top1_agreement = min(tops) if tops else None
    row.decode_folded = validation.get("decode_folded")


def silero_dp(original: Path, compressed: Path) -> np.ndarray:
    """|p_compressed - p_original| of every held-out speech and noise frame, streamed with the state carried."""
    audio = dict(np.load(zoo.out_dir(False) / "silero_audio.npz"))
    return np.concatenate(
        [np.abs(zoo.silero_stream(original, audio[k])[0] - zoo.silero_stream(compressed, audio[k])[0]) for k in
         ("eval_speech", "eval_noise")]
    )  # fmt: skip


def _float_weights(graph: onnx.GraphProto):
    """Every float32 initializer and Constant tensor of a graph and its subgraphs (Silero keeps them in Ifs)."""
    yield from (t for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _float_weights(attr.g)
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == onnx.TensorProto.FLOAT:
                yield attr.t


def silero_anchors(name: str, built: zoo.Built) -> dict[str, float]:
    """How sensitive a Silero variant is, without onnxpq: Δp (max, 99th percentile, mean) when every float
    weight of at least 1024 elements is only rounded to float16, the precision of onnxpq's codebooks."""
    from onnx import numpy_helper

    model = onnx.load(str(built.model))
    for tensor in _float_weights(model.graph):
        w = numpy_helper.to_array(tensor)
        if w.size >= 1024:
            tensor.CopyFrom(numpy_helper.from_array(w.astype(np.float16).astype(np.float32), tensor.name))
    rounded = zoo.out_dir(True) / "out" / f"{name}_fp16_rounded.onnx"
    rounded.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(rounded))
    dp = silero_dp(built.model, rounded)
    return {"max": round(float(dp.max()), 5), "p99": round(float(np.quantile(dp, 0.99)), 5),
            "mean": round(float(dp.mean()), 6)}  # fmt: skip


def compress(built: zoo.Built, name: str, budget: float, args: argparse.Namespace) -> Row:
    """Compress one model at one budget in a child process and measure the result."""
    suffix = f"{name}_{budget:g}{'_small' if args.small else ''}"
    out = zoo.out_dir(args.small) / "out" / f"{suffix}.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    folder = built.model.parent
    cli = [
        "python", "-m", "onnxpq.cli", "compress", str(built.model), str(out),
        "--calibration-data", str(folder / f"{name}_calib.npz"),
        "--validation-data", str(folder / f"{name}_eval.npz"),
        "--target-bpw", f"{budget:g}", "--force", "--no-measure", *shlex.split(args.extra),
    ]  # fmt: skip
    row = Row(
        model=name,
        small=args.small,
        budget=budget,
        extra=args.extra,
        command=" ".join(shlex.quote(str(Path(c).relative_to(ROOT)) if c.startswith(str(ROOT)) else c) for c in cli),
        parameters=zoo.parameters(built.model),
    )
    log = LOGS / f"{suffix}.log"
    cli[0] = sys.executable
    code, wall, cpu, rss, tree = run_child(cli, log, args.timeout, int(args.memory_limit_gb * 2**30))
    row.exit_code, row.wall_s, row.cpu_s, row.peak_rss_mib = code, round(wall, 2), round(cpu, 2), round(rss, 1)
    row.tree_peak_rss_mib = round(tree, 1)
    row.ort_session_mib = session_peak_mib(built.model)
    row.us_per_parameter = round(1e6 * cpu / max(row.parameters, 1), 3)
    report = Path(f"{out}.report.json")
    if code not in (0, 1) or not out.exists() or not report.exists():
        row.error = last_error(log)
        return row
    fill_from_report(row, report)
    row.checker = checker(out)
    if name in zoo.SILERO_VARIANTS:
        try:
            dp = silero_dp(built.model, out)
            row.silero_max_dp, row.silero_p99_dp = round(float(dp.max()), 5), round(float(np.quantile(dp, 0.99)), 5)
        except Exception as exc:
            row.error = f"silero check: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    return row


def load_results() -> dict[str, Any]:
    """docs/zoo.json: the rows and the Silero anchors of every earlier run."""
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def merge(old: list[dict[str, Any]], new: list[Row]) -> list[dict[str, Any]]:
    """Replace rows of the same (model, small, budget, extra); keep the others, in zoo order."""
    key = lambda r: (r["model"], r["small"], r["budget"], r["extra"])  # noqa: E731
    rows = {key(r): r for r in old}
    rows.update({key(asdict(r)): asdict(r) for r in new})
    order = {m: i for i, m in enumerate(zoo.MODELS)}
    return sorted(rows.values(), key=lambda r: (r["small"], order.get(r["model"], 99), r["extra"], r["budget"]))


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def status(row: dict[str, Any]) -> str:
    """ok, gate (exit 1, kept), or FAIL with the exit code; a failed checker or Silero check also fails."""
    if row["exit_code"] not in (0, 1) or row["error"]:
        return f"FAIL ({row['exit_code']})"
    if row["checker"] != "ok" or (row["silero_max_dp"] is not None and row["silero_max_dp"] > SILERO_TOLERANCE):
        return "FAIL (check)"
    return "ok" if row["exit_code"] == 0 else "gate"


#: The speed benchmark's rows plotted and quoted beside the zoo's: its plain runs (docs/SPEED.md), the latest
#: per model, as ``tools/bench_speed.py`` keeps one row per label.
SPEED_LABEL = ""
PLOT = DOCS / "zoo_time_per_parameter.png"
#: Float parameters of the speed benchmark's models, as the report counts them (``quantize.size.float_parameters``
#: of tools/bench.py's task models, measured 2026-12-07): speed.json does not record them.
SPEED_PARAMETERS = {"MobileNetV2": 3_487_886, "PP-OCRv4 rec": 2_690_352, "all-MiniLM-L6-v2": 22_565_426}


def speed_rows() -> list[dict[str, Any]]:
    """The speed benchmark's plain ``--jobs auto`` rows of the models whose parameters are known."""
    rows = json.loads((DOCS / "speed.json").read_text())
    return [r for r in rows if r["label"] == SPEED_LABEL and r["jobs"] == "auto" and r["model"] in SPEED_PARAMETERS]


def speed_text(speed: list[dict[str, Any]]) -> list[str]:
    """The speed benchmark's time per parameter, each model's next to twice MobileNetV2's (issue 21's bound)."""
    mobilenet = next((r for r in speed if r["model"] == "MobileNetV2"), None)
    if mobilenet is None:
        return ["The speed benchmark has no MobileNetV2 row to compare with (docs/SPEED.md)."]
    base = mobilenet["wall_s"] / SPEED_PARAMETERS["MobileNetV2"] * 1e6
    parts = [
        f"{r['model']} {r['wall_s']:.0f} s for {SPEED_PARAMETERS[r['model']] / 1e6:.1f} M parameters, "
        f"{r['wall_s'] / SPEED_PARAMETERS[r['model']] * 1e6:.1f} µs each "
        f"({r['wall_s'] / SPEED_PARAMETERS[r['model']] * 1e6 / base:.2f}x MobileNetV2's; {r['commit']})"
        for r in speed
    ]
    return [
        "Reading the times: issue 21 bounds every model at 2x MobileNetV2's time per parameter. The speed",
        "benchmark (`--target-bpw 3`, 256 samples, wall time, docs/SPEED.md) on this machine: "
        + "; ".join(parts)
        + ".",
        "CPU s counts the child and its worker processes; the small models' µs/parameter is mostly fixed",
        "per-run and per-layer cost. zoo_time_per_parameter.png plots wall µs per parameter against parameters",
        "for every row that ended with exit 0, with those speed rows.",
    ]


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Wall seconds per parameter against parameters (log-log): every zoo compression that ended with exit 0 and
    the speed benchmark's models, with issue 21's bound, twice MobileNetV2's time per parameter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = speed_rows()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for small, marker in ((True, "o"), (False, "s")):
        done = [r for r in rows if r["exit_code"] == 0 and r["small"] == small and r["wall_s"]]
        ax.scatter([r["parameters"] for r in done], [r["wall_s"] / r["parameters"] * 1e6 for r in done],
                   marker=marker, label=f"zoo, {'small' if small else 'full size'}")  # fmt: skip
        for r in done if not small else []:
            ax.annotate(r["model"], (r["parameters"], r["wall_s"] / r["parameters"] * 1e6), fontsize=7)
    params = SPEED_PARAMETERS
    for r in speed:
        x, y = params[r["model"]], r["wall_s"] / params[r["model"]] * 1e6
        ax.scatter([x], [y], marker="^", color="black")
        ax.annotate(r["model"], (x, y), fontsize=7)
    mobilenet = next((r for r in speed if r["model"] == "MobileNetV2"), None)
    if mobilenet:
        bound = 2 * mobilenet["wall_s"] / params["MobileNetV2"] * 1e6
        ax.axhline(bound, color="gray", linestyle="--", label="2x MobileNetV2 (issue 21)")
    ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="wall µs per parameter (2 cores)",
           title="Data-aware --target-bpw compression time per parameter")  # fmt: skip
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _silero_cell(row: dict[str, Any]) -> str:
    if row.get("silero_p99_dp") is None:
        return _fmt(row["silero_max_dp"], ".4f")
    return f"{row['silero_max_dp']:.4f} / {row['silero_p99_dp']:.4f}"


def render_anchors(anchors: dict[str, dict[str, float]]) -> list[str]:
    """The Silero sensitivity table: what float16 rounding alone costs, the floor under any codebook's Δp."""
    if not anchors:
        return []
    lines = [
        "",
        "## Silero: how far from 0.02 float16 alone is",
        "",
        "Every float weight of 1024 elements or more rounded to float16 (what onnxpq's codebooks store),",
        "nothing else changed: Δp over the same held-out streams (`--silero-anchors`).",
        "",
        "| variant | Δp max | Δp p99 | Δp mean |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {k} | {v['max']:.4f} | {v['p99']:.4f} | {v['mean']:.6f} |" for k, v in anchors.items()]
    return lines


def _bound(row: dict[str, Any]) -> str:
    """Issue 21's memory bound for this row, the onnxruntime session's peak plus 1 GiB; empty when not measured."""
    session = row.get("ort_session_mib")
    return "-" if session is None else f"{session + 1024:.0f}"


def render(rows: list[dict[str, Any]], meta: dict[str, Any], anchors: dict[str, dict[str, float]]) -> str:
    """docs/ZOO.md: how the rows were produced, one table row per compression, then the failures in full."""
    lines = [
        "# The zoo: architectures onnxpq was not tuned on",
        "",
        "Generated by `tools/bench_zoo.py` (models and data: `tools/zoo.py`; see its docstring). Each row is",
        "one `onnxpq compress` in its own niced process on the shared 2-core machine, so wall times are noisy;",
        "CPU s and µs/parameter are the child's user + system time, peak RSS its `ru_maxrss` (`os.wait4`:",
        "the largest single process), tree RSS the peak of the summed RSS of the child and its workers",
        "(sampled every 0.2 s, so a lower bound), bound issue 21's: the peak RSS of an onnxruntime session of",
        "the original (`validate.measure_load`) plus 1 GiB (both columns empty in rows measured before them);",
        "bits/weight is PQF's, over all parameters;",
        "cosine and top-1 agreement are the worst output's, on the held-out set against the original;",
        "Silero's Δp is max |p_compressed − p_original| over held-out speech and noise",
        f"(issue 19 asks for ≤ {SILERO_TOLERANCE}).",
        "",
        f"Last run: {meta['date']}, commit {meta['commit']}, command `{meta['command']}`.",
        "Each row's own command is in docs/zoo.json; every child ran under `nice -n 10` with its address",
        "space capped (`--memory-limit-gb`, default 12), while other jobs shared the two cores.",
        "",
        *speed_text(speed_rows()),
        "",
        "Data: inputs with a fixed shape that is not a sample axis are stored once at that shape (Silero's",
        "rank-0 `sr` = 16000, the sequence variant's zero `h`/`c`, `scalar_input`'s rank-0 `gain`,",
        "`multi_input`'s `s[64]`). Silero's `state` [2, batch, 128] holds, on its batch axis, the state each",
        "frame met when its stream was run frame by frame (rows at 0.4.0 on; before, a zero state); the",
        "OpenVINO variant declares that axis as a fixed 1 and got a zero state until rule 4 took fixed-1 axes",
        "(its rows before this change used the zero state); everything else has its samples on axis 0.",
        "",
        "Rows are merged across runs: `commit` says which code measured each (`< 806bbc5` for rows measured",
        "before rows recorded it, on the tree of that morning: rerun them before quoting them).",
        "",
        "| model | size | bpw target | extra | status | wall s | CPU s | CPU µs/param | peak RSS MiB "
        "| tree RSS MiB | bound MiB | params "
        "| bits/weight | cosine | top-1 | folded | checker | Silero Δp max / p99 | commit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
        "| --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {'small' if r['small'] else 'full'} | {r['budget']:g} | {r['extra'] or '-'} "
            f"| {status(r)} | {_fmt(r['wall_s'], '.0f')} | {_fmt(r.get('cpu_s'), '.0f')} "
            f"| {_fmt(r['us_per_parameter'] if r.get('cpu_s') else None, '.1f')} "
            f"| {_fmt(r['peak_rss_mib'], '.0f')} | {_fmt(r.get('tree_peak_rss_mib'), '.0f')} | {_bound(r)} "
            f"| {r['parameters']:,} | {_fmt(r['bits_per_weight'], '.3f')} "
            f"| {_fmt(r['cosine'], '.4f')} | {_fmt(r['top1_agreement'], '.3f')} | {_fmt(r['decode_folded'], '')} "
            f"| {'ok' if r['checker'] == 'ok' else _fmt(r['checker'] and 'FAIL', '')} "
            f"| {_silero_cell(r)} | {r.get('commit') or '< 806bbc5'} |"
        )
    lines += render_anchors(anchors)
    failures = [r for r in rows if status(r) != "ok"]
    if failures:
        lines += ["", "## Failures", ""]
        for r in failures:
            detail = r["error"] or (r["checker"] if r["checker"] != "ok" else f"Silero Δp {r['silero_max_dp']}")
            lines.append(f"- **{r['model']}** ({'small' if r['small'] else 'full'}, {r['budget']:g} bpw): {detail}")
            lines.append(f"  `{r['command']}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", metavar="MODEL", help="default: the whole zoo")
    parser.add_argument("--small", action="store_true", help="the reduced-width zoo (CI sizes)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[2.5, 4.0], help="--target-bpw values")
    parser.add_argument("--extra", default="", help='extra compress flags, e.g. "--permute --sequential 2"')
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a child is killed")
    parser.add_argument("--memory-limit-gb", type=float, default=12, help="address-space cap of each child")
    parser.add_argument("--silero-anchors", action="store_true", help="measure Silero's float16 floor, no compress")
    parser.add_argument("--render", action="store_true", help="only redraw docs/ZOO.md and the plot from zoo.json")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models) - set(zoo.MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(zoo.MODELS)}")
    results = load_results()
    anchors = results.get("silero_anchors", {})
    if args.render:  # after a speed run: the text and the plot quote its rows
        (DOCS / "ZOO.md").write_text(render(results["rows"], results["meta"], anchors))
        plot(results["rows"], PLOT)
        return 0
    if args.silero_anchors:
        for name in [m for m in args.models or zoo.MODELS if m in zoo.SILERO_VARIANTS]:
            anchors[name] = silero_anchors(name, zoo.build(name, small=True))
            print(name, anchors[name], flush=True)
        save(results.get("rows", []), anchors, argv)
        return 0
    new = []
    origin = results_store.provenance(
        "python tools/bench_zoo.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    )
    for budget in args.budgets:  # every model at the first budget before any at the second: coverage first
        for name in args.models or zoo.MODELS:
            row = compress(zoo.build(name, args.small), name, budget, args)
            row.commit = results_store.commit_label()
            new.append(row)
            print(
                f"{name:26s} {budget:4g} bpw  exit {row.exit_code}  {row.wall_s:7.1f} s  {row.cpu_s:7.1f} s CPU  "
                f"{row.peak_rss_mib:7.0f} MiB  "
                f"bpw {_fmt(row.bits_per_weight, '.3f')}  cos {_fmt(row.cosine, '.4f')}  "
                f"top1 {_fmt(row.top1_agreement, '.3f')}  {row.error or row.checker}",
                flush=True,
            )
            save(merge(results.get("rows", []), new), anchors, argv)
            results_store.append([zoo_result(row, origin)])
    results_store.main([])
    return 0


def zoo_result(row: Row, origin: dict[str, Any]) -> dict[str, Any]:
    """A zoo row as docs/results.jsonl keeps it: suite ``zoo``, the model as the task, the flags as the method."""
    fields = {k: v for k, v in asdict(row).items() if k not in ("model", "commit", "command", "budget", "extra")}
    method = f"--target-bpw {row.budget:g}" + (f" {row.extra}" if row.extra else "")
    size = "small" if row.small else "full"
    return {"suite": "zoo", "task": f"{row.model} ({size})", "method": method, "target_bpw": row.budget,
            "status": status(asdict(row)), **fields, **origin}  # fmt: skip


def save(rows: list[dict[str, Any]], anchors: dict[str, dict[str, float]], argv: list[str] | None) -> None:
    """Write docs/zoo.json and re-render docs/ZOO.md and the plot from it."""
    meta = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": results_store.commit_label(),
        "command": "python tools/bench_zoo.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
    }
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows, "silero_anchors": anchors}, indent=1) + "\n")
    (DOCS / "ZOO.md").write_text(render(rows, meta, anchors))
    plot(rows, PLOT)


if __name__ == "__main__":
    raise SystemExit(main())
