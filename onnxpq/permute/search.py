"""The P of PQF: reorder channels so that each consumer's subvectors are easier to quantize.

For every free channel group (``channels``), the objective is PQF's: the log
determinant of the covariance of each consumer's subvectors (a proxy for the
k-means distortion at a given k), summed over consumers weighted by their
number of subvectors. The search starts from PQF's balanced order and keeps
random pair swaps that lower it; it never returns a permutation worse than the
identity. ``apply_permutations`` is the only place constants are reordered,
offline, so the permuted model has the same nodes and runs at the same speed;
``verify_groups`` checks that the channel rules hold on a given model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxpq.calibration import Dataset
from onnxpq.config import CompressConfig
from onnxpq.model.files import serialized
from onnxpq.model.graph import constant_tensors, with_constants
from onnxpq.parallel import Workers, map_tasks
from onnxpq.permute.channels import ChannelGroup, Member, find_groups
from onnxpq.quantize.layer import quantize_layer
from onnxpq.quantize.layout import data_aware, input_order, unit_matrix
from onnxpq.quantize.selection import Candidate

__all__ = [
    "GroupSearch",
    "apply_permutations",
    "consumer_distortion",
    "permute_model",
    "permuted_member",
    "search_group",
    "verify_groups",
]


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
    return with_constants(model, changed)


def verify_groups(
    model: onnx.ModelProto, groups: Sequence[ChannelGroup], dataset: Dataset, rng: np.random.Generator
) -> float:
    """Largest relative output difference after a random permutation of every free group (0 when exact).

    A value above float rounding (about 1e-5) means a channel rule is wrong for this model.
    """
    from onnxpq.calibration import run_session
    from onnxpq.model.session import session

    perms = {i: rng.permutation(g.size) for i, g in enumerate(groups) if not g.frozen}
    permuted = apply_permutations(model, groups, perms)
    ref = run_session(session(serialized(model)), dataset, model)
    got = run_session(session(serialized(permuted)), dataset, model)
    worst = 0.0
    for r, g in zip(ref, got, strict=True):
        scale = max(float(np.max(np.abs(r))), 1e-12)
        worst = max(worst, float(np.max(np.abs(r.astype(np.float64) - g))) / scale)
    return worst


@dataclass
class _Consumer:
    """One consumer weight of a group, seen as PQ will cut it: its subvectors' second moments by slot.

    ``slots[j, t]`` is the column of ``U`` at slot t of subvector position j; ``owner[col]`` is the group
    channel position the column belongs to (-1 outside the group) and ``inner[col]`` its index among
    that channel's columns. A permutation moves whole channels, so column (p, r) takes the values of
    column (perm[p], r); the second moments M = Σ_j K[σ(slots_j), σ(slots_j)] then change only in the
    subvector positions that hold a swapped channel, which is what makes a swap cheap to evaluate.
    """

    gram: np.ndarray  # K = UᵀU over columns, (R, R)
    colsum: np.ndarray  # Σ_o U[o, col], (R,)
    slots: np.ndarray  # (positions, d) column indices
    owner: np.ndarray  # (R,) channel position or -1
    by_channel: list[np.ndarray]  # subvector positions touching each channel position
    column_of: np.ndarray  # (channels, per_channel) column of (channel position, inner index)
    inner: np.ndarray  # (R,)
    weight: float  # how much this consumer counts: its number of subvectors
    rows: int

    def sigma(self, perm: np.ndarray) -> np.ndarray:
        """Old column feeding each new column under ``perm``."""
        out = np.arange(len(self.owner))
        inside = self.owner >= 0
        out[inside] = self.column_of[perm[self.owner[inside]], self.inner[inside]]
        return out

    def moments(self, perm: np.ndarray, positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(Σ_j K[σ s_j, σ s_j], Σ_j colsum[σ s_j]) over ``positions`` (all by default)."""
        slots = self.slots if positions is None else self.slots[positions]
        cols = self.sigma(perm)[slots]
        second = self.gram[cols[:, :, None], cols[:, None, :]].sum(axis=0)
        return second, self.colsum[cols].sum(axis=0)

    def logdet(self, second: np.ndarray, first: np.ndarray) -> float:
        n = self.rows * len(self.slots)
        cov = second / n - np.outer(first, first) / n**2
        d = len(cov)
        ridge = 1e-6 * max(float(np.trace(cov)) / d, 1e-30)
        return float(np.linalg.slogdet(cov + ridge * np.eye(d))[1])


