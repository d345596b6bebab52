import numpy as np
import onnx
import pytest
from conftest import conv_model, make_model, rand
from onnx import helper

from onnxpq import CompressConfig, ConfigError, compress
from onnxpq.pipeline import ValidationSettings
from onnxpq.quantize.selection import find_candidates


def _one(model, **config):
    settings = {"min_elements": 1, "keep_first": False, **config}
    (cand,) = [c for c in find_candidates(model, CompressConfig(**settings)) if c.name == "w"]
    return cand


@pytest.mark.parametrize(
    ("shape", "group", "block", "d"),
    [
        ((32, 16, 3, 3), 1, "small", 9),
        ((32, 16, 3, 3), 1, "large", 18),
        ((64, 32, 1, 1), 1, "small", 4),
        ((64, 32, 1, 1), 1, "large", 8),
        ((16, 16, 5, 5), 1, "small", 8),  # 400 weights per row: divisors 8 and 10 tie, the smaller wins
        ((64, 1, 3, 3), 64, "large", 9),  # depthwise: 9 weights per row, 18 cannot divide
        ((16, 16, 7, 7), 1, "small", 8),
    ],
)
def test_pqf_block_layouts(shape, group, block, d):
    out_c, in_c = shape[0], shape[1] * group
    model = conv_model(out_c, in_c, k=shape[2], group=group)
    cand = _one(model, block_size=block)
    assert cand.subvector_dim == d
    assert cand.row_axes == 1


def test_big_1d_kernel_is_never_one_subvector():
    # CREPE-style 64-tap 1-D kernels: d stays near 9, not 64.
    rng = np.random.default_rng(0)
    node = helper.make_node("Conv", ["x", "w"], ["y"], "conv1d")
    model = make_model([node], [("x", [1, 1, 256])], ["y"], {"w": rand(rng, 128, 1, 64)})
    assert _one(model).subvector_dim == 8


def test_codebook_size_is_clamped_to_quarter_of_subvectors():
    cand = _one(conv_model(64, 64, group=64))  # 64 subvectors of d=9 -> k = 2**floor(log2(16)) = 16
    assert cand.n_codewords == 16


def test_subvector_dim_override_that_does_not_divide_is_skipped_with_reason():
    cand = _one(conv_model(), subvector_dim=7)
    assert not cand.compressed
    assert "subvector_dim=7 does not divide the 144 weights" in cand.skip_reason


def test_min_elements_keep_first_and_op_types():
    model = conv_model()
    assert "min-elements" in _one(model, min_elements=10**6).skip_reason
    assert "first conv" in _one(model, keep_first=True).skip_reason
    assert "not selected" in _one(model, op_types=("Gemm",)).skip_reason


def test_exclude_and_include_patterns():
    model = conv_model()
    assert _one(model, nodes_to_exclude=("^conv$",)).skip_reason == "matched by --nodes-to-exclude"
    assert _one(model, nodes_to_include=("co",)).compressed


def test_pattern_matching_nothing_lists_close_names():
    with pytest.raises(ConfigError, match=r"'conf' matches no node; close names: conv"):
        find_candidates(conv_model(), CompressConfig(nodes_to_exclude=("conf",)))


def test_unknown_op_type_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown op type"):
        CompressConfig(op_types=("Conv", "LSTMM"))


def test_nan_weights_stay_float():
    model = conv_model()
    model.graph.initializer[0].float_data[:] = []
    w = rand(np.random.default_rng(0), 32, 16, 3, 3)
    w[0, 0, 0, 0] = np.nan
    model.graph.initializer[0].raw_data = w.tobytes()
    assert _one(model).skip_reason == "contains NaN or Inf"


def test_op_types_all_picks_other_large_float_weights():
    rng = np.random.default_rng(0)
    node = helper.make_node("Add", ["x", "w"], ["y"], "add")
    model = make_model([node], [("x", [64, 64])], ["y"], {"w": rand(rng, 64, 64)})
    assert find_candidates(model, CompressConfig(min_elements=1)) == []
    cand = _one(model, op_types=("all",))
    assert cand.compressed and cand.kind == "other"


