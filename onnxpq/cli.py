"""Command line: ``onnxpq compress | inspect | validate``. Argument parsing only; the work lives in the passes.

Exit codes: 0 success; 1 accuracy gate failed (model and report kept); 2 anything else that went wrong,
as one line (the traceback too with -v); 128+N when stopped by signal N (130 Ctrl-C, 143 SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onnxpq.calibration import RandomInputs, parse_shapes
from onnxpq.config import (
    AUTO,
    CALIBRATION,
    COMPRESS,
    DEFAULT_FINETUNE_STEPS,
    FINETUNE,
    FINETUNING,
    MIN_ELEMENTS,
    QUANTIZATION,
    WHAT,
    CompressConfig,
    FinetuneConfig,
    Setting,
)
from onnxpq.errors import ConfigError, OnnxpqError, ValidationFailedError
from onnxpq.parallel import Workers
from onnxpq.validate import METRICS
from onnxpq.version import __version__

if TYPE_CHECKING:
    import onnx

__all__ = ["Interrupted", "main", "options_markdown"]


def _jobs(text: str) -> int | None:
    """``--jobs``: a positive count, or ``auto`` (None: ``Workers.resolved`` decides per model)."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of processes nor 'auto'") from None


def _or_auto(kind: type) -> Any:
    """An option type that also takes ``auto`` (a value the run searches for)."""

    def parse(text: str) -> Any:
        if text == AUTO:
            return AUTO
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor 'auto'") from None

    return parse


def _add_setting(group: Any, setting: Setting, default: Any, dest: str) -> None:
    """One config ``Setting`` as an option: flags, type, bounds' help, choices and default all from the table."""
    kwargs: dict[str, Any] = {"dest": dest, "default": default, "help": _setting_help(setting, default)}
    if setting.kind is bool:
        _boolean(group, *setting.flags, **kwargs)
        return
    if setting.kind is tuple:
        kwargs.update(nargs="+", default=list(default))
    else:
        kwargs["type"] = _or_auto(setting.kind) if setting.auto else setting.kind
    if setting.choices is not None:
        kwargs["choices"] = setting.choices
    if setting.metavar is not None:
        kwargs["metavar"] = setting.metavar
    group.add_argument(*setting.flags, **kwargs)


def _boolean(group: Any, *flags: str, **kwargs: Any) -> None:
    """A ``--x/--no-x`` option whose help stays as written: Python 3.10's ``BooleanOptionalAction`` appends
    its own "(default: ...)" to it."""
    action = group.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
    action.help = kwargs.get("help")


def _setting_help(setting: Setting, default: Any) -> str:
    """The table's help with the default and the allowed range, as argparse wants it (``%`` doubled)."""
    text = setting.help
    if setting.low is not None or setting.high is not None:
        text += f"; {setting.bounds}{setting.unit}"
    if setting.default_text is not None:
        text += f" (default: {setting.default_text})"
    elif setting.kind is bool:
        text += f" (default: {'on' if default else 'off'})"
    elif default not in (None, ()):
        text += f" (default: {default:g})" if isinstance(default, float) else f" (default: {default})"
    return text.replace("%", "%%")


def _add_settings(
    groups: dict[str, Any], settings: tuple[Setting, ...], defaults: dict[str, Any], prefix: str = ""
) -> None:
    """Every setting that has flags into its section's group; settings sharing ``exclusive`` go into one
    mutually exclusive group (``--target-bpw`` / ``--target-size``)."""
    exclusive: dict[str, Any] = {}
    for setting in settings:
        if not setting.flags:
            continue
        group = groups[setting.section]
        if setting.exclusive is not None:
            if setting.exclusive not in exclusive:
                exclusive[setting.exclusive] = group.add_mutually_exclusive_group()
            group = exclusive[setting.exclusive]
        _add_setting(group, setting, defaults[setting.field], prefix + setting.field)


def _defaults(config_class: type) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(config_class)}


