"""The quantization pass: cut each selected weight into subvectors and learn its codebook."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from tqdm.auto import tqdm

from onnxpq.config import CompressConfig
from onnxpq.encode import QuantizedWeight
from onnxpq.graph import constant_tensors
from onnxpq.kmeans import kmeans
from onnxpq.selection import Candidate

__all__ = ["LayerError", "layer_rng", "quantize_weights"]


@dataclass(frozen=True)
class LayerError:
    """How far a decoded weight is from the original, as stored (fp16 codebook included)."""

    sqnr_db: float
    rel_l2: float


def layer_rng(seed: int, weight: str) -> np.random.Generator:
    """One generator per weight, derived from the run seed and the weight's name.

    Results then do not depend on the order layers are processed in, so a
    parallel run gives the same bytes as a serial one.
    """
    return np.random.default_rng([seed, zlib.crc32(weight.encode())])


def weight_error(original: np.ndarray, decoded: np.ndarray) -> LayerError:
    """Signal-to-quantization-noise ratio of a weight, in dB, and its relative L2 error."""
    signal = float(np.sum(original.astype(np.float64) ** 2))
    noise = float(np.sum((original.astype(np.float64) - decoded) ** 2))
    if noise == 0.0:
        return LayerError(float("inf"), 0.0)
    if signal == 0.0:
        return LayerError(float("-inf"), float("inf"))
    return LayerError(10.0 * np.log10(signal / noise), float(np.sqrt(noise / signal)))


def quantize_weight(array: np.ndarray, candidate: Candidate, config: CompressConfig) -> QuantizedWeight:
    """k-means on the weight's contiguous d-blocks (the layout ``selection`` chose)."""
    subvectors = array.astype(np.float32).reshape(-1, candidate.subvector_dim)
    codebook = kmeans(
        subvectors, candidate.n_codewords, n_iter=config.kmeans_iters, rng=layer_rng(config.seed, candidate.name)
    )
    return QuantizedWeight(candidate, codebook)


def decoded_weight(q: QuantizedWeight) -> np.ndarray:
    """The weight onnxruntime will see: fp16 codewords gathered by the codes, in the weight's shape."""
    table = q.codebook.centroids.astype(np.float16).astype(np.float32)
    return table[q.codebook.codes].reshape(q.candidate.shape)


def quantize_weights(
    model: onnx.ModelProto, candidates: Sequence[Candidate], config: CompressConfig, *, progress: bool = True
) -> tuple[list[QuantizedWeight], dict[str, LayerError]]:
    """Quantize every compressible candidate; return the codebooks and each layer's weight error."""
    constants = constant_tensors(model.graph)
    todo = [c for c in candidates if c.compressed]
    quantized, errors = [], {}
    for cand in tqdm(todo, desc="quantize", unit="layer", disable=not progress, leave=False):
        array = constants[cand.name].to_array()
        q = quantize_weight(array, cand, config)
        quantized.append(q)
        errors[cand.name] = weight_error(array, decoded_weight(q))
    return quantized, errors
