"""The compressed model computes exactly what a dense model holding the decoded weights computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import conv_model, make_model, rand, run
from onnx import TensorProto, helper, numpy_helper

from onnxpq import CompressConfig, compress
from onnxpq.encode import layer_outputs, pq_name, row_reshapes
from onnxpq.model.graph import constant_foldable_nodes, replace_constants
from onnxpq.model.session import session
from onnxpq.pipeline import ValidationSettings
from onnxpq.quantize.selection import find_candidates
from onnxpq.validate import decode_nodes_left

NO_VALIDATION = ValidationSettings(enabled=False)


def decoded_weights(original: onnx.ModelProto, compressed: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Decode every compressed weight in numpy, independently of onnxpq's own decode helper."""
    inits = {t.name: t for t in compressed.graph.initializer}
    axes = {
        n.name: helper.get_node_attr_value(n, "axis")
        for n in compressed.graph.node
        if n.name.endswith("_pq_decode_gather")
    }
    out = {}
    for t in original.graph.initializer:
        if pq_name(t.name, "codebook") in inits:
            table = numpy_helper.to_array(inits[pq_name(t.name, "codebook")]).astype(np.float32)
            idx = numpy_helper.to_array(inits[pq_name(t.name, "indices")]).astype(np.int64)
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
            gathered = np.take(table, idx, axis=axes[pq_name(t.name, "decode_gather")])
            out[t.name] = gathered.reshape(tuple(t.dims)).astype(dtype)
    return out


def dense_equivalent(original: onnx.ModelProto, compressed: onnx.ModelProto) -> onnx.ModelProto:
    dense = onnx.ModelProto()
    dense.CopyFrom(original)
    decoded = decoded_weights(original, compressed)
    for t in dense.graph.initializer:
        if t.name in decoded:
            t.CopyFrom(numpy_helper.from_array(decoded[t.name], t.name))
    return dense


def compress_model(model: onnx.ModelProto, tmp_path: Path, **config) -> onnx.ModelProto:
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    settings = {"min_elements": 1, "keep_first": False, **config}
    compress(src, dst, CompressConfig(**settings), validation=NO_VALIDATION)
    return onnx.load(dst)


