"""``OnnxPQCompression``: onnxpq as a pass of Microsoft Olive workflows (``pip install 'onnxpq[olive]'``).

Olive finds a pass through the package config it is given, not through entry points: ``PACKAGE_CONFIG``
(``olive_config.json`` beside this module) registers this one, and Olive reads only that file, so a workflow
that also uses Olive's own passes (``OnnxConversion`` before this one, say) needs ``package_config()``, Olive's
file with this pass added (``python -m onnxpq.olive_pass`` prints it). See docs/OLIVE.md.

The pass's options are ``CompressConfig``'s, generated from ``config.COMPRESS`` as the command line's are, so a
new setting reaches Olive workflows without an edit here. Olive imports stay in this module: the rest of
onnxpq runs without Olive installed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

try:
    from olive.common.config_utils import validate_config
    from olive.data.config import DataConfig
    from olive.hardware.accelerator import AcceleratorSpec
    from olive.model import ONNXModelHandler
    from olive.model.utils import resolve_onnx_path
    from olive.package_config import OlivePackageConfig
    from olive.passes import Pass
    from olive.passes.pass_config import BasePassConfig, PassConfigParam
    from olive.resource_path import LocalFolder
except ImportError as err:
    raise ImportError(f"onnxpq's Olive pass needs Microsoft Olive: pip install 'onnxpq[olive]' ({err})") from err

from onnxpq.config import AUTO, COMPRESS, CompressConfig, FinetuneConfig, Setting
from onnxpq.errors import ConfigError
from onnxpq.pipeline import ValidationSettings, compress
from onnxpq.validate import METRICS

__all__ = ["PACKAGE_CONFIG", "REPORT_NAME", "OnnxPQCompression", "compress_config", "package_config"]

#: The Olive package config that registers ``OnnxPQCompression`` (``olive run --package-config``).
PACKAGE_CONFIG = Path(__file__).with_name("olive_config.json")
#: The report's name in the output model's folder. Olive renames the model (``model.onnx`` in the output
#: folder), so the report gets a fixed name rather than the command line's ``OUT.report.json``.
REPORT_NAME = "onnxpq_report.json"
#: Gate metrics the pass accepts: ``accuracy`` needs class labels, which Olive's calibration readers drop;
#: Olive's evaluator measures accuracy instead.
GATE_METRICS = tuple(m for m in METRICS if m != "accuracy")

_HINTS = get_type_hints(CompressConfig)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(CompressConfig)}
_FINETUNE_FIELDS = frozenset(f.name for f in dataclasses.fields(FinetuneConfig))


def _param_type(setting: Setting) -> Any:
    """The type Olive validates a setting's JSON value with, so that a wrong value fails when the workflow is
    read rather than after the model is loaded: tuples as lists (JSON has none), choices and ``auto`` as
    literals."""
    if setting.kind is tuple:
        item = get_args(_HINTS[setting.field])[0]
        kind: Any = list[item]
    elif setting.choices is not None:
        kind = Literal[setting.choices]
    else:
        kind = setting.kind
    if setting.auto:
        kind = kind | Literal[AUTO]
    return kind | None if _DEFAULTS[setting.field] is None else kind


def _description(setting: Setting) -> str:
    """The setting's help, with what the JSON schema cannot say: its bounds, what a null default means, and the
    command-line flag that documents it further."""
    parts = [setting.help]
    if setting.low is not None or setting.high is not None:
        parts.append(f"{setting.bounds}{setting.unit}")
    if setting.default_text is not None and _DEFAULTS[setting.field] is None:
        parts.append(f"default: {setting.default_text}")
    if setting.flags:
        parts.append("onnxpq compress " + next(f for f in setting.flags if f.startswith("--")))
    return "; ".join(parts)


def _setting_param(setting: Setting) -> PassConfigParam:
    """One ``CompressConfig`` setting as an Olive pass option, with onnxpq's default (tuples as lists)."""
    default = _DEFAULTS[setting.field]
    return PassConfigParam(
        type_=_param_type(setting),
        default_value=list(default) if isinstance(default, tuple) else default,
        description=_description(setting),
    )


def _pass_params() -> dict[str, PassConfigParam]:
    """The options that are not ``CompressConfig``'s: where the samples come from, and the validation."""
    return {
        "data_config": PassConfigParam(
            type_=DataConfig | dict,
            description="Olive data config of the calibration samples, read through Olive's calibration dataloader; "
            "each layer is quantized to minimise its output error on them, and they are the validation samples "
            "unless validation_data_config is given. None: data-free quantization, validated on synthetic inputs.",
        ),
        "validation_data_config": PassConfigParam(
            type_=DataConfig | dict,
            description="Olive data config of held-out samples on which the compressed model is compared with the "
            "original (report's validation section); default: the calibration samples.",
        ),
        "validation": PassConfigParam(
            type_=bool,
            default_value=True,
            description="Compare the compressed model with the original; False skips it (and the gate).",
        ),
        "metric": PassConfigParam(
            type_=Literal[GATE_METRICS] | None,
            default_value=None,
            description="Gate metric: top1 (agreement), kl, cosine, rel_l2 or max_abs; default: top1 for class "
            "scores, else cosine. For accuracy against labels use Olive's evaluator.",
        ),
        "max_degradation": PassConfigParam(
            type_=float | None,
            default_value=None,
            description="Fail the pass when the metric degrades by more than this (needed by target_bpw 'auto').",
        ),
        "finetune": PassConfigParam(
            type_=bool | dict[str, Any],
            default_value=False,
            description="Distil the original into the compressed model on the calibration samples (needs torch): "
            f"true, or FinetuneConfig's fields as a dict ({', '.join(sorted(_FINETUNE_FIELDS))}).",
        ),
    }