def _add_compress(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compress", help="compress a model", description="Compress IN into OUT with product quantization."
    )
    p.add_argument("input", type=Path, nargs="?", metavar="IN")
    p.add_argument("output", type=Path, nargs="?", metavar="OUT")
    p.add_argument("--input_model", type=Path, default=None, metavar="IN", help="IN as onnxruntime's tools spell it")
    p.add_argument("--output_model", type=Path, default=None, metavar="OUT", help="OUT as onnxruntime's tools spell it")
    groups = {title: p.add_argument_group(title) for title in (WHAT, QUANTIZATION, CALIBRATION, FINETUNING)}
    _add_calibration_sources(groups[CALIBRATION])
    _add_settings(groups, COMPRESS, _defaults(CompressConfig))
    _add_finetune_switches(groups[FINETUNING])
    _add_settings(groups, FINETUNE, _defaults(FinetuneConfig), prefix="finetune_")
    _add_validation_options(
        p, data_flag="--validation-data", default_data="the calibration data, flagged in the report as optimistic"
    )
    run = p.add_argument_group("where the per-layer work runs (same output bytes either way)")
    run.add_argument(
        "--jobs",
        type=_jobs,
        default=None,
        metavar="N",
        help="local worker processes for the per-layer quantization, the bit allocator's estimates and the "
        "permutation search, or auto (the default: one per usable core on models over 2^20 compressible weights, "
        "as many as the free memory holds)",
    )
    run.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="run on a Ray cluster: 'auto', 'ray://host:10001', or 'local' (needs the distributed extra)",
    )
    out = p.add_argument_group("output")
    _boolean(
        out,
        "--validate",
        default=True,
        help="compare the output with the original in onnxruntime (default: on)",
    )
    _boolean(
        out,
        "--force",
        default=False,
        help="overwrite OUT if it exists (never the input; OUT is written atomically)",
    )
    out.add_argument("--report", type=Path, default=None, help="JSON report path (default: OUT.report.json)")


def _add_calibration_sources(group: Any) -> None:
    """Where the calibration samples come from (not settings: the data is an input of the run)."""
    group.add_argument(
        "--calibration-data",
        "--calibration_data_path",
        dest="calibration_data",
        default=None,
        metavar="PATH",
        help=".npz keyed by input name, .npy, or a test_data_set_* folder: quantize to minimise each layer's "
        "output error on these samples; 'random' for synthetic inputs (not recommended)",
    )
    group.add_argument(
        "--calibration-shapes",
        "--calibration_shapes",
        dest="calibration_shapes",
        default=None,
        metavar="SHAPES",
        help="shapes for synthetic inputs, e.g. input:1x3x224x224,mask:1x128 (with 'random'; real samples "
        "already give every dim)",
    )


def _add_finetune_switches(group: Any) -> None:
    """``--finetune`` itself, the old spelling of ``--no-finetune-mixup``, and the labels file."""
    _boolean(
        group,
        "--finetune",
        default=False,
        help=f"tune codebooks, biases and norms (default: off; {DEFAULT_FINETUNE_STEPS} steps when on)",
    )
    group.add_argument("--finetune-no-mixup", dest="finetune_mixup", action="store_false", help=argparse.SUPPRESS)
    group.add_argument(
        "--calibration-labels",
        type=Path,
        default=None,
        metavar="NPY",
        help="class labels aligned with --calibration-data: adds cross-entropy to the distillation",
    )


def _add_validation_options(p: argparse.ArgumentParser, *, data_flag: str, default_data: str = "random") -> None:
    v = p.add_argument_group("validation")
    v.add_argument(
        data_flag,
        dest="data",
        default=None,
        metavar="PATH",
        help=f".npz keyed by input name, .npy, or a test_data_set_* folder; 'random' for synthetic inputs "
        f"(default: {default_data})",
    )
    v.add_argument(
        "--labels",
        type=Path,
        default=None,
        metavar="NPY",
        help=".npy of class labels aligned with the data: adds accuracy for the first logits output",
    )
    v.add_argument("--max-samples", type=int, default=None, metavar="N", help="compare on at most N samples")
    v.add_argument(
        "--metric",
        choices=METRICS,
        default=None,
        help="gate metric: top1 (agreement), kl (mean KL divergence of the class distributions, nats), cosine, "
        "rel_l2, max_abs, accuracy (needs --labels) (default: top1 for class scores, else cosine)",
    )
    v.add_argument(
        "--max-degradation",
        type=float,
        default=None,
        metavar="X",
        help="fail (exit 1) when the metric degrades by more than X",
    )
    _boolean(
        v,
        "--measure",
        default=True,
        help="measure load time, peak memory and latency of both models (default: on)",
    )


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="list the weights onnxpq would compress",
        description="List candidate weights with node names, shapes and sizes.",
    )
    p.add_argument("input", type=Path, metavar="IN")
    # inspect has no budget: the smallest weight it lists is always the plain default.
    listed = {"op_types": None, "min_elements": str(MIN_ELEMENTS)}
    settings = tuple(dataclasses.replace(x, default_text=listed[x.field] or x.default_text) for x in COMPRESS
                     if x.field in listed)  # fmt: skip
    _add_settings({WHAT: p}, settings, _defaults(CompressConfig))
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--groups",
        action="store_true",
        help="list the permutable channel groups and check them: a random permutation of each must not "
        "change the outputs (onnxruntime, synthetic inputs)",
    )


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate",
        help="compare a compressed model with its original",
        description="Run both models in onnxruntime and gate the degradation.",
    )
    p.add_argument("original", type=Path)
    p.add_argument("compressed", type=Path)
    _add_validation_options(p, data_flag="--data")
    p.add_argument("--report", type=Path, default=None, help="write the validation JSON here")
    p.add_argument("--force", action="store_true", help="overwrite an existing --report file")
    p.add_argument("--seed", type=int, default=0)