def _first_conv_model(first_shape: tuple[int, ...], second_shape: tuple[int, ...]) -> onnx.ModelProto:
    """Conv -> Conv: ``w`` is the first conv's weight, ``w2`` the second's (1-D or 2-D by the shapes)."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["h"], "first"),
        helper.make_node("Conv", ["h", "w2"], ["y"], "second"),
    ]
    spatial = [128] * (len(first_shape) - 2)
    weights = {"w": rand(rng, *first_shape), "w2": rand(rng, *second_shape)}
    return make_model(nodes, [("x", [1, first_shape[1], *spatial])], ["y"], weights)


def test_small_image_first_conv_is_kept_by_default():
    # RGB input, 432 of 147888 weights: PQF's ImageNet case.
    model = _first_conv_model((16, 3, 3, 3), (1024, 16, 3, 3))
    reason = _one(model, keep_first=None).skip_reason
    assert (
        reason
        == "first conv kept in float: 3 input channel(s) per group, 0.29% of the weights (small, as PQF keeps it)"
    )
    assert _one(model, keep_first=False).compressed


def test_dominant_first_conv_is_compressed_by_default():
    # A byte model whose first conv holds 96 % of the weights: keeping it would forbid any low budget.
    model = _first_conv_model((256, 1, 64), (8, 256, 3))
    assert _one(model, keep_first=None).compressed
    assert _one(model, keep_first=True).skip_reason == "first conv kept in float (--keep-first)"


def test_first_conv_over_many_channels_is_compressed_by_default():
    # 64 input channels: a first conv fed by an earlier embedding, not an image.
    model = _first_conv_model((16, 64, 1, 1), (4096, 16, 3, 3))
    assert _one(model, keep_first=None).compressed


def test_unreachable_budget_names_the_float_layers_and_their_flags(tmp_path):
    model = _first_conv_model((256, 1, 64), (8, 256, 3))
    onnx.save(model, tmp_path / "in.onnx")
    config = CompressConfig(keep_first=True, target_bpw=4.0, nodes_to_exclude=("second",), min_elements=64)
    pattern = (
        r"--target-bpw 4.0 is below the smallest size this model reaches, 32.000 bits/weight; "
        r"layers kept in float, largest first: first \(64.0 KiB, first conv kept in float \(--keep-first\); "
        r"change with --no-keep-first\), second \(24.0 KiB, matched by --nodes-to-exclude; "
        r"change with --nodes-to-exclude\)"
    )
    with pytest.raises(ConfigError, match=pattern):
        compress(tmp_path / "in.onnx", tmp_path / "out.onnx", config, validation=ValidationSettings(enabled=False))


def _split_concat_matmul(rng) -> onnx.ModelProto:
    """A MatMul whose [64, 128] weight reaches it only through Split and Concat, as exported LSTM cells do."""
    nodes = [
        helper.make_node("Split", ["w"], ["w_a", "w_b"], "split", axis=1, num_outputs=2),
        helper.make_node("Concat", ["w_b", "w_a"], ["w_ba"], "concat", axis=1),
        helper.make_node("MatMul", ["x", "w_ba"], ["y"], "mm"),
    ]
    return make_model(nodes, [("x", [2, 64])], ["y"], {"w": rand(rng, 64, 128)}, opset=18)


def test_a_weight_read_only_through_slice_and_concat_is_compressed(rng):
    """Exported LSTM cells (Silero VAD) slice their gate weights before use: without this rule they stayed float."""
    model = _split_concat_matmul(rng)
    (cand,) = find_candidates(model, CompressConfig())
    assert cand.name == "w" and cand.kind == "other" and cand.compressed
    assert not find_candidates(model, CompressConfig(nodes_to_exclude=("split",)))[0].compressed
    assert not find_candidates(model, CompressConfig(op_types=("Conv",)))


def test_a_sliced_table_that_ends_in_an_add_stays_float(rng):
    """A positional embedding read through Slice is not a matrix weight: only --op-types all compresses it."""
    nodes = [
        helper.make_node("Slice", ["pe", "start", "end"], ["pe_s"], "slice"),
        helper.make_node("Add", ["x", "pe_s"], ["y"], "add"),
    ]
    weights = {"pe": rand(rng, 64, 128), "start": np.array([0], np.int64), "end": np.array([2], np.int64)}
    model = make_model(nodes, [("x", [2, 128])], ["y"], weights)
    assert not find_candidates(model, CompressConfig())
    assert [c.name for c in find_candidates(model, CompressConfig(op_types=("all",)))] == ["pe"]
