"""Channel spaces: found on any graph, and a random permutation of every free one leaves the outputs unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import make_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

from onnxpq.calibration import Dataset
from onnxpq.permute.channels import find_groups
from onnxpq.permute.search import apply_permutations, verify_groups


class Builder:
    """Random CNN graphs from the building blocks the channel rules must handle."""

    def __init__(self, rng: np.random.Generator, channels: int = 6) -> None:
        self.rng, self.nodes, self.weights, self.n = rng, [], {}, 0
        self.x, self.c = "x", channels
        self.conv("x", 3, channels, 3)

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def const(self, *shape: int, positive: bool = False) -> str:
        name = self.name("c")
        value = self.rng.standard_normal(shape).astype(np.float32)
        self.weights[name] = np.abs(value) + 0.5 if positive else value
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name("t")
        self.nodes.append(helper.make_node(op, inputs, [out], self.name(op), **attrs))
        return out

    def conv(self, x: str, c_in: int, c_out: int, k: int, group: int = 1, bias: bool = True) -> str:
        inputs = [x, self.const(c_out, c_in // group, k, k)] + ([self.const(c_out)] if bias else [])
        self.x = self.node("Conv", inputs, pads=[k // 2] * 4, group=group)
        self.c = c_out
        return self.x

    def block(self, kind: str) -> None:
        x, c = self.x, self.c
        if kind == "conv":
            self.node_relu(self.conv(x, c, int(self.rng.integers(3, 9)), int(self.rng.choice([1, 3]))))
        elif kind == "residual":
            y = self.conv(x, c, c, 3, bias=False)
            bn = self.node(
                "BatchNormalization", [y, self.const(c), self.const(c), self.const(c), self.const(c, positive=True)]
            )
            self.x, self.c = self.node("Add", [self.node("Relu", [bn]), x]), c
        elif kind == "depthwise":
            self.node_relu(self.conv(x, c, c, 3, group=c))
        elif kind == "concat":
            a = self.conv(x, c, 3, 1)
            b = self.conv(x, c, 4, 3)
            self.x, self.c = self.node("Concat", [a, b], axis=1), 7
        elif kind == "se":
            squeeze = self.node("GlobalAveragePool", [x])
            hidden = self.node("Relu", [self.conv(squeeze, c, 2, 1)])
            gate = self.node("Sigmoid", [self.conv(hidden, 2, c, 1)])
            self.x, self.c = self.node("Mul", [x, gate]), c
        elif kind == "scale":
            self.x = self.node("Mul", [x, self.const(1, c, 1, 1)])
        elif kind == "pool":
            self.x = self.node("MaxPool", [x], kernel_shape=[2, 2], strides=[1, 1], pads=[0, 0, 1, 1])

    def node_relu(self, y: str) -> None:
        self.x = self.node("Relu", [y])

    def model(self, head: str) -> onnx.ModelProto:
        if head == "flatten":  # PQF's fc6 trick: each channel becomes a block of 8*8 features.
            flat = self.node("Flatten", [self.x], axis=1)
            y = self.node("Gemm", [flat, self.const(5, self.c * 64), self.const(5)], transB=1)
        else:
            pooled = self.node("Flatten", [self.node("GlobalAveragePool", [self.x])])
            y = self.node("MatMul", [pooled, self.const(self.c, 5)])
        return make_model(self.nodes, [("x", [2, 3, 8, 8])], [y], self.weights)


BLOCKS = ["conv", "residual", "depthwise", "concat", "se", "scale", "pool"]


def _dataset(rng: np.random.Generator) -> Dataset:
    return Dataset({"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}, "test")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    blocks=st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=6),
    head=st.sampled_from(["flatten", "pool"]),
    seed=st.integers(0, 2**16),
)
def test_random_permutations_of_free_groups_leave_outputs_unchanged(blocks, head, seed):
    rng = np.random.default_rng(seed)
    builder = Builder(rng)
    for kind in blocks:
        builder.block(kind)
    model = builder.model(head)
    groups = find_groups(model)
    free = [g for g in groups if not g.frozen]
    assert free, [g.frozen for g in groups]
    # float32 sums in another order: 1.04e-5 of the output's range was seen (seed 236); a wrong permutation is O(1).
    assert verify_groups(model, groups, _dataset(rng), rng) <= 1e-4


def _groups(blocks, head="pool", seed=0):
    builder = Builder(np.random.default_rng(seed))
    for kind in blocks:
        builder.block(kind)
    model = builder.model(head)
    return model, find_groups(model)


def test_residual_add_merges_the_two_spaces():
    _, groups = _groups(["residual"])
    free = [g for g in groups if not g.frozen]
    merged = max(free, key=lambda g: len(g.members))
    roles = sorted(m.role for m in merged.members)
    assert roles.count("producer") == 2 and roles.count("consumer") == 2
    assert sum(m.role == "param" for m in merged.members) >= 4 + 1  # BN vectors and the stem bias


def test_concat_gives_each_input_its_offset():
    _, groups = _groups(["concat"])
    offsets = sorted(m.offset for g in groups for m in g.consumers if m.node.startswith("MatMul"))
    assert offsets == [0, 3]


def test_flatten_before_gemm_permutes_blocks_of_features():
    _, groups = _groups(["conv"], head="flatten")
    (member,) = [m for g in groups for m in g.consumers if m.node.startswith("Gemm")]
    assert member.block == 64 and member.axis == 1


def test_grouped_conv_and_graph_outputs_freeze_with_reasons(rng):
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], "c1", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "w2"], ["b"], "grouped", pads=[1, 1, 1, 1], group=2),
        helper.make_node("Transpose", ["b"], ["y"], "tr", perm=[0, 2, 3, 1]),
    ]
    weights = {"w1": rng.standard_normal((4, 3, 3, 3)).astype(np.float32)}
    weights["w2"] = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    groups = find_groups(make_model(nodes, [("x", [1, 3, 6, 6])], ["y"], weights))
    reasons = sorted(g.frozen for g in groups)
    assert any("grouped Conv (group=2)" in r for r in reasons)
    assert all(g.frozen for g in groups)


def test_a_frozen_group_cannot_be_permuted():
    model, groups = _groups(["conv"])
    frozen = next(i for i, g in enumerate(groups) if g.frozen)
    with pytest.raises(ValueError, match="is frozen"):
        apply_permutations(model, groups, {frozen: np.arange(groups[frozen].size)})


def test_bundled_mnist_groups_verify():
    from conftest import ROOT

    from onnxpq.model.files import load_model

    model = load_model(ROOT / "models/mnist_cnn.onnx")
    groups = find_groups(model)
    assert sum(not g.frozen for g in groups) == 4
    x = np.load(ROOT / "models/mnist_calib.npz")["input"][:8]
    assert verify_groups(model, groups, Dataset({"input": x}, "mnist"), np.random.default_rng(0)) <= 1e-5


def test_a_per_channel_exponent_is_permuted_with_its_channels(rng):
    """Pow's exponent is an operand like Mul's scale: a per-channel one must follow the permutation."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], "c1"),
        helper.make_node("Sigmoid", ["a"], ["s"], "sig"),
        helper.make_node("Pow", ["s", "e"], ["p"], "pow"),
        helper.make_node("Conv", ["p", "w2"], ["y"], "c2"),
    ]
    weights = {
        "w1": rng.standard_normal((6, 3, 1, 1)).astype(np.float32),
        "e": rng.uniform(0.5, 3.0, (1, 6, 1, 1)).astype(np.float32),
        "w2": rng.standard_normal((4, 6, 1, 1)).astype(np.float32),
    }
    model = make_model(nodes, [("x", [2, 3, 5, 5])], ["y"], weights)
    groups = find_groups(model)
    (free,) = [g for g in groups if not g.frozen]
    assert "e" in {m.tensor for m in free.members}
    assert (
        verify_groups(model, groups, Dataset({"x": rng.standard_normal((2, 3, 5, 5)).astype(np.float32)}, "t"), rng)
        <= 1e-5
    )