def _add_report(sub: argparse._SubParsersAction) -> None:
    """``onnxpq report``: a saved report read again, as the table or as a page of plots."""
    p = sub.add_parser(
        "report",
        help="show a compression report, or draw it as an HTML page",
        description="Print the table of OUT.report.json, or with --html write one self-contained HTML page "
        "(plots embedded) of it.",
    )
    p.add_argument("report_json", type=Path, metavar="REPORT")
    p.add_argument("--html", type=Path, default=None, metavar="PATH", help="write the page here")
    p.add_argument("--force", action="store_true", help="overwrite an existing --html file")


def options_markdown() -> str:
    """``onnxpq compress``'s options as the README's markdown table, one section per option group: rendered from
    the parser itself, so the README says what ``--help`` says (tests/test_cli.py checks they agree)."""
    parser = build_parser()
    compress = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices["compress"]
    lines = ["| option | meaning |", "| --- | --- |"]
    for group in compress._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.help != argparse.SUPPRESS]
        actions = [a for a in actions if a.dest != "help"]
        if not actions:
            continue
        lines.append(f"| **{group.title}** | |")
        for action in actions:
            meaning = (action.help or "").replace("%%", "%").replace("|", "\\|")
            lines.append(f"| {_flags_markdown(action)} | {meaning} |")
    return "\n".join(lines) + "\n"


