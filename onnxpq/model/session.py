"""onnxruntime sessions: the one place onnxpq opens them (CPU provider, warnings and info silenced, since
the runs here are onnxpq's own probes and a user reads onnxpq's messages, not onnxruntime's)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import numpy as np
import onnxruntime as ort

__all__ = ["run_feeds", "session"]


def session(
    model: str | os.PathLike[str] | bytes,
    *,
    level: ort.GraphOptimizationLevel | None = None,
    optimized_path: str | None = None,
) -> ort.InferenceSession:
    """A CPU session on a model file or serialized bytes; ``level`` and ``optimized_path`` let validation see
    what onnxruntime's optimizer made of the graph."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if level is not None:
        options.graph_optimization_level = level
    if optimized_path is not None:
        options.optimized_model_filepath = optimized_path
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_feeds(sess: ort.InferenceSession, feeds: Iterable[Mapping[str, np.ndarray]]) -> list[np.ndarray]:
    """All outputs of an open session over a sequence of feeds, concatenated along the sample axis
    (stacked where an output is a scalar per run)."""
    names = [o.name for o in sess.get_outputs()]
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for feed in feeds:
        for i, out in enumerate(sess.run(names, dict(feed))):
            parts[i].append(np.asarray(out))
    return [np.concatenate(p) if p[0].ndim else np.stack(p) for p in parts]
