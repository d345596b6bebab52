"""Exception hierarchy: every user-facing failure is an ``OnnxpqError`` with a message that names the problem."""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConfigError",
    "InputModelError",
    "OnnxpqError",
    "OutputPathError",
    "UnsupportedGraphError",
    "ValidationFailedError",
]


class OnnxpqError(Exception):
    """Root of onnxpq's errors; the CLI prints these as one line and exits 2."""


class ConfigError(OnnxpqError, ValueError):
    """An option or option combination is invalid for this model."""


class InputModelError(OnnxpqError):
    """The input file is missing, unreadable or not a valid ONNX model."""


class OutputPathError(OnnxpqError):
    """The output cannot be written where asked (exists, same as input, unwritable)."""


class UnsupportedGraphError(OnnxpqError):
    """The graph uses something onnxpq cannot handle safely."""


class ValidationFailedError(OnnxpqError):
    """The compressed model failed the user's accuracy gate; the CLI exits 1.

    ``report`` is the run's report when a compression failed the gate (None from ``validate``): a caller
    prints or inspects it without reading back the file it was published to. ``model`` is the compressed
    ``onnx.ModelProto`` of an in-memory compression, which wrote no file to keep it in.
    """

    def __init__(self, message: str, report: dict | None = None, model: Any = None) -> None:
        super().__init__(message)
        self.report = report
        self.model = model