def _flags_markdown(action: argparse.Action) -> str:
    """``--x METAVAR`` (alias ``--y``), or ``--x`` / ``--no-x`` for a boolean."""
    if isinstance(action, argparse.BooleanOptionalAction):
        return " / ".join(f"`{flag}`" for flag in action.option_strings)
    metavar = action.metavar or (f"{{{','.join(action.choices)}}}" if action.choices else action.dest.upper())
    metavar = str(metavar).replace("|", "\\|") + ("..." if action.nargs == "+" else "")
    short = [f for f in action.option_strings if not f.startswith("--")]
    first, *aliases = [f for f in action.option_strings if f.startswith("--")]
    text = f"`{first} {metavar}`" + (f" (`{short[0]}`)" if short else "")
    return text + (f" (alias {', '.join(f'`{a}`' for a in aliases)})" if aliases else "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxpq", description="Permute, Quantize, Fine-tune for ONNX models.")
    parser.add_argument("--version", action="version", version=f"onnxpq {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_compress(sub)
    _add_inspect(sub)
    _add_validate(sub)
    _add_report(sub)
    return parser


def _settings(args: argparse.Namespace, enabled: bool = True):
    from onnxpq.pipeline import ValidationSettings

    return ValidationSettings(
        enabled=enabled,
        data=args.data,
        labels=args.labels,
        max_samples=args.max_samples,
        metric=args.metric,
        max_degradation=args.max_degradation,
        measure=args.measure,
    )


def _finetune_config(args: argparse.Namespace) -> FinetuneConfig | None:
    """Fine-tuning is on with ``--finetune`` or a step or time budget."""
    if not (args.finetune or args.finetune_steps is not None or args.finetune_time_s is not None):
        return None
    return FinetuneConfig(**{s.field: getattr(args, f"finetune_{s.field}") for s in FINETUNE if s.flags})


def _compress_config(args: argparse.Namespace) -> CompressConfig:
    """The ``CompressConfig`` the options describe, field by field from the settings table."""
    values = {s.field: getattr(args, s.field) for s in COMPRESS if s.flags}
    values.update({s.field: tuple(values[s.field]) for s in COMPRESS if s.flags and s.kind is tuple})
    return CompressConfig(**values, finetune=_finetune_config(args))


def _model_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """IN and OUT from ``--input_model``/``--output_model`` (onnxruntime's spelling) or the positionals, which
    fill, in order, whichever of the two the options leave: ``--input_model a.onnx b.onnx`` writes b.onnx."""
    given = [p for p in (args.input, args.output) if p is not None]
    paths = []
    for option, path in (("--input_model", args.input_model), ("--output_model", args.output_model)):
        if path is None and not given:
            raise ConfigError(f"give the {option.removeprefix('--').split('_')[0]} model: IN OUT, or {option}")
        paths.append(path if path is not None else given.pop(0))
    if given:
        raise ConfigError(f"unexpected extra path {given[0]}: IN and OUT are already given")
    return paths[0], paths[1]


def _compress(args: argparse.Namespace) -> int:
    from onnxpq.pipeline import compress
    from onnxpq.report import format_table

    args.input, args.output = _model_paths(args)  # error messages name the input (``_subject``)
    config = _compress_config(args)
    calibration = args.calibration_data
    if args.calibration_shapes:
        if calibration != "random":
            raise ConfigError(
                "--calibration-shapes only applies to --calibration-data random: real samples already give "
                "every dim, so save them at the shapes you want"
            )
        calibration = RandomInputs(parse_shapes(args.calibration_shapes))
    try:
        result = compress(
            args.input,
            args.output,
            config,
            calibration=calibration,
            calibration_labels=args.calibration_labels,
            validation=_settings(args, args.validate),
            force=args.force,
            report_path=args.report,
            progress=sys.stderr.isatty(),
            workers=Workers(jobs=args.jobs, ray_address=args.ray_address),
        )
    except ValidationFailedError as failed:
        print(format_table(failed.report))
        raise
    print(format_table(result.report))
    print(f"report: {result.report_path}")
    return 0


def _inspect_groups(model) -> int:
    import numpy as np

    from onnxpq.calibration import random_dataset
    from onnxpq.permute.channels import find_groups
    from onnxpq.permute.search import verify_groups

    groups = find_groups(model)
    print(f"{'group':>5} {'channels':>8} {'members':>7} {'consumers':>9}  origin / frozen because")
    for i, g in enumerate(groups):
        note = f"FROZEN: {g.frozen}" if g.frozen else g.origin
        print(f"{i:>5} {g.size:>8} {len(g.members):>7} {len(g.consumers):>9}  {note}")
    error = verify_groups(model, groups, random_dataset(model, 2, np.random.default_rng(0)), np.random.default_rng(1))
    free = sum(not g.frozen for g in groups)
    verdict = "equivalent" if error <= 1e-5 else "NOT EQUIVALENT (please report this model)"
    print(
        f"{free} of {len(groups)} groups free; random permutation of all: max relative difference {error:.2e}, "
        f"{verdict}"
    )
    return 0 if error <= 1e-5 else 1


def _inspect(args: argparse.Namespace) -> int:
    from onnxpq.model.files import check_input_path, load_model
    from onnxpq.model.subgraphs import lift_subgraph_weights
    from onnxpq.quantize.selection import find_candidates
    from onnxpq.report import layer_rows

    check_input_path(args.input)
    if args.groups:
        from onnxpq.pipeline import check_runtime_loads

        model = load_model(args.input)
        check_runtime_loads(args.input)  # the group check runs the model in onnxruntime
        return _inspect_groups(model)
    config = CompressConfig(op_types=tuple(args.op_types), min_elements=args.min_elements, keep_first=False)
    # Lifted as ``compress`` lifts them, so If/Loop/Scan weights are listed under the same names.
    rows = layer_rows(find_candidates(lift_subgraph_weights(load_model(args.input)), config), {})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'node':40} {'weight':40} {'op':13} {'shape':>20} {'elements':>10}  note")
    for r in rows:
        shape = "x".join(str(s) for s in r["shape"])
        print(
            f"{','.join(r['nodes'])[:40]:40} {r['weight'][:40]:40} {r['op_type']:13} {shape:>20} "
            f"{r['elements']:>10}  {r['skip_reason'] or ''}"
        )
    return 0


def _validate(args: argparse.Namespace) -> int:
    from onnxpq.model.files import check_input_path, check_output_path, load_model
    from onnxpq.pipeline import check_runtime_loads, data_files, input_files, prepare_validation, run_validation
    from onnxpq.report import validation_lines, write_json

    for path in (args.original, args.compressed):
        check_input_path(path)
    model, compressed = load_model(args.original), load_model(args.compressed)
    if args.report:
        protected = {
            **input_files(args.original, model),
            **input_files(args.compressed, compressed),
            **data_files((args.data, args.labels)),
        }
        check_output_path(args.report, protected=protected, force=args.force, what="report")
    _check_same_inputs(model, compressed)
    settings = _settings(args)
    data = prepare_validation(model, settings, args.seed)
    for path in (args.original, args.compressed):
        check_runtime_loads(path)
    section, notes = run_validation(args.original, args.compressed, data, settings)
    print("\n".join(validation_lines(section)))
    for note in notes:
        print(f"warning: {note}")
    if args.report:
        write_json(section, args.report)
    failure = (section.get("gate") or {}).get("failure")
    if failure:
        raise ValidationFailedError(failure)
    return 0