def _finetune(value: bool | dict[str, Any]) -> FinetuneConfig | None:
    """The ``finetune`` option as a ``FinetuneConfig``: off, the defaults, or the fields given (checked)."""
    if not isinstance(value, dict):
        return FinetuneConfig() if value else None
    unknown = sorted(set(value) - _FINETUNE_FIELDS)
    if unknown:
        known = ", ".join(sorted(_FINETUNE_FIELDS))
        raise ConfigError(f"finetune: unknown field(s) {', '.join(unknown)}; choose from {known}")
    return FinetuneConfig(**value)


def compress_config(config: BasePassConfig) -> CompressConfig:
    """The ``CompressConfig`` of a pass config. Olive accepts null for every option, so null means onnxpq's
    default; lists become the tuples ``CompressConfig`` holds. Its checks raise ``ConfigError``."""
    values: dict[str, Any] = {}
    for setting in COMPRESS:
        value = getattr(config, setting.field)
        if value is not None:
            values[setting.field] = tuple(value) if setting.kind is tuple else value
    return CompressConfig(**values, finetune=_finetune(config.finetune))


def _reader(data_config: DataConfig | dict | None, model: ONNXModelHandler) -> Any:
    """The samples of an Olive data config as an onnxruntime calibration reader, which onnxpq reads like any
    other: Olive's own calibration dataloader, which turns its batches into numpy feeds named and typed by the
    model's inputs, as Olive's static quantization pass reads its samples."""
    if data_config is None:
        return None
    container = validate_config(data_config, DataConfig).to_data_container()
    return container.create_calibration_dataloader(model_path=model.model_path, io_config=model.io_config)


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    """The report's numbers worth keeping with the model in Olive's model config: sizes, fidelity, the gate and
    the warnings; the whole report is ``REPORT_NAME`` beside the model."""
    validation = report["validation"]
    if validation is not None:
        validation = {k: validation.get(k) for k in ("n_samples", "outputs", "gate")}
    return {
        "report": REPORT_NAME,
        "files": report["files"],
        "pqf": report["pqf"],
        "validation": validation,
        "warnings": report["warnings"],
    }


class OnnxPQCompression(Pass):
    """Compress an ONNX model's weights with product quantization (onnxpq): codebooks and indices that plain
    onnxruntime decodes at load time, at 1-4 bits per weight.

    The output folder holds the model and onnxpq's report (``REPORT_NAME``, also listed in the model's
    ``additional_files`` so later passes carry it along); the model attribute ``onnxpq`` holds the report's
    sizes and validation metrics. A failed accuracy gate fails the pass.
    """

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        return {**{s.field: _setting_param(s) for s in COMPRESS}, **_pass_params()}

    def _run_for_config(
        self, model: ONNXModelHandler, config: BasePassConfig, output_model_path: str
    ) -> ONNXModelHandler:
        if not isinstance(model, ONNXModelHandler):
            raise ConfigError(f"OnnxPQCompression compresses ONNX models, not {type(model).__name__}")
        output = Path(resolve_onnx_path(output_model_path, Path(model.model_path).name))
        validation = ValidationSettings(
            enabled=config.validation,
            data=_reader(config.validation_data_config, model),
            metric=config.metric,
            max_degradation=config.max_degradation,
            measure=False,  # load time and latency in fresh processes: Olive's evaluator measures those
        )
        report_file = output.with_name(REPORT_NAME)
        compress(
            model.model_path,
            output,
            compress_config(config),
            calibration=_reader(config.data_config, model),
            validation=validation,
            force=True,  # the folder is Olive's cache entry for this run: a failed earlier try may have left files
            report_path=report_file,
        )
        report = json.loads(report_file.read_text())  # the JSON-safe form (no NaN), as the user reads it
        attributes = {**(model.model_attributes or {}), "onnxpq": _summary(report)}
        attributes["additional_files"] = sorted({*attributes.get("additional_files", []), str(report_file)})
        return ONNXModelHandler(
            model_path=LocalFolder({"path": output.parent}),
            onnx_file_name=output.name,
            inference_settings=model.inference_settings,
            use_ort_extensions=model.use_ort_extensions,
            model_attributes=attributes,
        )


def package_config() -> dict[str, Any]:
    """Olive's default package config with ``OnnxPQCompression`` added, for workflows that mix it with Olive's
    passes: Olive reads one package config, so ``PACKAGE_CONFIG`` alone hides Olive's own passes."""
    merged = json.loads(Path(OlivePackageConfig.get_default_config_path()).read_text())
    merged["passes"].update(json.loads(PACKAGE_CONFIG.read_text())["passes"])
    return merged


if __name__ == "__main__":
    print(json.dumps(package_config(), indent=2))
