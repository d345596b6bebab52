"""PQF's size model: what a compressed layer and a whole model cost in bits, as the paper counts them
(log2(k)-bit indices plus a float16 codebook per layer, every other float parameter at 32 bits). The bit
allocation budgets with it and the report states it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import onnx

from onnxpq.model.graph import constant_tensors
from onnxpq.model.tensors import FLOAT_TYPES
from onnxpq.quantize.selection import Candidate

__all__ = ["MIB", "float_parameters", "layer_bits", "pqf_sizes"]

MIB = 1024.0 * 1024.0


def _index_bits(k: int) -> int:
    return max(1, math.ceil(math.log2(k)))


def layer_bits(c: Candidate) -> int:
    """PQF accounting of a compressed layer: log2(k)-bit indices plus an fp16 codebook."""
    return c.n_subvectors * _index_bits(c.n_codewords) + c.n_codewords * c.subvector_dim * 16


def float_parameters(model: onnx.ModelProto) -> int:
    """Number of float parameters in the main graph: what bits/weight is counted over."""
    constants = constant_tensors(model.graph).values()
    return sum(math.prod(t.tensor.dims) for t in constants if t.tensor.data_type in FLOAT_TYPES)


def pqf_sizes(model: onnx.ModelProto, candidates: Sequence[Candidate]) -> dict[str, float]:
    """Sizes as PQF counts them: every float parameter at 32 bits unless compressed."""
    total = float_parameters(model)
    done = [c for c in candidates if c.compressed]
    compressed_params = sum(c.size for c in done)
    compressed_bits = sum(layer_bits(c) for c in done)
    total_bits = compressed_bits + 32 * (total - compressed_params)
    return {
        "parameters": total,
        "compressed_parameters": compressed_params,
        "compressible_fraction": compressed_params / total if total else 0.0,
        "original_mib": 32 * total / 8 / MIB,
        "compressed_mib": total_bits / 8 / MIB,
        "ratio": (32 * total) / total_bits if total_bits else 1.0,
        "bits_per_weight_compressed_layers": compressed_bits / compressed_params if compressed_params else 32.0,
        "bits_per_weight_all_parameters": total_bits / total if total else 32.0,
    }