@pytest.mark.parametrize(("pads", "free"), [([0, 0, 1, 2, 0, 0, 2, 1], True), ([0, 1, 0, 0, 0, 0, 0, 0], False)])
def test_pad_passes_channels_through_unless_it_pads_them(rng, pads, free):
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], "c1"),
        helper.make_node("Pad", ["a", "pads"], ["p"], "pad", mode="reflect"),
        helper.make_node("Conv", ["p", "w2"], ["y"], "c2"),
    ]
    weights = {
        "w1": rng.standard_normal((6, 3, 1, 1)).astype(np.float32),
        "pads": np.array(pads, dtype=np.int64),
        "w2": rng.standard_normal((4, 6 + pads[1] + pads[5], 3, 3)).astype(np.float32),
    }
    model = make_model(nodes, [("x", [2, 3, 5, 5])], ["y"], weights)
    groups = find_groups(model)
    channel_group = next(g for g in groups if any(m.tensor == "w1" and m.axis == 0 for m in g.members))
    assert (not channel_group.frozen) == free
    if not free:
        assert "Pad pads the channel axis" in channel_group.frozen
    x = Dataset({"x": rng.standard_normal((2, 3, 5, 5)).astype(np.float32)}, "t")
    assert verify_groups(model, groups, x, rng) <= 1e-5


@pytest.mark.parametrize(("sizes", "free"), [([5, 6], 2), ([4, 7], 0)])
def test_split_hands_each_output_its_groups_or_freezes_the_one_it_cuts(rng, sizes, free):
    """Concat of two convs, Split back: free when the cut falls between them, frozen when it cuts one."""
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], "ca"),
        helper.make_node("Conv", ["x", "wb"], ["b"], "cb"),
        helper.make_node("Concat", ["a", "b"], ["c"], "cat", axis=1),
        helper.make_node("Relu", ["c"], ["r"], "relu"),
        helper.make_node("Split", ["r", "sizes"], ["s0", "s1"], "split", axis=1),
        helper.make_node("Conv", ["s0", "w0"], ["y0"], "c0"),
        helper.make_node("Conv", ["s1", "w1"], ["y1"], "c1"),
    ]
    weights = {
        "wa": rng.standard_normal((5, 3, 1, 1)).astype(np.float32),
        "wb": rng.standard_normal((6, 3, 1, 1)).astype(np.float32),
        "sizes": np.array(sizes, dtype=np.int64),
        "w0": rng.standard_normal((2, sizes[0], 3, 3)).astype(np.float32),
        "w1": rng.standard_normal((2, sizes[1], 3, 3)).astype(np.float32),
    }
    model = make_model(nodes, [("x", [2, 3, 5, 5])], ["y0", "y1"], weights, opset=13)
    groups = find_groups(model)
    assert sum(not g.frozen for g in groups) == free
    if not free:
        assert any("Split cuts a channel group" in (g.frozen or "") for g in groups)
    x = Dataset({"x": rng.standard_normal((2, 3, 5, 5)).astype(np.float32)}, "t")
    assert verify_groups(model, groups, x, rng) <= 1e-5
