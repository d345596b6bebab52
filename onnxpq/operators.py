"""The operator registry: everything onnxpq knows about an operator that holds weights, in one entry.

Adding an operator is one ``Operator`` in ``REGISTRY`` plus tests. An entry says

1. which inputs hold weights (``weight_inputs``);
2. how a weight is cut into subvectors (``layout``: a Conv's kernel slab per output channel, or the
   last axis of everything else) and whether its first axis is the one the node reduces over
   (``inputs_first``: MatMul's [K, N], Gemm with transB=0), so subvectors run along the inputs;
3. how the layer's input statistics are gathered (``statistics``: im2col patches, the rows of the
   input, or an RNN's input and hidden-state sequences), for which weight ranks, and which attribute
   transposes the input (Gemm's transA);
4. where the layer's bias lives, so quantization's mean output shift can be folded into it
   (``bias_input`` with ``bias_scale``, or an ``Add`` right after the node: ``bias_after_add``);
5. whether the node multiplies the weight with its input (``multiplies``): a constant that reaches
   only such nodes through reshaping operators (Silero's sliced LSTM gates) is still a weight.

Not here: how channels flow through elementwise and normalisation operators (``permute.channels``,
which needs no entry for a weight operator that only consumes channels) and how the fine-tuning
executor runs an operator (``finetune.executor``'s table covers every operator a graph may hold,
weights or not; an operator missing there makes fine-tuning stop with a clear message, nothing else).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "MULTIPLYING",
    "OP_TYPES",
    "REGISTRY",
    "RESHAPING_OPS",
    "Operator",
    "conv_pads",
    "operator",
]

Layout = Literal["kernel", "rows"]
Statistics = Literal["patches", "rows", "sequence"]


def _never(attrs: Mapping[str, object], index: int) -> bool:
    return False


def _matmul_inputs_first(attrs: Mapping[str, object], index: int) -> bool:
    """MatMul's weight B [K, N] is reduced over its first axis."""
    return index == 1


def _gemm_inputs_first(attrs: Mapping[str, object], index: int) -> bool:
    """Gemm's B is [K, N] unless transB, when it is [N, K] like a Conv's filters."""
    return index == 1 and not attrs.get("transB", 0)


def _unit_scale(attrs: Mapping[str, object]) -> float:
    return 1.0


def _gemm_bias_scale(attrs: Mapping[str, object]) -> float:
    """Gemm computes alpha·A·B + beta·C: one unit of output shift is alpha/beta units of C (0: no correction)."""
    beta = float(attrs.get("beta", 1.0))
    return float(attrs.get("alpha", 1.0)) / beta if beta else 0.0


@dataclass(frozen=True)
class Operator:
    """One operator's entry (see the module docstring for what each field decides)."""

    name: str
    weight_inputs: tuple[int, ...]
    layout: Layout = "rows"
    inputs_first: Callable[[Mapping[str, object], int], bool] = _never
    statistics: Statistics | None = None
    #: Weight ranks the statistics apply to (None: any); a batched [B, K, N] MatMul weight has no unit rows.
    statistics_ranks: tuple[int, ...] | None = None
    transposed_input: str | None = None
    bias_input: int | None = None
    bias_scale: Callable[[Mapping[str, object]], float] = _unit_scale
    bias_after_add: bool = False
    multiplies: bool = True
    #: The attribute holding the input group count (Conv's ``group``).
    groups: str | None = None

    def reads_output(self, index: int) -> bool:
        """Whether the weight at input ``index`` multiplies the node's own output: a recurrent R, fed the hidden
        states h_1 ... h_T that Y holds, standing in for h_0 ... h_{T-1}."""
        return self.statistics == "sequence" and index == 2

    def activation(self, inputs: Sequence[str], outputs: Sequence[str], index: int) -> str | None:
        """The tensor whose rows multiply the weight at input ``index``: the node's first input, or its output
        Y (``reads_output``); None where there is none (a recurrent node that does not output Y)."""
        if self.reads_output(index):
            return outputs[0] if outputs and outputs[0] else None
        return inputs[0] if index == min(self.weight_inputs) else None

    def has_statistics(self, rank: int) -> bool:
        """Whether a weight of this rank gets input statistics (data-aware quantization)."""
        return self.statistics is not None and (self.statistics_ranks is None or rank in self.statistics_ranks)


REGISTRY: dict[str, Operator] = {
    op.name: op
    for op in (
        Operator("Conv", (1,), "kernel", statistics="patches", bias_input=2, groups="group"),
        Operator("ConvTranspose", (1,), "kernel"),
        Operator(
            "Gemm",
            (1,),
            inputs_first=_gemm_inputs_first,
            statistics="rows",
            statistics_ranks=(2,),
            transposed_input="transA",
            bias_input=2,
            bias_scale=_gemm_bias_scale,
        ),
        Operator(
            "MatMul",
            (1,),
            inputs_first=_matmul_inputs_first,
            statistics="rows",
            statistics_ranks=(2,),
            bias_after_add=True,
        ),
        # onnxruntime's com.microsoft fused MatMul (its transformer optimizer's MatMul + Transpose + Mul):
        # alpha * op(A) @ op(B), B [K, N] unless transB.
        Operator(
            "FusedMatMul",
            (1,),
            inputs_first=_gemm_inputs_first,
            statistics="rows",
            statistics_ranks=(2,),
            transposed_input="transA",
        ),
        Operator("Gather", (0,), multiplies=False),
        # A constant operand of an Einsum, either one: "btd,hde->bhte" or "hde,btd->bhte".
        Operator("Einsum", (0, 1)),
        # W [directions, gates x hidden, input] multiplies each step's input, R [.., hidden] the previous h.
        Operator("LSTM", (1, 2), statistics="sequence"),
        Operator("GRU", (1, 2), statistics="sequence"),
        Operator("RNN", (1, 2), statistics="sequence"),
    )
}
#: Operator types whose weights onnxpq compresses (``--op-types``'s choices), in registry order.
OP_TYPES = tuple(REGISTRY)
#: Operators that multiply a weight with their input: what a weight read through reshaping operators must reach.
MULTIPLYING = frozenset(name for name, op in REGISTRY.items() if op.multiplies)
#: Operators that only cut, join or reshape a tensor: a weight read only through them is still a weight.
RESHAPING_OPS = frozenset({"Slice", "Split", "Concat", "Squeeze", "Unsqueeze", "Reshape", "Flatten", "Identity"})


def operator(op_type: str) -> Operator | None:
    """The registry entry of an operator type, None for one that holds no weights onnxpq compresses."""
    return REGISTRY.get(op_type)


def conv_pads(
    attrs: Mapping[str, object], spatial: Sequence[int], extent: Sequence[int], strides: Sequence[int]
) -> list[tuple[int, int]]:
    """(begin, end) padding per spatial axis of a Conv or pool, resolving ``auto_pad`` as onnxruntime does.

    ``extent`` is the dilated kernel size, (k - 1) * dilation + 1, per axis.
    """
    auto = attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    n = len(spatial)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for s, e, st in zip(spatial, extent, strides, strict=True):
            total = max((math.ceil(s / st) - 1) * st + e - s, 0)
            small = total // 2
            out.append((small, total - small) if auto == "SAME_UPPER" else (total - small, small))
        return out
    if auto == "VALID":
        return [(0, 0)] * n
    pads = list(attrs.get("pads", [0] * 2 * n))  # type: ignore[call-overload]
    return [(pads[i], pads[i + n]) for i in range(n)]