def assert_equivalent(model: onnx.ModelProto, compressed: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    expected = run(dense_equivalent(model, compressed), feeds)
    got = run(compressed, feeds)
    for e, g in zip(expected, got, strict=True):
        scale = max(float(np.abs(e).max()), 1e-6)
        assert float(np.abs(e.astype(np.float64) - g).max()) / scale <= 1e-5


def assert_decode_shape(compressed: onnx.ModelProto) -> None:
    """Cast -> Gather, at most one Reshape per weight, never a Transpose, never uint8 into Gather."""
    ops = [n.op_type for n in compressed.graph.node]
    assert "Transpose" not in ops
    inits = {t.name: t for t in compressed.graph.initializer}
    for node in compressed.graph.node:
        if node.op_type == "Gather" and node.input[1] in inits:
            assert inits[node.input[1]].data_type not in (TensorProto.UINT8, TensorProto.UINT4)


CONV_CASES = {
    "conv3x3": (conv_model(), {}, 9),
    "conv1x1": (conv_model(64, 32, k=1), {}, 4),
    "grouped": (conv_model(32, 16, group=4), {}, 9),
    "depthwise": (conv_model(64, 64, group=64), {}, 9),
    "dilated": (conv_model(32, 16, dilation=2), {}, 9),
    "large_blocks": (conv_model(), {"block_size": "large"}, 18),
    "conv5x5": (conv_model(16, 16, k=5), {}, 8),
}


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_variants_match_dense(case, tmp_path, rng):
    model, config, d = CONV_CASES[case]
    compressed = compress_model(model, tmp_path, **config)
    x = rand(rng, *[dim.dim_value for dim in model.graph.input[0].type.tensor_type.shape.dim])
    assert_equivalent(model, compressed, {"x": x})
    assert_decode_shape(compressed)
    codebook = next(t for t in compressed.graph.initializer if t.name == pq_name("w", "codebook"))
    assert np.prod(codebook.dims[1:]) == d


def test_3x3_codebook_is_kernel_shaped_without_reshape(tmp_path):
    compressed = compress_model(conv_model(32, 16), tmp_path)
    inits = {t.name: t for t in compressed.graph.initializer}
    assert list(inits[pq_name("w", "codebook")].dims)[1:] == [3, 3]
    assert list(inits[pq_name("w", "indices")].dims) == [32, 16]
    assert "Reshape" not in [n.op_type for n in compressed.graph.node]


def _matrix_case(op: str, w_shape: tuple[int, ...], x_shape: tuple[int, ...], **attrs) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    node = helper.make_node(op, ["x", "w"], ["y"], op.lower(), **attrs)
    return make_model([node], [("x", x_shape)], ["y"], {"w": rand(rng, *w_shape)})


MATRIX_CASES = {
    "gemm_transB1": _matrix_case("Gemm", (64, 128), (2, 128), transB=1),
    "gemm_transB0": _matrix_case("Gemm", (128, 64), (2, 128), transB=0),
    "matmul_2d": _matrix_case("MatMul", (128, 64), (2, 3, 128)),
    "matmul_batched": _matrix_case("MatMul", (4, 64, 32), (4, 5, 64)),
}


@pytest.mark.parametrize("case", MATRIX_CASES)
def test_matrix_variants_match_dense(case, tmp_path, rng):
    model = MATRIX_CASES[case]
    compressed = compress_model(model, tmp_path)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert_equivalent(model, compressed, {"x": rand(rng, *shape)})
    assert_decode_shape(compressed)
    assert [n.op_type for n in compressed.graph.node].count("Reshape") == 1


def test_convtranspose_matches_dense(tmp_path, rng):
    w = rand(rng, 16, 32, 3, 3)
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], "deconv", strides=[2, 2])
    model = make_model([node], [("x", [1, 16, 6, 6])], ["y"], {"w": w})
    compressed = compress_model(model, tmp_path)
    assert_equivalent(model, compressed, {"x": rand(rng, 1, 16, 6, 6)})


@pytest.mark.parametrize(
    ("equation", "inputs"),
    [("btd,shde->sbhte", ("x", "w")), ("hde,btd->bhte", ("w", "x"))],  # the weight first or second
)
def test_einsum_weight_matches_dense(equation, inputs, tmp_path, rng):
    """An Einsum's constant operand is a candidate (einsum attention's fused QKV weight was left in float)."""
    shape = (3, 2, 16, 8) if equation.startswith("btd,shde") else (2, 16, 8)
    node = helper.make_node("Einsum", list(inputs), ["y"], "einsum", equation=equation)
    model = make_model([node], [("x", [2, 5, 16])], ["y"], {"w": rand(rng, *shape)})
    (cand,) = find_candidates(model, CompressConfig(min_elements=1))
    assert cand.kind == "Einsum" and cand.compressed and cand.row_axes == len(shape) - 1
    compressed = compress_model(model, tmp_path)
    assert "w" not in {t.name for t in compressed.graph.initializer}
    assert_decode_shape(compressed)
    assert_equivalent(model, compressed, {"x": rand(rng, 2, 5, 16)})
    gathers = [n.name for n in compressed.graph.node if n.op_type == "Gather"]
    assert decode_nodes_left(tmp_path / "out.onnx", gathers) == []


def test_gather_embedding_matches_dense(tmp_path, rng):
    node = helper.make_node("Gather", ["table", "ids"], ["y"], "embed", axis=0)
    model = make_model([node], [], ["y"], {"table": rand(rng, 1000, 32)})
    model.graph.input.append(helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 7]))
    compressed = compress_model(model, tmp_path)
    ids = rng.integers(0, 1000, size=(2, 7)).astype(np.int64)
    assert_equivalent(model, compressed, {"ids": ids})


