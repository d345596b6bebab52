import numpy as np
import pytest
from conftest import conv_model, make_model, rand
from onnx import helper

from onnxpq import CompressConfig, ConfigError
from onnxpq.selection import find_candidates


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
