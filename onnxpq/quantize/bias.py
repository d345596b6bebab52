"""Bias correction: find where each layer's bias lives, and fold the quantization's mean output shift into it.

Quantizing W shifts every output unit's mean by μᵀ(w - ŵ), μ being the mean
input. A bias that only this layer reads can absorb that shift exactly, for
free: it stays a float vector of the same size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxpq.model.graph import ConstantTensor, attributes, constant_tensors, display_name, readers
from onnxpq.model.tensors import FLOAT_TYPES
from onnxpq.operators import operator
from onnxpq.quantize.layer import LayerResult
from onnxpq.quantize.selection import Candidate

__all__ = ["BiasTarget", "bias_targets", "result_biases"]


@dataclass(frozen=True)
class BiasTarget:
    """The constant holding a layer's per-output bias, and what one unit of output shift is in its units."""

    tensor: str
    scale: float


def _target(
    node: onnx.NodeProto,
    units: int,
    constants: Mapping[str, ConstantTensor],
    by_tensor: Mapping[str, list[onnx.NodeProto]],
) -> BiasTarget | None:
    """The bias of a node where the operator registry says it lives: an input (Conv's and Gemm's input 2, scaled
    by Gemm's alpha/beta) or the constant operand of the single Add right after the node (MatMul)."""
    op = operator(node.op_type)
    name, scale = None, 1.0
    if op is None:
        return None
    if op.bias_input is not None and len(node.input) > op.bias_input and node.input[op.bias_input]:
        name, scale = node.input[op.bias_input], op.bias_scale(attributes(node))
    elif op.bias_after_add:
        after = by_tensor.get(node.output[0], [])
        if len(after) == 1 and after[0].op_type == "Add":
            name = next((i for i in after[0].input if i != node.output[0]), None)
    if name is None or name not in constants or len(by_tensor.get(name, [])) != 1 or scale == 0.0:
        return None
    tensor = constants[name].tensor
    dims = [int(d) for d in tensor.dims]
    if tensor.data_type not in FLOAT_TYPES or int(np.prod(dims)) != units or (dims and dims[-1] != units):
        return None
    return BiasTarget(name, scale)


def bias_targets(model: onnx.ModelProto, candidates: Sequence[Candidate]) -> dict[str, BiasTarget]:
    """For each single-use Conv/Gemm/MatMul weight, the bias that can absorb its mean output shift."""
    graph = model.graph
    nodes = {display_name(n, i): n for i, n in enumerate(graph.node)}
    by_tensor = readers(graph)
    constants = constant_tensors(graph)
    compressed = {c.name for c in candidates if c.compressed}
    out = {}
    for c in candidates:
        if not c.compressed or len(c.uses) != 1 or c.uses[0].input_index != 1 or c.uses[0].in_subgraph:
            continue
        units = c.shape[-1] if c.strided else c.shape[0]
        target = _target(nodes[c.uses[0].node], units, constants, by_tensor)
        if target is not None and target.tensor not in compressed:
            out[c.name] = target
    return out


def result_biases(
    model: onnx.ModelProto, targets: Mapping[str, BiasTarget], results: Mapping[str, LayerResult]
) -> dict[str, np.ndarray]:
    """New bias values: the old ones plus each layer's mean output shift, in the bias's own dtype and shape. Only
    a layer quantized with bias correction measured a shift, so only those have (and need) a target."""
    constants = constant_tensors(model.graph)
    out = {}
    for weight, result in results.items():
        if result.shift is None:
            continue
        target = targets[weight]
        old = constants[target.tensor].to_array()
        new = old.astype(np.float64) + (result.shift * target.scale).reshape(old.shape)
        out[target.tensor] = new.astype(old.dtype)
    return out
