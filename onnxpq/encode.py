"""Write quantized weights back as standard ONNX: ``Cast(indices) -> Gather(codebook) [-> Reshape]``.

onnxruntime folds this chain into a plain initializer when the session is
created, so the compressed model runs the original's kernels at the original's
speed. Weights of If/Loop/Scan bodies were lifted into the main graph before
(``subgraphs``): their decode chains sit there too, and the bodies read the
decoded weight from the outer scope. The layout is chosen so ``Gather`` already yields the weight's memory
order (no Transpose); at most one Reshape restores the shape.

An embedding table (a weight only ever looked up by row, ``Gather(table, ids)``) skips the
weight's Reshape: the lookups read the [rows, n, d] table and one Reshape of each lookup's
output restores [..., n * d]. Folding a weight's Reshape held about two more copies of the
table at load: with it, MiniLM's session (45 MiB of word embeddings) peaked at 272 MiB
(fp32: 188 MiB); with the Reshape on the looked-up rows instead, at 228 MiB.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxpq.errors import UnsupportedGraphError
from onnxpq.model.graph import (
    attributes,
    constant_tensors,
    opset_version,
    replace_constants,
    value_dims,
    without,
)
from onnxpq.model.subgraphs import ScopedNode, scoped_nodes, value_names
from onnxpq.model.tensors import four_bit_tensor
from onnxpq.quantize.layer import QuantizedWeight

__all__ = [
    "FOLD_LIMIT_BYTES",
    "FOLD_LIMIT_KEY",
    "METADATA_CONFIG",
    "METADATA_VERSION",
    "encode_weights",
    "index_dtype",
    "layer_outputs",
    "pq_name",
    "row_reshapes",
]

METADATA_VERSION = "onnxpq.version"
METADATA_CONFIG = "onnxpq.config"
#: onnxruntime >= 1.27 does not fold node outputs larger than this by default.
FOLD_LIMIT_BYTES = 1 << 30
FOLD_LIMIT_KEY = "optimization.constant_folding_max_output_size_in_bytes"
_ROLES = ("codebook", "indices", "codebook_cast", "indices_int32", "gathered", "shape")


def pq_name(weight: str, role: str) -> str:
    """The one place generated tensor and node names come from: ``<weight>_pq_<role>``."""
    if role not in _ROLES and not role.startswith(("decode_", "rows_")):
        raise ValueError(f"unknown role {role!r}")
    return f"{weight}_pq_{role}"


def index_dtype(n_codewords: int, model: onnx.ModelProto) -> int:
    """UINT4 when 16 codewords suffice and the model may use it (opset >= 21, IR >= 10), else UINT8."""
    if n_codewords <= 16 and opset_version(model) >= 21 and model.ir_version >= 10:
        return onnx.TensorProto.UINT4
    return onnx.TensorProto.UINT8


def _gather_layout(shape: tuple[int, ...], row_axes: int, d: int) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    """(codebook trailing shape, index shape, needs_reshape).

    When the trailing axes of the weight hold exactly d values (a 3x3 kernel with
    d=9), the codebook takes those axes' shape and Gather yields the weight directly.
    """
    for axis in range(row_axes, len(shape)):
        if math.prod(shape[axis:]) == d:
            return shape[axis:], shape[:axis], False
    n_row = math.prod(shape[row_axes:]) // d
    return (d,), (*shape[:row_axes], n_row), True


def _index_tensor(name: str, codes: np.ndarray, shape: tuple[int, ...], dtype: int) -> onnx.TensorProto:
    if dtype == onnx.TensorProto.UINT4:
        return four_bit_tensor(name, dtype, codes.reshape(shape))
    return numpy_helper.from_array(codes.astype(np.uint8).reshape(shape), name)


def _tables(q: QuantizedWeight) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """(fp16 codebook, codes in index layout, Gather axis, needs_reshape) for one weight.

    Codes come in ``layout.unit_matrix`` order, (unit, position). A strided [K, N]
    weight stores its codebook as [d, k] and its indices as [K/d, N]: Gather on
    axis 1 yields [d, K/d, N], which is the weight once reshaped to [K, N].
    """
    cand = q.candidate
    centroids = q.codebook.centroids.astype(np.float16)
    if cand.strided:
        k_in, n = cand.shape
        codes = q.codebook.codes.reshape(n, k_in // cand.subvector_dim).T
        return np.ascontiguousarray(centroids.T), codes, 1, True
    trailing, index_shape, reshape = _gather_layout(cand.shape, cand.row_axes, cand.subvector_dim)
    return centroids.reshape((len(centroids), *trailing)), q.codebook.codes.reshape(index_shape), 0, reshape


def _declared_ranks(graph: onnx.GraphProto) -> dict[str, int]:
    """Ranks onnxruntime enforces: the graph inputs' declared ones and those of constants no input overrides.

    ``value_info`` is left out: a stale annotation would make a lookup's Reshape wrong. So is an
    initializer that is also a graph input without a shape: a caller may feed it at any rank.
    """
    inputs = {i.name for i in graph.input}
    ranks = {name: len(c.tensor.dims) for name, c in constant_tensors(graph).items() if name not in inputs}
    return ranks | {name: len(dims) for name, dims in value_dims(graph.input).items()}


def _scoped_readers(graph: onnx.GraphProto) -> dict[str, list[ScopedNode]]:
    """For each value name, the nodes that read it, in the main graph or in a body that does not shadow it."""
    out: dict[str, list[ScopedNode]] = {}
    for scoped in scoped_nodes(graph):
        for name in dict.fromkeys(scoped.node.input):
            if name not in scoped.hidden:
                out.setdefault(name, []).append(scoped)
    return out


def _row_names(weight: str, j: int) -> tuple[str, str, str]:
    """(looked-up rows, their target shape, the Reshape node) of a weight's ``j``-th lookup."""
    return pq_name(weight, f"rows_{j}"), pq_name(weight, f"rows_shape_{j}"), pq_name(weight, f"rows_reshape_{j}")