def _lookup_model(
    rng: np.random.Generator, nodes: list[onnx.NodeProto], ids_shape: list[int] | None, outputs: list[str]
) -> onnx.ModelProto:
    """A [1000, 32] table read by ``nodes``; ``ids`` declared with ``ids_shape`` (None: no shape at all)."""
    graph = helper.make_graph(
        nodes,
        "lookups",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ids_shape)],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        initializer=[numpy_helper.from_array(rand(rng, 1000, 32), "table")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("ids_shape", [[2, 7], [5], []], ids=["rank2", "rank1", "scalar"])
def test_embedding_lookups_reshape_their_rows_not_the_table(ids_shape, tmp_path, rng):
    """Only Gather lookups read the table: the table keeps its [rows, n, d] shape, each lookup's rows are reshaped."""
    lookups = [helper.make_node("Gather", ["table", "ids"], [out], out) for out in ("y", "z")]
    model = _lookup_model(rng, lookups, ids_shape, ["y", "z"])
    compressed = compress_model(model, tmp_path)
    names = {n.name for n in compressed.graph.node}
    assert pq_name("table", "decode_reshape") not in names
    assert {pq_name("table", "rows_reshape_0"), pq_name("table", "rows_reshape_1")} <= names
    assert layer_outputs(compressed.graph) == ["y", "z"]  # the original model's names, for feature matching
    ids = rng.integers(0, 1000, size=ids_shape).astype(np.int64)
    assert_equivalent(model, compressed, {"ids": ids})
    decode = [n.name for n in constant_foldable_nodes(compressed.graph)]
    assert decode_nodes_left(tmp_path / "out.onnx", decode) == []


def _tied_head(rng: np.random.Generator) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], "embed"),
        helper.make_node("Gemm", ["e", "table"], ["y"], "head", transB=1),
    ]
    return _lookup_model(rng, nodes, [4], ["y"])


def _undeclared_rank(rng: np.random.Generator) -> onnx.ModelProto:
    return _lookup_model(rng, [helper.make_node("Gather", ["table", "ids"], ["y"], "embed")], None, ["y"])


def _negative_axis(rng: np.random.Generator) -> onnx.ModelProto:
    return _lookup_model(rng, [helper.make_node("Gather", ["table", "ids"], ["y"], "embed", axis=-2)], [4], ["y"])


@pytest.mark.parametrize(
    "build", [_tied_head, _undeclared_rank, _negative_axis], ids=["tied_head", "undeclared_rank", "negative_axis"]
)
def test_table_is_reshaped_when_not_only_looked_up(build, tmp_path, rng):
    """A tied head reads the whole table, an index of undeclared rank cannot size the rows' Reshape, and
    axis -2 of a [rows, 32] table would be another axis of the [rows, n, d] one."""
    model = build(rng)
    compressed = compress_model(model, tmp_path)
    assert pq_name("table", "decode_reshape") in {n.name for n in compressed.graph.node}
    assert_equivalent(model, compressed, {"ids": rng.integers(0, 1000, size=4).astype(np.int64)})


def _overridable_ids(rng: np.random.Generator) -> onnx.ModelProto:
    """``ids`` has a rank-1 default but is an input without a shape: a caller may feed any rank."""
    model = _lookup_model(rng, [helper.make_node("Gather", ["table", "ids"], ["y"], "embed")], None, ["y"])
    model.graph.initializer.append(numpy_helper.from_array(np.arange(4, dtype=np.int64), "ids"))
    return model


def _taken_rows_name(rng: np.random.Generator) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["y0"], "embed"),
        helper.make_node("Identity", ["y0"], [pq_name("table", "rows_0")], "taken"),
        helper.make_node("Identity", [pq_name("table", "rows_0")], ["y"], "out"),
    ]
    return _lookup_model(rng, nodes, [4], ["y"])