def _report(args: argparse.Namespace) -> int:
    """Print the table, or write the HTML page (never over the report itself, nor an existing file unasked)."""
    from onnxpq.html_report import load_report, render_html
    from onnxpq.model.files import check_output_path
    from onnxpq.report import format_table, write_text

    if args.html is not None:
        check_output_path(args.html, protected={args.report_json: "the report"}, force=args.force, what="page")
    report = load_report(args.report_json)
    if args.html is None:
        print(format_table(report))
        return 0
    write_text(render_html(report), args.html)
    print(f"page: {args.html}")
    return 0


def _check_same_inputs(original: onnx.ModelProto, compressed: onnx.ModelProto) -> None:
    """Both models must take the same inputs, or no sample can be fed to both."""
    initializers = [{t.name for t in m.graph.initializer} for m in (original, compressed)]
    names = [
        sorted(i.name for i in m.graph.input if i.name not in inits)
        for m, inits in zip((original, compressed), initializers, strict=True)
    ]
    if names[0] != names[1]:
        raise ConfigError(f"the models take different inputs: original {names[0]}, compressed {names[1]}")


#: Signals that end a run like Ctrl-C does, so the staging folders are removed on the way out.
_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP (or SIGINT), raised where the program is so every ``finally`` cleans up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """Turn the termination signals into ``Interrupted`` for the run, then restore the old handlers.

    After the first signal the others are ignored, so a second one cannot cut the cleanup short.
    A signal the caller ignores (``nohup`` ignores SIGHUP) stays ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in _SIGNALS}

    def interrupt(signum: int, frame: object) -> None:
        for s in _SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    for s, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, interrupt)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _check_floats(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse NaN and infinities for every float option: ``nan`` compares false, so it would switch checks off."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices[args.command]._actions:
        value = getattr(args, action.dest, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{action.option_strings[-1]} {value}: must be a finite number")


def _subject(args: argparse.Namespace) -> str:
    """What an unexpected error is about: the input file of the command."""
    subjects = {"validate": "compressed", "report": "report_json"}
    return f"{getattr(args, subjects.get(args.command, 'input'))}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the only place errors become exit codes.

    0 success; 1 the accuracy gate failed (model and report kept); 2 anything else
    that went wrong, as one line; 128+N when stopped by signal N (130 for Ctrl-C).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("onnxpq").setLevel(logging.DEBUG if args.verbose else logging.INFO)  # what a run says as it goes
    handlers = {"compress": _compress, "inspect": _inspect, "validate": _validate, "report": _report}
    try:
        with warnings.catch_warnings(), _signals_interrupt():
            # The report already lists every warning; Python's own display would print them twice.
            warnings.simplefilter("ignore" if not args.verbose else "default")
            _check_floats(parser, args)
            return handlers[args.command](args)
    except ValidationFailedError as err:
        print(f"onnxpq: {err}", file=sys.stderr)
        return 1
    except OnnxpqError as err:
        return _fail(_one_line(str(err)), args.verbose)
    except KeyboardInterrupt as err:
        signum = err.signum if isinstance(err, Interrupted) else signal.SIGINT
        print(f"onnxpq: interrupted by {signal.Signals(signum).name}; no output was written", file=sys.stderr)
        return 128 + signum
    except BrokenPipeError:
        # The reader of our output went away (``onnxpq inspect m.onnx | head``): as any Unix tool, stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as err:
        where = err.filename or _subject(args)
        return _fail(f"{where}: {_one_line(err.strerror or str(err))}", args.verbose)
    except Exception as err:  # the one boundary: onnx, onnxruntime, numpy, OSError, protobuf, MemoryError...
        detail = _one_line(str(err))
        what = f"{type(err).__name__}: {detail}" if detail else type(err).__name__
        return _fail(f"{_subject(args)}: {what} (unexpected; -v shows where)", args.verbose)


def _fail(line: str, verbose: bool) -> int:
    """Print the error as one line (after the traceback with -v); exit code 2."""
    if verbose:
        traceback.print_exc()
    print(f"onnxpq: error: {line}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