def _consumer(member: Member, group: ChannelGroup, cand: Candidate, array: np.ndarray) -> _Consumer | None:
    """The consumer's layout as PQ cuts it, or None when the permutation cannot change its subvectors."""
    input_axis = 0 if cand.strided else 1
    if member.axis != input_axis or not data_aware(cand) or cand.kind not in ("Conv", "Gemm", "MatMul"):
        return None
    units = unit_matrix(array, cand).astype(np.float64)
    order = input_order(cand)
    per = math.prod(cand.shape[2:]) if cand.kind == "Conv" else 1
    channel, within = order // per, order % per
    rel = channel - member.offset
    inside = (rel >= 0) & (rel < group.size * member.block)
    owner = np.where(inside, rel // member.block, -1)
    inner = np.where(inside, (rel % member.block) * per + within, 0)
    d = cand.subvector_dim
    slots = np.arange(units.shape[1]).reshape(-1, d)
    if np.all(owner[slots] == owner[slots][:, :1]):
        return None  # every subvector lies inside one channel (e.g. one 3x3 kernel): order does not matter
    column_of = np.zeros((group.size, member.block * per), dtype=np.int64)
    column_of[owner[inside], inner[inside]] = np.flatnonzero(inside)
    by_channel = [np.unique(np.flatnonzero(owner[slots] == p) // d) for p in range(group.size)]
    return _Consumer(
        gram=units.T @ units,
        colsum=units.sum(axis=0),
        slots=slots,
        owner=owner,
        by_channel=by_channel,
        column_of=column_of,
        inner=inner,
        weight=float(len(slots) * units.shape[0]),
        rows=units.shape[0],
    )


def _balanced_start(consumer: _Consumer, size: int) -> np.ndarray | None:
    """PQF's start: channels sorted by energy, dealt zig-zag over the d slots, so each subvector
    gathers channels of similar magnitude. Only for layouts with one column per channel."""
    if consumer.column_of.shape[1] != 1:
        return None
    d = consumer.slots.shape[1]
    slot_of = np.zeros(size, dtype=np.int64)
    position = np.zeros(size, dtype=np.int64)
    for j, row in enumerate(consumer.slots):
        for t, col in enumerate(row):
            if consumer.owner[col] >= 0:
                slot_of[consumer.owner[col]], position[consumer.owner[col]] = t, j
    energy = np.diagonal(consumer.gram)[consumer.column_of[:, 0]]
    ranked = np.argsort(-energy, kind="stable")
    targets = [list(np.flatnonzero(slot_of == t)[np.argsort(position[slot_of == t], kind="stable")]) for t in range(d)]
    perm = np.empty(size, dtype=np.int64)
    pattern = [*range(d), *reversed(range(d))]
    rank = 0
    while rank < size:
        for t in pattern:
            if rank < size and targets[t]:
                perm[targets[t].pop(0)] = ranked[rank]
                rank += 1
        if not any(targets):
            break
    return perm if rank == size else None


@dataclass(frozen=True)
class GroupSearch:
    """What the search did to one group: its objective (Σ weighted log det) before and after."""

    perm: np.ndarray
    before: float
    after: float


def search_group(consumers: Sequence[_Consumer], size: int, iters: int, rng: np.random.Generator) -> GroupSearch:
    """Minimise Σ_c n_c · log det Cov(subvectors of c) over channel permutations; never worse than identity.

    Balanced start, then random pair swaps kept when they lower the objective. A swap
    only recomputes the subvector positions holding the two channels, per consumer.
    """
    identity = np.arange(size)

    def total(perm: np.ndarray) -> tuple[float, list[tuple[np.ndarray, np.ndarray]]]:
        states = [c.moments(perm) for c in consumers]
        return sum(c.weight * c.logdet(*s) for c, s in zip(consumers, states, strict=True)), states

    before, states = total(identity)
    perm, cost = identity, before
    start = _balanced_start(consumers[0], size)
    if start is not None:
        start_cost, start_states = total(start)
        if start_cost < cost:
            perm, cost, states = start, start_cost, start_states
    for _ in range(iters if size > 1 else 0):
        p, q = rng.choice(size, 2, replace=False)
        trial = perm.copy()
        trial[p], trial[q] = perm[q], perm[p]
        new_states, new_cost = [], 0.0
        for c, (second, first) in zip(consumers, states, strict=True):
            touched = np.union1d(c.by_channel[p], c.by_channel[q])
            old2, old1 = c.moments(perm, touched)
            new2, new1 = c.moments(trial, touched)
            state = (second - old2 + new2, first - old1 + new1)
            new_states.append(state)
            new_cost += c.weight * c.logdet(*state)
        if new_cost < cost - 1e-9 * abs(cost):
            perm, cost, states = trial, new_cost, new_states
    return GroupSearch(perm, before, cost)


def permute_model(
    model: onnx.ModelProto,
    candidates: Sequence[Candidate],
    *,
    iters: int,
    seed: int,
    progress: bool = False,
    workers: Workers | None = None,
) -> tuple[onnx.ModelProto, dict[str, object]]:
    """Find the channel groups, search each one's permutation, apply them; return the model and a report.

    Groups are searched independently (each with its own seed), so ``workers`` may run them anywhere.
    """
    groups = find_groups(model)
    by_name = {c.name: c for c in candidates if c.compressed}
    values = {name: c.to_array() for name, c in constant_tensors(model.graph).items()}
    perms, rows, searches = {}, [], []
    for i, g in enumerate(groups):
        if g.frozen:
            continue
        searched = [
            (m.tensor, c)
            for m in g.consumers
            if m.tensor in by_name and (c := _consumer(m, g, by_name[m.tensor], values[m.tensor])) is not None
        ]
        row = {"group": i, "origin": g.origin, "channels": g.size, "members": sorted({m.tensor for m in g.members})}
        if searched:
            row["consumers"] = sorted({name for name, _ in searched})
            searches.append((i, row, ([c for _, c in searched], g.size, iters, np.random.default_rng([seed, i]))))
        rows.append(row)
    found = map_tasks(
        search_group,
        (task for _, _, task in searches),
        workers or Workers(),
        total=len(searches),
        desc="permute",
        progress=progress,
    )
    for (i, row, _), result in zip(searches, found, strict=True):
        row |= {"objective_before": result.before, "objective_after": result.after}
        if result.after < result.before:
            perms[i] = result.perm
    frozen: dict[str, int] = {}
    for g in groups:
        if g.frozen:
            frozen[g.frozen] = frozen.get(g.frozen, 0) + 1
    report = {
        "groups": len(groups),
        "free": sum(not g.frozen for g in groups),
        "permuted": len(perms),
        "rows": rows,
        "frozen": frozen,
    }
    return apply_permutations(model, groups, perms), report


def _subvector_set(weight: np.ndarray, c: Candidate) -> np.ndarray:
    """The weight's subvectors in a canonical (sorted) order: equal when only their order differs."""
    sub = unit_matrix(weight, c).reshape(-1, c.subvector_dim)
    return sub[np.lexsort(sub.T[::-1])]


def consumer_distortion(
    original: onnx.ModelProto, permuted: onnx.ModelProto, candidates: Sequence[Candidate], config: CompressConfig
) -> dict[str, dict[str, float]]:
    """Data-free k-means SQNR (dB) of each consumer weight, without and with the permutation.

    Consumers are the weights whose subvectors the permutation regroups (the
    others only have their rows reordered). Same k, d and seed on both sides, so
    the difference is the permutation's alone; the search's objective is only a
    proxy for this distortion.
    """
    before, after = constant_tensors(original.graph), constant_tensors(permuted.graph)
    out = {}
    for c in candidates:
        old, new = before[c.name].to_array(), after[c.name].to_array()
        if not c.compressed or np.array_equal(_subvector_set(old, c), _subvector_set(new, c)):
            continue
        without, with_ = (quantize_layer(w, c, config).error.sqnr_db for w in (old, new))
        out[c.name] = {"sqnr_without_db": without, "sqnr_with_db": with_}
    return out