def _row_lookups(
    q: QuantizedWeight,
    readers: Sequence[ScopedNode],
    ranks: Mapping[str, int],
    taken: Collection[str],
    outputs: Collection[str],
) -> list[str]:
    """The outputs of the ``Gather(weight, ids)`` nodes that read ``q``'s weight, when they are all its ``readers``.

    Empty when anything else reads it (a tied LM head's MatMul, a body, a graph output), when a
    lookup's index rank is not declared (its Reshape needs it), when the weight has no Reshape
    to move, or when a name the lookups would add is taken.
    """
    cand = q.candidate
    w = cand.name
    needs_reshape = _gather_layout(cand.shape, cand.row_axes, cand.subvector_dim)[2]
    if cand.strided or not needs_reshape or w in outputs or not readers:
        return []
    for scoped in readers:
        node = scoped.node
        if (
            scoped.in_subgraph
            or node.op_type != "Gather"
            or node.domain not in ("", "ai.onnx")
            or len(node.input) != 2
            or node.input[0] != w
            or node.input[1] == w
            or attributes(node).get("axis", 0) != 0  # a negative axis would name another axis of [rows, n, d]
            or node.input[1] not in ranks
        ):
            return []
    if any(name in taken for j in range(len(readers)) for name in _row_names(w, j)):
        return []
    return [scoped.node.output[0] for scoped in readers]


def _reshape_rows(
    graph: onnx.GraphProto, q: QuantizedWeight, lookups: Collection[str], ranks: Mapping[str, int]
) -> list[onnx.TensorProto]:
    """Point each lookup (by output) at the unreshaped table and reshape its rows: [..., n, d] -> [..., n * d].

    The Reshape runs on the looked-up rows at inference (a view in onnxruntime), instead of on
    the whole table at load. Returns the target shapes to add as initializers.
    """
    w = q.candidate.name
    shapes: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        nodes.append(node)
        if node.op_type != "Gather" or node.output[0] not in lookups:
            continue
        rows, shape_name, reshape = _row_names(w, len(shapes))
        target = node.output[0]
        node.input[0] = pq_name(w, "gathered")
        node.output[0] = rows
        shape = [0] * ranks[node.input[1]] + list(q.candidate.shape[1:])
        shapes.append(numpy_helper.from_array(np.array(shape, dtype=np.int64), shape_name))
        nodes.append(helper.make_node("Reshape", [rows, shape_name], [target], reshape))
    del graph.node[:]
    graph.node.extend(nodes)
    return shapes


