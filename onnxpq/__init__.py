"""onnxpq: Permute, Quantize and Fine-tune compression for ONNX models, decoded by plain onnxruntime."""

from __future__ import annotations

from onnxpq.config import CompressConfig
from onnxpq.errors import (
    ConfigError,
    InputModelError,
    OnnxpqError,
    OutputPathError,
    UnsupportedGraphError,
    ValidationFailedError,
)
from onnxpq.pipeline import CompressResult, compress
from onnxpq.version import __version__

__all__ = [
    "CompressConfig",
    "CompressResult",
    "ConfigError",
    "InputModelError",
    "OnnxpqError",
    "OutputPathError",
    "UnsupportedGraphError",
    "ValidationFailedError",
    "__version__",
    "compress",
]