@pytest.mark.parametrize(
    ("build", "id_shapes"),
    [(_overridable_ids, [(4,), (2, 2)]), (_taken_rows_name, [(4,)])],
    ids=["overridable_ids", "taken_name"],
)
def test_table_keeps_its_reshape_when_rows_cannot_be(build, id_shapes, tmp_path, rng):
    """An index a caller may feed at another rank cannot size the rows' Reshape; a taken name is not refused."""
    model = build(rng)
    compressed = compress_model(model, tmp_path)
    assert pq_name("table", "decode_reshape") in {n.name for n in compressed.graph.node}
    for shape in id_shapes:
        assert_equivalent(model, compressed, {"ids": rng.integers(0, 1000, size=shape).astype(np.int64)})


def _embed_layer_norm_model(rng: np.random.Generator, hidden: int = 32) -> onnx.ModelProto:
    """The BERT embedding onnxruntime fuses into EmbedLayerNormalization (an Attention node reads it)."""
    int_scalar = {name: helper.make_tensor(name, TensorProto.INT64, [], [v]) for name, v in (("zero", 0), ("one", 1))}
    nodes = [
        helper.make_node("Shape", ["input_ids"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"]),
        helper.make_node("Gather", ["shape", "one"], ["length"]),
        helper.make_node("Unsqueeze", ["batch"], ["batch1"], axes=[0]),
        helper.make_node("Unsqueeze", ["length"], ["length1"], axes=[0]),
        helper.make_node("Concat", ["batch1", "length1"], ["dims"], axis=0),
        helper.make_node("Range", ["zero", "length", "one"], ["range"]),
        helper.make_node("Unsqueeze", ["range"], ["range1"], axes=[0]),
        helper.make_node("Expand", ["range1", "dims"], ["positions"]),
        helper.make_node("Gather", ["pos_embed", "positions"], ["pos"], "pos_gather"),
        helper.make_node("Gather", ["word_embed", "input_ids"], ["word"], "word_gather"),
        helper.make_node("Add", ["word", "pos"], ["word_pos"]),
        helper.make_node("Gather", ["seg_embed", "segment_ids"], ["seg"], "seg_gather"),
        helper.make_node("Add", ["word_pos", "seg"], ["summed"]),
        helper.make_node("LayerNormalization", ["summed", "ln_w", "ln_b"], ["normed"], axis=-1, epsilon=1e-5),
        helper.make_node("Cast", ["input_mask"], ["mask32"], to=TensorProto.INT32),
        helper.make_node("ReduceSum", ["mask32"], ["mask_index"], axes=[1], keepdims=0),
        helper.make_node(
            "Attention", ["normed", "qkv", "qkv_bias", "mask_index"], ["att"], domain="com.microsoft", num_heads=2
        ),
        helper.make_node("Add", ["att", "normed"], ["y"]),
    ]
    weights = {
        "word_embed": rand(rng, 1000, hidden),
        "pos_embed": rand(rng, 64, hidden),
        "seg_embed": rand(rng, 2, hidden),
        "ln_w": np.ones(hidden, np.float32),
        "ln_b": np.zeros(hidden, np.float32),
        "qkv": rand(rng, hidden, 3 * hidden) * 0.1,
        "qkv_bias": np.zeros(3 * hidden, np.float32),
    }
    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", 5]) for n in ("input_ids", "segment_ids")]
    graph = helper.make_graph(
        nodes,
        "embed_layer_norm",
        [*ids, helper.make_tensor_value_info("input_mask", TensorProto.INT64, ["batch", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5, hidden])],
        [*int_scalar.values(), *(numpy_helper.from_array(v, k) for k, v in weights.items())],
    )
    opsets = [helper.make_opsetid("", 12), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=7)


def test_lookups_keep_onnxruntimes_embedding_fusion(tmp_path, rng):
    """A Reshape after the word lookup would leave EmbedLayerNormalization unfused: the table keeps its own."""
    model = _embed_layer_norm_model(rng)
    compressed = compress_model(model, tmp_path, op_types=("Gather",))
    assert not row_reshapes(compressed.graph)
    assert pq_name("word_embed", "decode_reshape") in {n.name for n in compressed.graph.node}
    out = str(tmp_path / "optimized.onnx")
    session(str(tmp_path / "out.onnx"), level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, optimized_path=out)
    assert "EmbedLayerNormalization" in [n.op_type for n in onnx.load(out).graph.node]


def test_fp16_weights_decode_to_fp16_without_cast(tmp_path, rng):
    node = helper.make_node("MatMul", ["x", "w"], ["y"], "mm")
    model = make_model(
        [node], [("x", [2, 64])], ["y"], {"w": rand(rng, 64, 64, dtype=np.float16)}, elem_type=TensorProto.FLOAT16
    )
    compressed = compress_model(model, tmp_path)
    assert_equivalent(model, compressed, {"x": rand(rng, 2, 64, dtype=np.float16)})
    assert pq_name("w", "decode_cast_codebook") not in [n.name for n in compressed.graph.node]


def test_constant_node_weights_are_compressed_in_place(tmp_path, rng):
    w = rand(rng, 32, 16, 3, 3)
    const = helper.make_node("Constant", [], ["w"], "w_const", value=numpy_helper.from_array(w, "w"))
    relu = helper.make_node("Relu", ["x"], ["xr"], "relu")
    conv = helper.make_node("Conv", ["xr", "w"], ["y"], "conv", pads=[1, 1, 1, 1])
    model = make_model([relu, const, conv], [("x", [1, 16, 8, 8])], ["y"], {})
    compressed = compress_model(model, tmp_path)
    assert "Constant" not in [n.op_type for n in compressed.graph.node]
    dense = onnx.ModelProto()
    dense.CopyFrom(model)
    inits = {t.name: numpy_helper.to_array(t) for t in compressed.graph.initializer}
    decoded = inits[pq_name("w", "codebook")].astype(np.float32)[inits[pq_name("w", "indices")]]
    dense.graph.node[1].attribute[0].t.CopyFrom(numpy_helper.from_array(decoded.reshape(w.shape), "w"))
    x = rand(rng, 1, 16, 8, 8)
    np.testing.assert_allclose(run(compressed, {"x": x})[0], run(dense, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_shared_weight_is_compressed_once(tmp_path, rng):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], "mm1"), helper.make_node("MatMul", ["h", "w"], ["y"], "mm2")]
    model = make_model(nodes, [("x", [2, 64])], ["y"], {"w": rand(rng, 64, 64)})
    compressed = compress_model(model, tmp_path)
    assert [t.name for t in compressed.graph.initializer].count(pq_name("w", "codebook")) == 1
    assert [n.op_type for n in compressed.graph.node].count("Gather") == 1
    assert_equivalent(model, compressed, {"x": rand(rng, 2, 64)})


def test_metadata_and_interface_are_kept(tmp_path):
    model = conv_model()
    onnx.helper.set_model_props(model, {"character": "a\nb\nc", "author": "me"})
    compressed = compress_model(model, tmp_path)
    props = {p.key: p.value for p in compressed.metadata_props}
    assert props["character"] == "a\nb\nc" and props["author"] == "me"
    assert "onnxpq.version" in props and '"seed": 0' in props["onnxpq.config"]
    assert [i.name for i in compressed.graph.input] == ["x"]
    assert [o.name for o in compressed.graph.output] == ["y"]
    assert compressed.opset_import == model.opset_import
    kept = {t.name: t for t in compressed.graph.initializer}
    assert kept["b"] == next(t for t in model.graph.initializer if t.name == "b")  # bias kept bit-for-bit


@pytest.mark.parametrize("opset", [11, 13, 17, 21, 23])
def test_opsets_11_to_23(opset, tmp_path, rng):
    model = _matrix_case("MatMul", (128, 64), (2, 128))
    model.opset_import[0].version = opset
    model.ir_version = 10 if opset >= 21 else 7
    compressed = compress_model(model, tmp_path)
    assert_equivalent(model, compressed, {"x": rand(rng, 2, 128)})
    onnx.checker.check_model(compressed, full_check=True)


def test_uint4_indices_when_k_le_16_and_opset_21(tmp_path, rng):
    model = _matrix_case("MatMul", (64, 64), (2, 64))
    model.opset_import[0].version = 21
    model.ir_version = 10
    compressed = compress_model(model, tmp_path, n_codewords=16)
    idx = next(t for t in compressed.graph.initializer if t.name == pq_name("w", "indices"))
    assert idx.data_type == TensorProto.UINT4
    cast = next(n for n in compressed.graph.node if n.input and n.input[0] == idx.name)
    assert cast.op_type == "Cast"
    assert_equivalent(model, compressed, {"x": rand(rng, 2, 64)})


def test_uint8_indices_below_opset_21(tmp_path):
    compressed = compress_model(_matrix_case("MatMul", (64, 64), (2, 64)), tmp_path, n_codewords=16)
    idx = next(t for t in compressed.graph.initializer if t.name == pq_name("w", "indices"))
    assert idx.data_type == TensorProto.UINT8


def test_weight_listed_as_graph_input_is_removed_from_inputs(tmp_path, rng):
    model = _matrix_case("MatMul", (64, 64), (2, 64))
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [64, 64]))
    compressed = compress_model(model, tmp_path)
    assert [i.name for i in compressed.graph.input] == ["x"]
    assert_equivalent(model, compressed, {"x": rand(rng, 2, 64)})


