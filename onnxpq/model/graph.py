"""The graph index: the constant tensors a graph holds (initializers and ``Constant`` nodes), who reads
each value, subgraph bodies, static shapes and the opset, and replacing constant values in place.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import Message
from onnx import numpy_helper

from onnxpq.errors import InputModelError
from onnxpq.model.tensors import FLOAT_TYPES, FOUR_BIT_TYPES, four_bit_tensor, tensor_array

__all__ = [
    "MIN_OPSET",
    "ConstantTensor",
    "all_tensors",
    "attributes",
    "check_conv_channels",
    "constant_foldable_nodes",
    "constant_tensors",
    "constants_as_inputs",
    "copy_except",
    "display_name",
    "node_bodies",
    "opset_version",
    "readers",
    "replace_constants",
    "value_dims",
    "with_constants",
    "without",
]

MIN_OPSET = 11


@dataclass(frozen=True)
class ConstantTensor:
    """A constant tensor of the main graph: an initializer or the output of a ``Constant`` node.

    Parameters
    ----------
    name : the tensor's name in the graph.
    tensor : the TensorProto holding the values.
    constant_node : index in ``graph.node`` of the ``Constant`` node that produces it, or None
        for an initializer.
    """

    name: str
    tensor: onnx.TensorProto
    constant_node: int | None

    def to_array(self) -> np.ndarray:
        return tensor_array(self.tensor)


def node_bodies(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """(attribute name, body) for each graph attribute of a node: ``then_branch``, ``body`` ...

    The one place that knows where If/Loop/Scan keep their subgraphs (``g`` or ``graphs``).
    """
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, attr.g
        for index, body in enumerate(attr.graphs):
            yield f"{attr.name}_{index}", body


def opset_version(model: onnx.ModelProto) -> int:
    """The default-domain opset of the model (1 when the model does not declare one)."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 1


def value_dims(values: Iterable[onnx.ValueInfoProto]) -> dict[str, tuple[int | None, ...]]:
    """The declared or inferred shape of each tensor value: a dim's size, or None where it is symbolic or unknown."""
    return {
        v.name: tuple(d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim)
        for v in values
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")
    }


