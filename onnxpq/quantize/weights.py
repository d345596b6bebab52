"""The quantization pass over a model: every selected weight through the layer quantizer, independently
(so in any order, in worker processes), or in GPTQ's sequential mode, where each group of layers is fitted
on the statistics of the model whose earlier layers are already quantized.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx
from tqdm.auto import tqdm

from onnxpq.calibration import Dataset
from onnxpq.config import CompressConfig
from onnxpq.model.graph import constant_tensors, display_name, with_constants
from onnxpq.parallel import Workers, map_tasks
from onnxpq.quantize.bias import BiasTarget, result_biases
from onnxpq.quantize.layer import LayerResult, decoded_weight, quantize_layer
from onnxpq.quantize.layout import data_aware
from onnxpq.quantize.selection import Candidate
from onnxpq.quantize.stats import LayerStats, collect_stats

__all__ = ["quantize_sequential", "quantize_weights"]


def quantize_weights(
    model: onnx.ModelProto,
    candidates: Sequence[Candidate],
    config: CompressConfig,
    *,
    stats: Mapping[str, LayerStats] | None = None,
    bias_weights: frozenset[str] = frozenset(),
    progress: bool = True,
    workers: Workers | None = None,
) -> dict[str, LayerResult]:
    """Quantize every compressible candidate, with its statistics when there are some.

    Layers are independent (each has its own seed), so ``workers`` may run them anywhere in any order.
    """
    constants = constant_tensors(model.graph)
    stats = stats or {}
    todo = [c for c in candidates if c.compressed]

    def tasks() -> Iterator[tuple]:
        for cand in todo:  # read lazily: one weight per task in flight, not the whole model
            correct = config.bias_correction and cand.name in bias_weights and cand.name in stats
            yield constants[cand.name].to_array(), cand, config, stats.get(cand.name), correct

    results = map_tasks(
        _quantize_task, tasks(), workers or Workers(), total=len(todo), desc="quantize", progress=progress
    )
    return dict(zip((c.name for c in todo), results, strict=True))


def _quantize_task(
    array: np.ndarray, candidate: Candidate, config: CompressConfig, stats: LayerStats | None, correct: bool
) -> LayerResult:
    return quantize_layer(array, candidate, config, stats, correct_bias=correct)


def _graph_order(model: onnx.ModelProto, candidates: Sequence[Candidate]) -> list[Candidate]:
    """Candidates sorted by the position of the first node that reads them."""
    position = {display_name(n, i): i for i, n in enumerate(model.graph.node)}
    return sorted(candidates, key=lambda c: min(position.get(u.node, len(position)) for u in c.uses))


def quantize_sequential(
    model: onnx.ModelProto,
    candidates: Sequence[Candidate],
    config: CompressConfig,
    calibration: Dataset,
    targets: Mapping[str, BiasTarget],
    *,
    first_stats: Mapping[str, LayerStats] | None = None,
    progress: bool = True,
) -> dict[str, LayerResult]:
    """GPTQ/BGD's sequential mode: each group of layers is calibrated on the model whose earlier layers are quantized.

    The data-aware layers are split, in graph order, into ``config.sequential``
    groups; before each group the statistics are collected again on a copy of
    the model holding the decoded weights and corrected biases so far, so each
    layer is fitted to the inputs it will really see. (Aiming each layer at the
    original model's output instead, E[x x₀ᵀ] corrections as in GPTAQ, fitted the
    calibration images better but generalised worse on MobileNetV2; not kept.)
    ``first_stats``, statistics already collected on the original model, spare the first pass.
    """
    todo = [c for c in candidates if c.compressed]
    ordered = _graph_order(model, [c for c in todo if data_aware(c)])
    current = model  # each group's decoded weights go into a new model (``with_constants``), never into this one
    results: dict[str, LayerResult] = {}
    chunks = [list(part) for part in np.array_split(np.array(ordered, dtype=object), config.sequential) if len(part)]
    for index, chunk in enumerate(tqdm(chunks, desc="sequential", unit="group", disable=not progress, leave=False)):
        # Nothing is quantized before the first group: the statistics of the original model hold for it.
        stats = (
            first_stats
            if index == 0 and first_stats is not None
            else collect_stats(
                current, chunk, calibration, memory_mib=config.statistics_memory_mib, rows=config.statistics_rows
            )
        )
        # A group's own weights are still the original ones in ``current``.
        done = quantize_weights(current, chunk, config, stats=stats, bias_weights=frozenset(targets), progress=False)
        results.update(done)
        dense = {c.name: decoded_weight(done[c.name].quantized) for c in chunk}
        current = with_constants(current, {**dense, **result_biases(current, targets, done)})
    rest = [c for c in todo if c.name not in results]
    results.update(quantize_weights(model, rest, config, progress=False))
    return {c.name: results[c.name] for c in todo}