def _decode_nodes(
    q: QuantizedWeight, model: onnx.ModelProto, *, looked_up: bool = False
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The nodes and initializers that rebuild one weight under its original name.

    ``looked_up``: only row lookups read it (``_row_lookups``); the chain stops at the unreshaped
    table, ``<weight>_pq_gathered``, which the lookups read instead.
    """
    cand = q.candidate
    w = cand.name
    codebook, codes, axis, reshape = _tables(q)
    reshape = reshape and not looked_up
    k = len(q.codebook.centroids)
    inits = [
        numpy_helper.from_array(codebook, pq_name(w, "codebook")),
        _index_tensor(pq_name(w, "indices"), codes, codes.shape, index_dtype(k, model)),
    ]
    nodes = []
    table = pq_name(w, "codebook")
    if cand.dtype != onnx.TensorProto.FLOAT16:
        # Casting the k-row codebook is cheap; casting the decoded weight would cost a full copy.
        table = pq_name(w, "codebook_cast")
        nodes.append(
            helper.make_node(
                "Cast", [pq_name(w, "codebook")], [table], pq_name(w, "decode_cast_codebook"), to=cand.dtype
            )
        )
    nodes.append(
        helper.make_node(
            "Cast",
            [pq_name(w, "indices")],
            [pq_name(w, "indices_int32")],
            pq_name(w, "decode_cast_indices"),
            to=onnx.TensorProto.INT32,
        )
    )
    gathered = pq_name(w, "gathered") if reshape or looked_up else w
    nodes.append(
        helper.make_node(
            "Gather", [table, pq_name(w, "indices_int32")], [gathered], pq_name(w, "decode_gather"), axis=axis
        )
    )
    if reshape:
        inits.append(numpy_helper.from_array(np.array(cand.shape, dtype=np.int64), pq_name(w, "shape")))
        nodes.append(helper.make_node("Reshape", [gathered, pq_name(w, "shape")], [w], pq_name(w, "decode_reshape")))
    return nodes, inits


def _check_names_free(graph: onnx.GraphProto, weights: Sequence[QuantizedWeight]) -> set[str]:
    """Generated names must be new in every scope: a body defining one would shadow the decoded table.

    Returns the names taken (values of every scope, main-graph node names).
    """
    taken = {n.name for n in graph.node} | set(value_names(graph))
    for q in weights:
        for role in _ROLES:
            if pq_name(q.candidate.name, role) in taken:
                raise UnsupportedGraphError(
                    f"the graph already has a tensor or node named {pq_name(q.candidate.name, role)!r}; "
                    "was it compressed by onnxpq before?"
                )
    return taken


def encode_weights(
    model: onnx.ModelProto,
    weights: Sequence[QuantizedWeight],
    *,
    metadata: dict[str, object],
    constants: Mapping[str, np.ndarray] | None = None,
    row_lookups: bool = True,
) -> onnx.ModelProto:
    """Return a copy of ``model`` with each weight replaced by its decode chain.

    ``constants`` gives new values for other float constants (same name, shape and dtype).
    ``row_lookups``: embedding tables that only lookups read skip their Reshape (``_row_lookups``).

    The input model is not modified. Initializer weights get their decode nodes
    at the top of the graph; weights held by ``Constant`` nodes get them where
    the Constant stood, so the node order stays topological. A weight also
    listed as a graph input (old exporters did this) is removed from the inputs:
    it can no longer be overridden, which no deployment relies on.
    """
    source = model.graph
    taken = _check_names_free(source, weights)
    by_name = {q.candidate.name: q for q in weights}
    ranks = _declared_ranks(source)
    readers = _scoped_readers(source) if row_lookups else {}
    outputs = {o.name for o in source.output}
    lookups = {
        w: found for w, q in by_name.items() if (found := _row_lookups(q, readers.get(w, []), ranks, taken, outputs))
    }
    head: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    body: list[onnx.NodeProto] = []
    for node in source.node:
        if node.op_type == "Constant" and node.output[0] in by_name:
            w = node.output[0]
            nodes, inits = _decode_nodes(by_name.pop(w), model, looked_up=w in lookups)
            body.extend(nodes)
            new_inits.extend(inits)
        else:
            body.append(node)
    kept_inits = [t for t in source.initializer if t.name not in by_name]
    for q in by_name.values():
        nodes, inits = _decode_nodes(q, model, looked_up=q.candidate.name in lookups)
        head.extend(nodes)
        new_inits.extend(inits)
    replaced = {q.candidate.name for q in weights}
    out = without(model, "node", "initializer", "input")  # not a copy to edit: it would keep the old weights
    graph = out.graph
    graph.node.extend(head + body)
    graph.initializer.extend(kept_inits + new_inits)
    graph.input.extend(i for i in source.input if i.name not in replaced)
    replace_constants(graph, constants or {})
    for q in weights:
        if q.candidate.name in lookups:
            graph.initializer.extend(_reshape_rows(graph, q, lookups[q.candidate.name], ranks))
    _set_metadata(out, {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()})
    return out


def row_reshapes(graph: onnx.GraphProto) -> list[str]:
    """The names of the Reshape nodes that run on looked-up rows at inference (``_reshape_rows``)."""
    return [n.name for n in graph.node if n.op_type == "Reshape" and "_pq_rows_reshape_" in n.name]


def layer_outputs(graph: onnx.GraphProto) -> list[str]:
    """The outputs of the nodes that read a decoded weight, where quantization error enters.

    A row lookup's output is the Reshape's after it, which has the original model's name.
    """
    decoded = {n.removesuffix("_pq_codebook") for n in constant_tensors(graph) if n.endswith("_pq_codebook")}
    tables = {pq_name(w, "gathered") for w in decoded}
    found = [n.output[0] for n in graph.node if any(i in decoded for i in n.input)]
    lookups = {n.output[0] for n in graph.node if n.op_type == "Gather" and n.input[0] in tables}
    return found + [n.output[0] for n in graph.node if n.op_type == "Reshape" and n.input[0] in lookups]


def _set_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> None:
    """Add or replace onnxpq's keys; every other entry (e.g. an OCR dictionary) is kept as it was."""
    for prop in model.metadata_props:
        if prop.key in entries:
            prop.value = entries.pop(prop.key)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
