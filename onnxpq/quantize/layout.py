"""How a weight maps to the matrix the quantizers work on, and back.

Every quantizer sees one matrix ``U`` of shape (units, R): a row per output
unit (a Conv filter, a Gemm/MatMul output column), its R input weights ordered
so that subvector j is ``U[:, j*d:(j+1)*d]``. Codes are stored in ``U``'s row
order (unit, position). The layer statistics ``H`` (see ``stats``) use the same
column order, so the output error of a unit is ``(u - û)ᵀ H (u - û)``.

Weights with no unit structure onnxpq understands (Gather tables, batched
MatMul weights, ConvTranspose, Einsum operands, LSTM/GRU/RNN W and R) still get a ``U``: their rows as ``selection``
cut them. Only the data-free quantizer is used on those.
"""

from __future__ import annotations

import math

import numpy as np

from onnxpq.operators import operator
from onnxpq.quantize.selection import Candidate

__all__ = ["data_aware", "input_order", "unit_matrix", "weight_from_units"]


def data_aware(c: Candidate) -> bool:
    """Whether ``U``'s rows are output units whose columns are the inputs of one node.

    True where the operator registry gives the weight statistics: Conv (any group count), 2-D Gemm, MatMul and
    FusedMatMul weights of the main graph, and the weights W and R of LSTM/GRU/RNN: W multiplies every time step's
    input x_t and R the previous hidden state h_{t-1}, so the gate pre-activations'
    error is ‖X(W - Ŵ)‖² with X the node's input sequence (and the hidden states
    its output Y holds, for R), one row per (step, batch). On the zoo's GRU at 2.5
    bits/weight this raised the output cosine from 0.67 (both data-free) to 0.98, on
    its LSTM from 0.96 to 0.99. Weights read inside
    If/Loop/Scan bodies (whose activations a probe of the main graph cannot fetch)
    are quantized data-free.
    """
    if not c.compressed or any(u.in_subgraph for u in c.uses):
        return False
    op = operator(c.kind)
    return op is not None and op.has_statistics(len(c.shape))


def unit_matrix(array: np.ndarray, c: Candidate) -> np.ndarray:
    """The weight as (units, R) float32, columns in subvector order."""
    array = np.asarray(array, dtype=np.float32)
    if c.strided:
        k, n = c.shape
        d = c.subvector_dim
        return array.reshape(d, k // d, n).transpose(2, 1, 0).reshape(n, k)
    return array.reshape(-1, math.prod(c.shape[c.row_axes :]))


def weight_from_units(units: np.ndarray, c: Candidate) -> np.ndarray:
    """Inverse of ``unit_matrix``: the weight in its own shape."""
    if c.strided:
        k, n = c.shape
        d = c.subvector_dim
        return units.reshape(n, k // d, d).transpose(2, 1, 0).reshape(k, n)
    return units.reshape(c.shape)


def input_order(c: Candidate) -> np.ndarray:
    """``order[col]`` = which input of the node feeds column ``col`` of ``U``.

    Identity except for strided weights, whose subvector j gathers inputs
    j, j + K/d, j + 2K/d, ...
    """
    if c.strided:
        k = c.shape[0]
        d = c.subvector_dim
        return np.arange(k).reshape(d, k // d).T.ravel()
    return np.arange(math.prod(c.shape[c.row_axes :]))
