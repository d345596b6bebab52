"""Layer input statistics: the second moment H = E[x xᵀ] of every compressed layer's inputs.

The output error of a layer whose weight moves from W to Ŵ is
``Σ_units (w - ŵ)ᵀ H (w - ŵ)`` summed over the samples, so H is all a quantizer
needs to minimise ‖X(W - Ŵ)‖² instead of ‖W - Ŵ‖². For a Conv, x is one
im2col patch (per group), ordered like the filter's flattened (channel, kernel)
weights. H is accumulated batch by batch, and each batch's rows a bounded
chunk at a time (``ROW_CHUNK_BYTES``): memory stays at one batch of activations
plus one chunk plus the statistics, whatever the number of samples.

The statistics live within a memory budget (``CompressConfig.statistics_memory_mib``,
see ``plan_blocks``). A layer whose full (groups, R, R) H does not fit its share
keeps only the diagonal blocks of B contiguous columns (B a multiple of every
subvector dimension the allocator may try, dividing R; the largest that fits):
the quantizers see each (group, column block) as a group of its own, so they run
unchanged on R/B times more groups of B inputs. A 1-D audio conv with 64 taps
over 1024 channels (R = 65 536, a 17 GB H in float32) is quantized that way in megabytes.

The inputs are read with onnxruntime by exposing the layers' input tensors as
extra graph outputs, so the statistics are those of the deployed graph (run without onnxruntime's packed
weight copies, which can move a MatMul's outputs in their last bits).
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import numpy_helper
from tqdm.auto import tqdm

from onnxpq.calibration import Dataset, batches, run_size
from onnxpq.config import MAX_ROWS, ROWS_PER_INPUT, STATISTICS_MEMORY_MIB
from onnxpq.errors import ConfigError
from onnxpq.model.files import serialized_with_outputs
from onnxpq.model.graph import attributes, display_name
from onnxpq.model.subgraphs import inline_branches
from onnxpq.operators import REGISTRY, Operator, conv_pads
from onnxpq.quantize.layout import data_aware, input_order
from onnxpq.quantize.selection import Candidate, variants

__all__ = [
    "LayerStats",
    "StatsShape",
    "collect_stats",
    "conv_patches",
    "inline_taken",
    "plan_blocks",
    "taken_branches",
]

#: Samples per onnxruntime call: bounds the activations held at once.
BATCH = 8
#: Most bytes of input rows (im2col patches) materialised at once per layer: one sample of a
#: 1-D conv over 1024 channels with 64 taps is 256 KiB per output position, 4 GB at 16 000 positions.
ROW_CHUNK_BYTES = 64 << 20
#: Share of the statistics budget the H of all layers together may hold (the rest is working memory).
HELD_SHARE = 2
#: Share of the budget one layer's H may take: quantizing it holds about eight float64 copies of it.
LAYER_SHARE = 16
#: Most B² per output unit of a full H block (``StatsShape.affordable``). Factoring an R x R H costs R³
#: whatever the number of units reading it: a 1-D conv with 8 outputs over 64 channels x 64 taps
#: (R = 4096) spent minutes per allocator setting on it. Every layer of MobileNetV2, MNIST, MiniLM and
#: PP-OCRv4 rec is below this bound (the highest, a PP-OCR conv with R = 2880 and 60 units, is at half of it),
#: so blocks appear only where a layer has far more inputs than outputs.
WORK_PER_WEIGHT = 1 << 18
#: What a refused statistics plan suggests.
_MORE_MEMORY = "raise statistics_memory_mib (--statistics-memory) or compress fewer layers data-aware"


#: Given how many input rows a batch holds, the sorted indices of those to use, or None for all.
Picker = Callable[[int], np.ndarray | None]


@dataclass(frozen=True)
class LayerStats:
    """Input statistics of one weight, in ``layout.unit_matrix`` column order.

    Parameters
    ----------
    moment : (groups, R, R), mean of (x - centre)(x - centre)ᵀ over all input rows (patches, tokens,
        samples). Block-diagonal statistics hold (groups * blocks, B, B): the diagonal blocks of B
        columns, block b of unit group g at index g * blocks + b. As collected it is held in float32
        about ``centre``, since a run holds every layer's at once (on a 108 M-parameter BERT, half a
        gigabyte in float32); ``working`` hands a quantizer the float64 H of one layer it computes in.
    mean : (groups, R) float64, mean of x; the output shift a bias can absorb
        ((groups * blocks, B) when block-diagonal).
    rows : number of input rows averaged.
    blocks : column blocks per unit group; 1 is the full H.
    order : (R,) which input of the node each column holds (``layout.input_order`` of the
        candidate the statistics were collected for); None when built for the caller's layout.
    centre : (groups, R) float64, the point ``moment`` is taken about; None for zero, where ``moment`` is
        H itself. About a point near the mean, float32 keeps the covariance H - μμᵀ (which bias
        correction quantizes against) as precise as the spread of x allows; H itself in float32 loses
        it where the mean is large against the spread (mean 5, spread 0.05: 0.2 % of the covariance).
    """

    moment: np.ndarray
    mean: np.ndarray
    rows: int
    blocks: int = 1
    order: np.ndarray | None = None
    centre: np.ndarray | None = None
    #: ``covariance()`` computed ahead by ``with_covariance``.
    known_covariance: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def hessian(self) -> np.ndarray:
        """H = E[x xᵀ]: ``moment`` itself about zero; else put together in float64, a new array at each call
        (quantizers read the one ``working`` holds)."""
        if self.centre is None:
            return self.moment
        h = self._about_mean()
        h += self.mean[:, :, None] * self.mean[:, None, :]
        return h

    def _about_mean(self) -> np.ndarray:
        """E[(x - μ)(x - μ)ᵀ] in float64 from the moment about the centre (the centre's offset d = μ - c
        taken out: E[(x - c)(x - c)ᵀ] = cov + ddᵀ)."""
        d = self.mean - self.centre
        cov = self.moment.astype(np.float64)
        cov -= d[:, :, None] * d[:, None, :]
        return cov

    def with_covariance(self) -> LayerStats:
        """These statistics holding their covariance: the allocator quantizes a layer at several settings in a
        row, and on MiniLM's 1536-input layers computing it again for each took a tenth of the estimates' time."""
        return replace(self, known_covariance=self.covariance())

    def working(self, order: np.ndarray) -> LayerStats | None:
        """The statistics a quantizer computes with: H in float64, columns in ``order`` (a layout's
        ``input_order``); None where they cannot be put in that order.

        A strided MatMul weight's column order depends on its subvector length, so
        the allocator's variants of one weight need the same H in other orders. A full
        H is re-indexed; block-diagonal blocks cut across another order's subvectors,
        so a variant in another order gets no statistics (it is quantized data-free,
        and the allocator measures it as such).
        """
        if self.order is None or np.array_equal(self.order, order):
            return replace(self, moment=self.hessian.astype(np.float64, copy=False), centre=None)
        if self.blocks > 1:
            return None
        index = np.argsort(self.order)[order]
        h, mean = self.hessian[:, index][:, :, index].astype(np.float64, copy=False), self.mean[:, index]
        return LayerStats(moment=h, mean=mean, rows=self.rows, order=order)

    @property
    def groups(self) -> int:
        """Groups as the quantizers see them: (unit group, column block) pairs."""
        return self.moment.shape[0]

    @property
    def block(self) -> int:
        """Columns per block: R when the H is full."""
        return self.moment.shape[-1]

    @property
    def form(self) -> str:
        """How the report names this form of H: ``full`` or ``block-diagonal B``."""
        return "full" if self.blocks == 1 else f"block-diagonal {self.block}"

    def covariance(self) -> np.ndarray:
        """H - μμᵀ: the error left once the mean output shift is put back into the bias."""
        if self.known_covariance is not None:
            return self.known_covariance
        if self.centre is not None:
            return self._about_mean()
        return self.moment - self.mean[:, :, None] * self.mean[:, None, :]

    def shrinkage(self, cov: np.ndarray | None = None) -> np.ndarray:
        """Per group, the Oracle Approximating Shrinkage weight ρ of the covariance (Chen et al., 2010).

        A covariance estimated from fewer rows than it has dimensions (a classifier
        after global pooling sees one row per sample) is rank-deficient: a quantizer
        trusting it hides the error in directions the calibration data never
        explored, and on new inputs the error comes back (MobileNetV2's classifier:
        output error 6 % on the calibration samples, 9 % on other photos). Blending
        the estimate with ρ of its mean variance times I is the estimator closest
        to the true covariance under a Gaussian model (scikit-learn's form of the
        weight); with many rows ρ is ~0. ``cov``: ``covariance()``, when the caller already has it.
        """
        cov = self.covariance() if cov is None else cov
        r = cov.shape[-1]
        trace = np.trace(cov, axis1=1, axis2=2)
        trace_sq = np.sum(cov * cov, axis=(1, 2))
        num = trace_sq + trace**2
        den = (self.rows + 1) * (trace_sq - trace**2 / r)
        safe = np.where(den > 0, den, 1.0)
        return np.where(den > 0, np.minimum(num / safe, 1.0), 0.0)

    @property
    def rank_deficient(self) -> bool:
        """Fewer rows than dimensions: the covariance is singular and the quantizer can hide error in its null space."""
        return self.rows < self.moment.shape[-1]

    def metric(self, centred: bool, rho: float | None = None, cov: np.ndarray | None = None) -> np.ndarray:
        """H (or the covariance when ``centred``) with its covariance shrunk by ``rho`` towards its mean variance x I.

        ``rho`` None: ``shrinkage`` where the estimate is rank-deficient, nothing
        otherwise. From more rows than dimensions the estimate has full rank and
        OAS's ρ is below 1 %, yet shrinking PP-OCRv4's two squeeze-excitation gates
        (1024 rows, 120 and 480 inputs) by that much cost 0.035 of character
        accuracy, so a full-rank estimate is trusted as it is. The mean's outer
        product is well estimated either way and is never shrunk. ``cov``: ``covariance()``,
        when the caller already has it.
        """
        cov = self.covariance() if cov is None else cov
        if rho is None and not self.rank_deficient:
            return cov if centred else self.hessian
        weight = self.shrinkage(cov)[:, None, None] if rho is None else rho
        mean_variance = np.trace(cov, axis1=1, axis2=2)[:, None, None] / cov.shape[-1]
        base = cov if centred else self.hessian
        return base + weight * (mean_variance * np.eye(cov.shape[-1]) - cov)


@dataclass(frozen=True)
class _Reader:
    """How one node reads a weight: the activation tensor and how to turn it into rows x (the operator
    registry's ``statistics``)."""

    node: onnx.NodeProto
    weight_shape: tuple[int, ...]
    index: int

    @property
    def op(self) -> Operator:
        return REGISTRY[self.node.op_type]

    @property
    def recurrent(self) -> bool:
        """An RNN's R, read through the hidden states Y the node outputs."""
        return self.op.reads_output(self.index)

    @property
    def activation(self) -> str:
        """The tensor the weight multiplies: the node's input, or for an RNN's R the hidden states Y."""
        name = self.op.activation(self.node.input, self.node.output, self.index)
        assert name is not None, "_readers keeps only nodes with an activation"
        return name

    @property
    def groups(self) -> int:
        """Input groups of the node: a grouped Conv's ``group``, an RNN's directions for R (each its own h), else 1."""
        if self.recurrent:
            return self.weight_shape[0]
        return int(attributes(self.node).get(self.op.groups, 1)) if self.op.groups else 1

    def rows(self, x: np.ndarray, max_bytes: int, pick: Picker | None = None) -> Iterator[np.ndarray]:
        """(rows, groups, R) input vectors of this node, in the node's input order, about ``max_bytes`` at a time.

        ``pick``: given how many rows there are, the sorted indices of those to use (None: all of them).
        """
        attrs = attributes(self.node)
        if self.op.statistics == "patches":
            yield from conv_patch_chunks(x, self.weight_shape, attrs, max_bytes, pick)
            return
        if self.op.transposed_input and attrs.get(self.op.transposed_input, 0):
            x = np.swapaxes(x, -1, -2)  # the input's last two axes, as Gemm's transA (2-D) and batched forms
        if self.recurrent:  # Y [steps, directions, batch, hidden]; onnxruntime runs no batch-first layout
            x = x.transpose(0, 2, 1, 3)
        flat = x.reshape(-1, self.groups, x.shape[-1])
        keep = pick(len(flat)) if pick else None
        rows = flat if keep is None else flat[keep]
        step = max(1, max_bytes // (flat.shape[-1] * max(flat.itemsize, 4)))
        for start in range(0, len(rows), step):
            yield rows[start : start + step]


def conv_patches(x: np.ndarray, weight_shape: Sequence[int], attrs: Mapping[str, object]) -> np.ndarray:
    """im2col: every receptive field of a Conv as (patches, groups, C/g * prod(kernel)).

    Handles 1-D to 3-D kernels, strides, dilations, explicit and automatic padding and groups.
    """
    win, group, per_group = _windows(x, weight_shape, attrs)
    return np.ascontiguousarray(win).reshape(-1, group, per_group)


def conv_patch_chunks(
    x: np.ndarray,
    weight_shape: Sequence[int],
    attrs: Mapping[str, object],
    max_bytes: int,
    pick: Picker | None = None,
) -> Iterator[np.ndarray]:
    """``conv_patches`` in order, in pieces of about ``max_bytes`` (float32) when all of them would be more.

    The patches stay a strided view of the padded input until a piece is copied
    out: a piece is a run of the first output axis of one sample (at least one step of it).
    ``pick``: given the number of patches (samples x output positions), the sorted flat indices of the only
    ones to copy, or None for all.
    """
    win, group, per_group = _windows(x, weight_shape, attrs)
    positions = win.shape[: win.ndim - 1 - (len(weight_shape) - 2)]
    keep = pick(math.prod(positions)) if pick else None
    if keep is not None:
        step = max(1, max_bytes // (group * per_group * max(x.itemsize, 4)))
        for start in range(0, len(keep), step):
            picked = win[np.unravel_index(keep[start : start + step], positions)]
            yield picked.reshape(-1, group, per_group)
        return
    if win.size * max(x.itemsize, 4) <= max_bytes:
        yield np.ascontiguousarray(win).reshape(-1, group, per_group)
        return
    step = max(1, max_bytes // (win[0, 0].size * max(x.itemsize, 4)))
    for sample in win:
        for start in range(0, sample.shape[0], step):
            yield np.ascontiguousarray(sample[start : start + step]).reshape(-1, group, per_group)


def _windows(x: np.ndarray, weight_shape: Sequence[int], attrs: Mapping[str, object]) -> tuple[np.ndarray, int, int]:
    """The receptive fields as a strided view (N, *out, C, *kernel), the group count and R per group."""
    kernel = list(weight_shape[2:])
    n_sp = len(kernel)
    strides = list(attrs.get("strides", [1] * n_sp))
    dilations = list(attrs.get("dilations", [1] * n_sp))
    group = int(attrs.get("group", 1))
    extent = [(k - 1) * dl + 1 for k, dl in zip(kernel, dilations, strict=True)]
    pads = conv_pads(attrs, x.shape[2:], extent, strides)
    x = np.pad(x, [(0, 0), (0, 0), *pads])
    spatial_axes = tuple(range(2, 2 + n_sp))
    win = sliding_window_view(x, extent, axis=spatial_axes)
    steps = [slice(None, None, s) for s in strides] + [slice(None, None, d) for d in dilations]
    win = win[(slice(None), slice(None), *steps)]
    c = x.shape[1]
    out_axes = list(range(2, 2 + n_sp))
    k_axes = list(range(2 + n_sp, 2 + 2 * n_sp))
    win = win.transpose(0, *out_axes, 1, *k_axes)
    return win, group, c // group * math.prod(kernel)


def _moment(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Σ a bᵀ per group for (n, groups, R) rows: (groups, R, R) in float32, as H is held."""
    a_g = a.astype(np.float32, copy=False).transpose(1, 2, 0)
    b_g = b.astype(np.float32, copy=False).transpose(1, 0, 2)
    return np.matmul(a_g, b_g)


class _Accumulator:
    """Running sums of x xᵀ and x for one weight, over all nodes that read it: the full H, or its diagonal blocks.

    Block-diagonal sums take the rows in ``layout.unit_matrix`` column order first
    (``order``), so each block is B contiguous columns of the unit matrix; only
    those blocks are ever computed. The full H is reordered at the end, as it always was.

    The sums are of x - c in float32, c the first chunk's mean (``LayerStats.centre`` says why).
    """

    def __init__(self, order: np.ndarray, block: int) -> None:
        self.order = order
        self.block = block
        self.centre: np.ndarray | None = None
        self.xx: np.ndarray | None = None
        self.x: np.ndarray | None = None
        self.rows = 0

    @property
    def blocks(self) -> int:
        return len(self.order) // self.block

    def add(self, rows: np.ndarray) -> None:
        if self.blocks > 1:
            if not np.array_equal(self.order, np.arange(len(self.order))):
                rows = rows[:, :, self.order]
            rows = rows.reshape(len(rows), -1, self.block)
        if self.centre is None:
            self.centre = rows.mean(axis=0, dtype=np.float64).astype(np.float32)
        about = rows - self.centre
        xx = _moment(about, about)
        x = rows.sum(axis=0, dtype=np.float64)
        if self.xx is None:
            self.xx, self.x = xx, x
        else:
            self.xx += xx
            self.x += x
        self.rows += len(rows)

    def result(self) -> LayerStats:
        """The mean statistics, made from the sums in place: call it once, at the end (it uses them up)."""
        n = max(self.rows, 1)
        self.xx /= n
        centre, mean = self.centre.astype(np.float64), self.x / n
        if self.blocks > 1:
            return LayerStats(self.xx, mean, self.rows, blocks=self.blocks, order=self.order, centre=centre)
        order = self.order
        moment = self.xx[:, order][:, :, order]
        return LayerStats(moment, mean[:, order], self.rows, order=order, centre=centre[:, order])


@dataclass(frozen=True)
class StatsShape:
    """What one weight's statistics cost: unit groups, inputs per group R, the smallest block step,
    and the output units per group that share one H."""

    groups: int
    inputs: int
    step: int
    units: int | None = None

    def affordable(self, block: int) -> bool:
        """Whether factoring and applying H in blocks of ``block`` columns costs at most ``WORK_PER_WEIGHT``
        per weight: a group's work grows as R·B² and its weights as units·R (any block when units is unknown)."""
        return self.units is None or block * block <= WORK_PER_WEIGHT * self.units

    def bytes(self, block: int) -> int:
        """Bytes of the H blocks of ``block`` columns as held (float32): groups x R/B blocks of B x B."""
        return 4 * self.groups * self.inputs * block

    def working_bytes(self, block: int) -> int:
        """... and as a quantizer computes with them (float64, ``LayerStats.working``)."""
        return 2 * self.bytes(block)

    def smaller(self, block: int) -> int | None:
        """The next block below ``block``: a multiple of ``step`` that divides R; None at the smallest."""
        for b in range(block - self.step, 0, -self.step):
            if self.inputs % b == 0:
                return b
        return None


def _shape(c: Candidate, reader: _Reader) -> StatsShape:
    """The statistics' shape of a weight; blocks are multiples of every subvector dimension its variants use,
    so the allocator may try any of them on the same statistics."""
    inputs = len(input_order(c))
    step = math.lcm(*(v.subvector_dim for v in variants(c)))
    return StatsShape(reader.groups, inputs, step, max(1, c.size // inputs // reader.groups))


def plan_blocks(shapes: Mapping[str, StatsShape], memory_bytes: float) -> dict[str, int]:
    """Columns per H block for each weight: R (the full H) where the budget allows.

    The H of all layers together, as held (float32), may take ``1 / HELD_SHARE`` of
    the budget, and one layer's H as a quantizer computes with it (float64)
    ``1 / LAYER_SHARE`` of it (the rest is the working memory that quantizing a
    layer takes). While they do not fit, the layer holding the most bytes steps
    down to its next smaller block: the largest layers give up their cross-block
    terms first, and every layer whose full H fits keeps it. On MNIST's three convs
    quantized from blocks of R/2, R/4 and 9 columns, the output error rose 1.15-1.6x,
    1.5-2.2x and 3.4-4.5x over the full H (weight-space k-means: 6-11x): blocks are
    the last resort, not the default. A layer with far more inputs than outputs
    also steps down until its blocks are affordable (``StatsShape.affordable``), so
    the time per weight stays bounded. Raises ``ConfigError``
    when even the smallest blocks of every layer do not fit.
    """
    layer_cap = memory_bytes / LAYER_SHARE
    blocks = {}
    for name, sh in shapes.items():
        block = sh.inputs
        while (sh.working_bytes(block) > layer_cap or not sh.affordable(block)) and (
            smaller := sh.smaller(block)
        ) is not None:
            block = smaller
        blocks[name] = block
    while sum(shapes[n].bytes(b) for n, b in blocks.items()) > memory_bytes / HELD_SHARE:
        shrinkable = [n for n, b in blocks.items() if shapes[n].smaller(b) is not None]
        if not shrinkable:
            break
        name = max(shrinkable, key=lambda n: (shapes[n].bytes(blocks[n]), n))
        blocks[name] = shapes[name].smaller(blocks[name])
    held = sum(shapes[n].bytes(b) for n, b in blocks.items())
    work = {n: shapes[n].working_bytes(b) for n, b in blocks.items()}
    worst = max(work, key=work.get, default=None)
    memory = f"the statistics memory of {memory_bytes / 2**20:.0f} MiB"
    if held > memory_bytes / HELD_SHARE:
        need = f"the layer statistics need {held / 2**20:.0f} MiB (float32) even as the smallest blocks, "
        raise ConfigError(need + f"more than the half of {memory} all layers may hold; " + _MORE_MEMORY)
    if worst is not None and work[worst] > layer_cap:
        need = f"{worst}'s statistics need {work[worst] / 2**20:.0f} MiB (float64) to quantize even as its smallest "
        raise ConfigError(
            need + f"blocks, more than the 1/{LAYER_SHARE} of {memory} one layer may take; " + _MORE_MEMORY
        )
    return blocks


def _readers(model: onnx.ModelProto, candidates: Sequence[Candidate]) -> dict[str, list[_Reader]]:
    """For each data-aware weight, the nodes that read it as their weight input.

    An RNN's R is read through the node's output Y (the hidden states, h_1 ... h_T standing in
    for h_0 ... h_{T-1}); a node that does not output Y leaves its R data-free.
    """
    wanted = {c.name: c for c in candidates if data_aware(c)}
    nodes = {display_name(n, i): n for i, n in enumerate(model.graph.node)}
    readers: dict[str, list[_Reader]] = {}
    for c in wanted.values():
        for use in c.uses:
            node = nodes[use.node]
            reads = REGISTRY[c.kind].activation(node.input, node.output, use.input_index)
            if use.op_type == c.kind and reads is not None:
                readers.setdefault(c.name, []).append(_Reader(node, c.shape, use.input_index))
    return readers


class _Probe:
    """An onnxruntime session that returns the wanted activations (graph inputs come from the feed)."""

    def __init__(self, model: onnx.ModelProto, activations: Sequence[str]) -> None:
        from onnxpq.model.session import session

        self.session = session(serialized_with_outputs(model, activations), prepack=False)
        outputs = {o.name for o in self.session.get_outputs()}
        self.fetch = [a for a in activations if a in outputs]
        self.activations = set(activations)

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # run() with no names returns every output: skip it when all wanted tensors are graph inputs.
        outputs = self.session.run(self.fetch, dict(feed)) if self.fetch else []
        values = dict(zip(self.fetch, outputs, strict=True))
        values.update({k: v for k, v in feed.items() if k in self.activations})
        return values


def collect_stats(
    model: onnx.ModelProto,
    candidates: Sequence[Candidate],
    dataset: Dataset,
    *,
    progress: bool = False,
    memory_mib: float = STATISTICS_MEMORY_MIB,
    rows: tuple[int, int] = (MAX_ROWS, ROWS_PER_INPUT),
) -> dict[str, LayerStats]:
    """Input statistics of every data-aware candidate, from one pass of onnxruntime over the data.

    Each layer's H is full or block-diagonal as ``plan_blocks`` fits them in ``memory_mib``; ``rows``: the
    rows per layer and per input beyond which a sample of them is used (``CompressConfig.max_rows``,
    ``rows_per_input``).
    """
    readers = _readers(model, candidates)
    if not readers:
        return {}
    by_name = {c.name: c for c in candidates}
    shapes = {name: _shape(by_name[name], rs[0]) for name, rs in readers.items()}
    blocks = plan_blocks(shapes, memory_mib * 2**20)
    activations = sorted({r.activation for rs in readers.values() for r in rs})
    probe = _Probe(model, activations)
    acc = {name: _Accumulator(input_order(by_name[name]), blocks[name]) for name in readers}
    feeds = list(batches(dataset, model, batch_size=BATCH))
    # The first batch's rows times this estimate a layer's rows over the whole dataset.
    scale = dataset.n_samples / min(run_size(dataset, model, BATCH), dataset.n_samples)
    samplers = {name: _Sampler(name, scale * len(rs), shapes[name].inputs, rows) for name, rs in readers.items()}
    for index, feed in enumerate(tqdm(feeds, desc="layer statistics", unit="batch", disable=not progress, leave=False)):
        values = probe.run(feed)
        for name, rs in readers.items():
            for i, r in enumerate(rs):
                pick = functools.partial(samplers[name].pick, reader=i, batch=index)
                for rows in r.rows(np.asarray(values[r.activation]), ROW_CHUNK_BYTES, pick):
                    acc[name].add(rows)
    # Each accumulator is let go as its result is made: the reordered copies would otherwise double H at the end.
    return {name: acc.pop(name).result() for name in list(acc)}


class _Sampler:
    """Which input rows of one weight the statistics use: all, up to ``max_rows`` (or ``rows_per_input`` per
    input R, if more; ``CompressConfig``'s); beyond, the same share of every batch of every node reading it
    (so each keeps its weight in H), drawn without replacement. The share is set at the first call (its rows
    times ``scale``: the dataset's samples over that batch's, times the readers), and each draw is seeded by
    the weight's name, the reader and the batch, so the bytes are reproducible."""

    def __init__(self, name: str, scale: float, inputs: int, rows: tuple[int, int]) -> None:
        self.seed = zlib.crc32(name.encode())
        self.scale, self.inputs = scale, inputs
        self.max_rows, self.rows_per_input = rows
        self.share: float | None = None

    def pick(self, n: int, *, reader: int, batch: int) -> np.ndarray | None:
        if self.share is None:
            self.share = min(1.0, max(self.max_rows, self.rows_per_input * self.inputs) / max(n * self.scale, 1))
        if self.share >= 1 or n == 0:
            return None
        count = max(1, round(n * self.share))
        return np.sort(np.random.default_rng((self.seed, reader, batch)).choice(n, size=count, replace=False))


def taken_branches(model: onnx.ModelProto, dataset: Dataset) -> dict[str, str]:
    """For each main-graph ``If`` whose condition is the same on every calibration batch, the branch it takes.

    Silero VAD keeps its whole 16 kHz and 8 kHz networks in the two branches of an ``If`` on its
    ``sr`` input: with these, ``subgraphs.inline_branches`` gives the statistics the branch that runs.
    An ``If`` whose condition changes between batches is left out (its weights stay data-free), and
    so are the bodies of ``Loop``/``Scan`` and ``If`` nodes nested in a body.
    """
    conditions = {display_name(n, i): n.input[0] for i, n in enumerate(model.graph.node) if n.op_type == "If"}
    if not conditions:
        return {}
    initial = {t.name: t for t in model.graph.initializer}
    probe = _Probe(model, sorted({c for c in conditions.values() if c not in initial}))
    seen: dict[str, set[bool]] = {name: set() for name in conditions}
    for feed in batches(dataset, model, batch_size=BATCH):
        values = probe.run(feed)
        for name, cond in conditions.items():
            value = numpy_helper.to_array(initial[cond]) if cond in initial else values[cond]
            seen[name].add(bool(np.asarray(value).reshape(-1)[0]))
    return {name: "then_branch" if True in taken else "else_branch" for name, taken in seen.items() if len(taken) == 1}


#: Rounds of ``inline_taken``: each inlines one more level of nested ``If`` (Silero VAD nests two).
INLINE_DEPTH = 8


def inline_taken(model: onnx.ModelProto, dataset: Dataset) -> tuple[onnx.ModelProto, dict[str, str]]:
    """``model`` with every ``If`` whose condition is the same on all of ``dataset`` replaced by that branch,
    nested ones too (up to ``INLINE_DEPTH`` levels), and the branches taken by ``If`` name.

    The graph the statistics and the fine-tuning run on: onnxruntime exposes a main-graph node's
    inputs, and the torch executor runs no ``If``. It computes the same outputs on ``dataset``;
    the model written out keeps every branch.
    """
    taken: dict[str, str] = {}
    for _ in range(INLINE_DEPTH):
        found = taken_branches(model, dataset)
        if not found:
            break
        model, taken = inline_branches(model, found), {**taken, **found}
    return model, taken
