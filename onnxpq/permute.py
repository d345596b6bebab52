"""Apply channel permutations to a model's constants, and prove that they leave its outputs unchanged.

The search for the permutation that makes subvectors easiest to quantize
builds on these: ``apply_permutations`` is the only place constants are
reordered, and ``verify_groups`` is the check that the channel rules
(``channels``) are right for a given model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from onnxpq.calibration import Dataset
from onnxpq.channels import ChannelGroup, Member
from onnxpq.encode import replace_constants
from onnxpq.graph import constant_tensors

__all__ = ["apply_permutations", "permuted_member", "verify_groups"]


def permuted_member(array: np.ndarray, member: Member, perm: np.ndarray) -> np.ndarray:
    """``array`` with its channel positions reordered: new channel c holds old channel ``perm[c]``."""
    index = np.arange(array.shape[member.axis])
    block = np.arange(member.block)
    for new, old in enumerate(perm):
        start = member.offset + new * member.block
        index[start : start + member.block] = member.offset + old * member.block + block
    return np.take(array, index, axis=member.axis)


def apply_permutations(
    model: onnx.ModelProto, groups: Sequence[ChannelGroup], perms: Mapping[int, np.ndarray]
) -> onnx.ModelProto:
    """A copy of ``model`` with group i's members reordered by ``perms[i]``; the graph itself is unchanged."""
    values = {name: c.to_array() for name, c in constant_tensors(model.graph).items()}
    changed: dict[str, np.ndarray] = {}
    for i, perm in perms.items():
        group = groups[i]
        if group.frozen:
            raise ValueError(f"group {i} is frozen ({group.frozen}) and cannot be permuted")
        for m in group.members:
            changed[m.tensor] = permuted_member(changed.get(m.tensor, values[m.tensor]), m, perm)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    replace_constants(out.graph, changed)
    return out


def verify_groups(
    model: onnx.ModelProto, groups: Sequence[ChannelGroup], dataset: Dataset, rng: np.random.Generator
) -> float:
    """Largest relative output difference after a random permutation of every free group (0 when exact).

    A value above float rounding (about 1e-5) means a channel rule is wrong for this model.
    """
    from onnxpq.validate import run_session, session

    perms = {i: rng.permutation(g.size) for i, g in enumerate(groups) if not g.frozen}
    permuted = apply_permutations(model, groups, perms)
    ref = run_session(session(model.SerializeToString()), dataset, model)
    got = run_session(session(permuted.SerializeToString()), dataset, model)
    worst = 0.0
    for r, g in zip(ref, got, strict=True):
        scale = max(float(np.max(np.abs(r))), 1e-12)
        worst = max(worst, float(np.max(np.abs(r.astype(np.float64) - g))) / scale)
    return worst