def _static_dims(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Each value's shape as onnx's shape inference finds it from the inputs (unknown dims None); empty if it fails.

    The model's own ``value_info`` annotations are left out: a stale one must not refuse a model that runs.
    """
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    bare.graph.ClearField("value_info")
    try:
        inferred = onnx.shape_inference.infer_shapes(bare)
    except Exception:  # onnx raises several types; an unknown shape only skips the check it feeds
        return {}
    return value_dims((*inferred.graph.input, *inferred.graph.value_info))


def check_conv_channels(model: onnx.ModelProto, path: Path) -> None:
    """Refuse a main-graph Conv whose input channels differ from what its constant weight expects.

    onnxruntime 1.32 runs such a Conv without complaint (a [1, 8, 12, 12] input against a weight
    of 16 input channels gave a [1, 32, 12, 12] output), so neither its outputs nor the layer
    statistics computed from them would mean anything.
    """
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    convs = [(i, n) for i, n in enumerate(model.graph.node) if n.op_type == "Conv" and n.input[1] in weights]
    if not convs:
        return
    dims = _static_dims(model)
    for index, node in convs:
        shape = dims.get(node.input[0])
        group = attributes(node).get("group", 1)
        w = weights[node.input[1]]
        if shape is None or len(shape) < 2 or shape[1] is None or len(w) < 2 or shape[1] == w[1] * group:
            continue
        raise InputModelError(
            f"{path}: Conv {display_name(node, index)!r} reads {shape[1]} input channels from "
            f"{node.input[0]!r}, but its weight {node.input[1]!r} {list(w)} expects {w[1] * group} "
            f"({w[1]} per group x {group} groups)"
        )


def constant_tensors(graph: onnx.GraphProto) -> dict[str, ConstantTensor]:
    """Every constant of the main graph by name: initializers and ``Constant(value=tensor)`` outputs."""
    found = {t.name: ConstantTensor(t.name, t, None) for t in graph.initializer}
    for index, node in enumerate(graph.node):
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or not node.output:
            continue
        for attr in node.attribute:
            if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                found[node.output[0]] = ConstantTensor(node.output[0], attr.t, index)
    return found


def constants_as_inputs(model: onnx.ModelProto, names: Collection[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose named constants are graph inputs of the same dtype and shape.

    One onnxruntime session of it can then be run with many candidate values
    for those tensors, instead of building a session per candidate.
    """
    wanted = set(names)
    found = constant_tensors(model.graph)
    missing = sorted(wanted - set(found))
    if missing:
        raise KeyError(f"not constants of the main graph: {missing}")
    out = without(model, "node", "initializer")
    graph = out.graph
    graph.node.extend(n for n in model.graph.node if not (n.op_type == "Constant" and n.output[0] in wanted))
    graph.initializer.extend(t for t in model.graph.initializer if t.name not in wanted)
    # Models older than IR 4 also list their initializers as inputs; those entries already declare the tensor.
    declared = {i.name for i in graph.input}
    graph.input.extend(
        onnx.helper.make_tensor_value_info(n, found[n].tensor.data_type, list(found[n].tensor.dims))
        for n in sorted(wanted - declared)
    )
    return out


def copy_except(source: Message, target: Message, *skipped: str) -> Message:
    """``target`` with every field of ``source`` but the ``skipped`` ones copied in; returns ``target``.

    Copying a whole model and then deleting its weights keeps them: protobuf's upb backend allocates a
    message's parts in an arena that lives as long as the message (on BERT-base, 407 MB held by a copy
    whose serialized size was under 1 MB). Fields this onnx release does not know (a newer writer's) are
    not copied: protobuf lists only the known ones.
    """
    for field, value in source.ListFields():
        if field.name in skipped:
            continue
        # ``is_repeated`` is protobuf 6's; ``label`` the older releases' (upb's descriptors no longer have it).
        if getattr(field, "is_repeated", None) or getattr(field, "label", None) == field.LABEL_REPEATED:
            getattr(target, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)
    return target


def without(model: onnx.ModelProto, *graph_fields: str) -> onnx.ModelProto:
    """A copy of ``model`` whose main graph lacks ``graph_fields`` (its nodes, initializers ...), for the caller
    to fill with what it keeps: built from parts, it never holds what is left out (``copy_except``)."""
    out = copy_except(model, onnx.ModelProto(), "graph")
    copy_except(model.graph, out.graph, *graph_fields)
    return out


def display_name(node: onnx.NodeProto, index: int) -> str:
    """The node's name, or a stable stand-in for the unnamed nodes some exporters write."""
    return node.name or f"{node.op_type}_{index}"


def readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """For each tensor name, the nodes of the main graph that read it, in graph order."""
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def constant_foldable_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes whose inputs are all constants (transitively): what onnxruntime should fold at load."""
    overridable = {i.name for i in graph.input}
    known = {t.name for t in graph.initializer if t.name not in overridable}
    foldable = []
    for node in graph.node:
        if node.op_type == "Constant":
            known.update(node.output)
        elif node.input and all(not name or name in known for name in node.input):
            known.update(node.output)
            foldable.append(node)
    return foldable


def replace_constants(graph: onnx.GraphProto, values: Mapping[str, np.ndarray]) -> None:
    """Overwrite constants (corrected biases, tuned norms, moved codes) in place, initializer or Constant node
    alike; integer values keep the tensor's type (4-bit indices are packed as ONNX stores them)."""
    for tensor in graph.initializer:
        if tensor.name in values:
            tensor.CopyFrom(_tensor_like(tensor, values[tensor.name]))
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] in values:
            for attr in node.attribute:
                if attr.name == "value":
                    attr.t.CopyFrom(_tensor_like(attr.t, values[node.output[0]]))


def with_constants(model: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose named constants hold ``values``, as ``replace_constants`` writes them.

    For replacing weights: built from parts, so the copy never holds the old values (``copy_except``).
    """
    out = without(model, "node", "initializer")
    graph = out.graph
    graph.initializer.extend(
        _tensor_like(t, values[t.name]) if t.name in values else t for t in model.graph.initializer
    )
    for node in model.graph.node:
        if node.op_type != "Constant" or node.output[0] not in values:
            graph.node.append(node)
            continue
        new = copy_except(node, graph.node.add(), "attribute")
        for attr in node.attribute:
            if attr.name == "value":
                copy_except(attr, new.attribute.add(), "t").t.CopyFrom(_tensor_like(attr.t, values[node.output[0]]))
            else:
                new.attribute.append(attr)
    return out


def _tensor_like(old: onnx.TensorProto, values: np.ndarray) -> onnx.TensorProto:
    """``values`` under ``old``'s name; integers in ``old``'s integer type (the executor widens indices)."""
    values = np.asarray(values)
    if values.dtype.kind not in "iu" or old.data_type in FLOAT_TYPES:
        return numpy_helper.from_array(values, old.name)
    if old.data_type in FOUR_BIT_TYPES:
        return four_bit_tensor(old.name, old.data_type, values)
    return numpy_helper.from_array(values.astype(onnx.helper.tensor_dtype_to_np_dtype(old.data_type)), old.name)


def all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of a graph and its subgraphs: initializers and tensor attributes."""
    yield from graph.initializer
    for node in graph.node:
        yield from (attr.t for attr in node.attribute if attr.type == onnx.AttributeProto.TENSOR)
        for _, body in node_bodies(node):
            yield from all_tensors(body)


def attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """A node's attributes by name, as ``onnx.helper`` decodes them (strings stay bytes)."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