def test_decode_is_folded_by_onnxruntime(tmp_path):
    compressed = compress_model(conv_model(64, 32, k=1), tmp_path)
    decode = [n.name for n in constant_foldable_nodes(compressed.graph)]
    assert len(decode) == 4  # codebook Cast, indices Cast, Gather, Reshape
    assert decode_nodes_left(tmp_path / "out.onnx", decode) == []


def test_same_seed_gives_identical_bytes(tmp_path):
    model = conv_model()
    onnx.save(model, tmp_path / "in.onnx")
    for name in ("a.onnx", "b.onnx"):
        compress(
            tmp_path / "in.onnx",
            tmp_path / name,
            CompressConfig(min_elements=1, keep_first=False),
            validation=NO_VALIDATION,
        )
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_external_data_input_is_read(tmp_path, rng):
    model = conv_model()
    onnx.save(
        conv_model(), tmp_path / "ext.onnx", save_as_external_data=True, location="ext.onnx.data", size_threshold=0
    )
    compress(
        tmp_path / "ext.onnx",
        tmp_path / "out.onnx",
        CompressConfig(min_elements=1, keep_first=False),
        validation=NO_VALIDATION,
    )
    assert_equivalent(model, onnx.load(tmp_path / "out.onnx"), {"x": rand(rng, 1, 16, 12, 12)})


@pytest.mark.parametrize("dtype", [TensorProto.UINT4, TensorProto.UINT8])
def test_replaced_codes_keep_their_index_type(dtype, tmp_path, rng):
    """Codes moved by fine-tuning come back widened (int64); written back, they keep the file's index type."""
    opset = 21 if dtype == TensorProto.UINT4 else 17
    node = helper.make_node("MatMul", ["x", "w"], ["y"], "mm")
    model = make_model([node], [("x", [2, 64])], ["y"], {"w": rand(rng, 64, 64)}, opset=opset)
    compressed = compress_model(model, tmp_path, n_codewords=16)
    name = pq_name("w", "indices")
    tensor = next(t for t in compressed.graph.initializer if t.name == name)
    assert tensor.data_type == dtype
    codes = numpy_helper.to_array(tensor).astype(np.int64)
    moved = (codes + 1) % 16
    replace_constants(compressed.graph, {name: moved})
    tensor = next(t for t in compressed.graph.initializer if t.name == name)
    assert tensor.data_type == dtype
    np.testing.assert_array_equal(numpy_helper.to_array(tensor).astype(np.int64), moved)
    assert_equivalent(model, compressed, {"x": rand(rng, 2, 64)})
