"""onnxruntime sessions: the one place onnxpq opens them (CPU provider, warnings and info silenced, since
the runs here are onnxpq's own probes and a user reads onnxpq's messages, not onnxruntime's)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import numpy as np
import onnxruntime as ort

from onnxpq.heap import trim_heap

__all__ = ["run_feeds", "session", "weights_file"]


def session(
    model: str | os.PathLike[str] | bytes,
    *,
    level: ort.GraphOptimizationLevel | None = None,
    optimized_path: str | None = None,
    prepack: bool = True,
    arena: bool = True,
) -> ort.InferenceSession:
    """A CPU session on a model file or serialized bytes; ``level`` and ``optimized_path`` let validation see
    what onnxruntime's optimizer made of the graph.

    ``prepack=False`` for a session that runs a few batches once (the statistics pass): onnxruntime's packed
    copies of the weights took BERT-base's session from 427 to 636 MiB, and without them a batch ran 3 %
    slower.

    ``arena=False`` for a session that waits while others run: onnxruntime's arena keeps the memory of the
    session's largest run until the session is gone; without it each run gives its memory back.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = arena
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if level is not None:
        options.graph_optimization_level = level
    if optimized_path is not None:
        options.optimized_model_filepath = optimized_path
        # Weights go to a file beside it: the callers read the optimized graph, and loading a BERT's folded
        # weights back from it held a second copy of them.
        weights = weights_file(optimized_path)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", weights)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    source = model if isinstance(model, bytes) else str(model)
    sess = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    # onnxruntime's Python wrapper keeps serialized bytes for the session's whole life, only to rebuild the
    # session on other providers (``set_providers``), which onnxpq never does. Letting go of them frees a copy
    # of every weight: on a 108 M-parameter BERT, 434 MB of the statistics pass, whose probe is built from bytes.
    sess._model_bytes = None
    trim_heap()  # building parsed the model and copied every weight; glibc keeps much of what that freed
    return sess


def weights_file(optimized_path: str | os.PathLike[str]) -> str:
    """The file, beside an optimized model, that ``session`` writes its weights to: named after the model, so
    two optimized models in one folder keep their own."""
    return f"{os.path.basename(optimized_path)}.weights"


def run_feeds(sess: ort.InferenceSession, feeds: Iterable[Mapping[str, np.ndarray]]) -> list[np.ndarray]:
    """All outputs of an open session over a sequence of feeds, concatenated along the sample axis
    (stacked where an output is a scalar per run)."""
    names = [o.name for o in sess.get_outputs()]
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for feed in feeds:
        for i, out in enumerate(sess.run(names, dict(feed))):
            parts[i].append(np.asarray(out))
    return [np.concatenate(p) if p[0].ndim else np.stack(p) for p in parts]
