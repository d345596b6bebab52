"""Codes that move during fine-tuning: straight-through latent weights, re-assigned to their nearest codeword.

Distillation with fixed codes can only move codewords, and every subvector that
uses a codeword moves with it. Here each decode chain also gets a latent copy of
its decoded weight, in the layout ``Gather`` yields. The forward pass still uses
the decoded weight (codebook[codes]); the gradient of the decoded weight reaches
the latent copy unchanged (the straight-through estimator), so a subvector the
loss pulls away from its codeword drifts across the boundary to another one. Every
few steps each subvector's code becomes its latent copy's nearest codeword
(PV-Tuning's discrete step, in its simplest form), and the latent copies restart
at the decoded weight: a code changes only when the gradients of those few steps
agree on it. Left to accumulate, Adam moved every latent value by about the
learning rate per step whatever its gradient, and on a small CNN without a
held-out slice the exported loss rose from 0.28 (fixed codes) to 1.04 with 307
moves; restarting each time gave 0.40 with 28. The exported model keeps its plain
codebook + indices.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from onnxpq.finetune.executor import OnnxModule
from onnxpq.model.graph import attributes, constant_tensors

__all__ = ["DecodeChain", "MovingCodes", "decode_chains"]

#: Subvectors per block of the nearest-codeword search (a block's scores are rows x k float32).
_BLOCK = 1 << 14


@dataclass(frozen=True)
class DecodeChain:
    """One ``Gather(codebook, Cast(indices))`` of the compressed model, by tensor names.

    ``table`` is what the Gather reads (the codebook, or its float32 Cast); ``axis`` 0 puts a
    codeword's values on the trailing axes of the output, axis 1 (a strided MatMul weight's
    [d, k] codebook) on its first axis.
    """

    codebook: str
    indices: str
    gathered: str
    axis: int


def decode_chains(model: onnx.ModelProto) -> list[DecodeChain]:
    """The decode chains whose codebook and indices are constants of the main graph."""
    graph = model.graph
    constants = constant_tensors(graph)
    producers = {o: n for n in graph.node for o in n.output}
    chains = []
    for node in graph.node:
        if node.op_type != "Gather" or not node.name.endswith("_pq_decode_gather"):
            continue
        table, cast = (producers.get(name) for name in node.input[:2])
        codebook = table.input[0] if table is not None and table.op_type == "Cast" else node.input[0]
        if cast is None or cast.op_type != "Cast" or codebook not in constants or cast.input[0] not in constants:
            continue
        chains.append(DecodeChain(codebook, cast.input[0], node.output[0], attributes(node).get("axis", 0)))
    return chains


class MovingCodes(torch.nn.Module):
    """Latent weights for the decode chains of ``module`` whose codebooks it trains, and their re-assignment."""

    def __init__(self, module: OnnxModule, chains: list[DecodeChain], tunable: Collection[str] | None = None) -> None:
        """``tunable``: the constants that may change (None: all); a chain moves only if its indices may."""
        super().__init__()
        trained = set(module.parameter_names)
        self.module = [module]  # a list, so the module is not registered as a child (its params are its own)
        self.chains = [
            c
            for c in chains
            if c.codebook in trained and c.indices in module.fixed_names and (tunable is None or c.indices in tunable)
        ]
        self.latent = torch.nn.ParameterList(torch.nn.Parameter(self._decoded(c)) for c in self.chains)
        for i, chain in enumerate(self.chains):
            module.adjust[chain.gathered] = self._through(i)

    def _through(self, i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The decoded weight of chain ``i`` with its latent copy's gradient path added (value unchanged)."""

        def run(value: torch.Tensor) -> torch.Tensor:
            latent = self.latent[i]
            return value + (latent - latent.detach()).to(value.dtype)

        return run

    def _decoded(self, chain: DecodeChain) -> torch.Tensor:
        module = self.module[0]
        codes = module.fixed(chain.indices).long()
        with torch.no_grad():
            return torch.index_select(module.parameter(chain.codebook), chain.axis, codes.reshape(-1)).reshape(
                self._gathered_shape(chain, codes)
            )

    def _gathered_shape(self, chain: DecodeChain, codes: torch.Tensor) -> tuple[int, ...]:
        book = self.module[0].parameter(chain.codebook)
        if chain.axis == 0:
            return (*codes.shape, *book.shape[1:])
        return (book.shape[0], *codes.shape)

    def reassign(self) -> int:
        """Give each subvector its latent weight's nearest codeword and restart the latent weight there;
        returns how many codes changed."""
        changed = 0
        with torch.no_grad():
            for chain, latent in zip(self.chains, self.latent, strict=True):
                module = self.module[0]
                book = module.parameter(chain.codebook)
                if chain.axis == 0:
                    words, points = book.reshape(len(book), -1), latent.reshape(-1, book[0].numel())
                else:
                    words, points = book.T, latent.reshape(book.shape[0], -1).T
                codes = module.fixed(chain.indices)
                new = _nearest(points.float(), words.float()).reshape(codes.shape)
                changed += int((new != codes.long()).sum())
                codes.copy_(new.to(codes.dtype))
                latent.copy_(self._decoded(chain))
        return changed

    def codes(self) -> dict[str, np.ndarray]:
        """The current codes of every chain, by indices name."""
        module = self.module[0]
        return {c.indices: module.fixed(c.indices).cpu().numpy().copy() for c in self.chains}

    def load(self, codes: dict[str, np.ndarray]) -> None:
        """Put saved codes (``codes()``) back."""
        for name, values in codes.items():
            self.module[0].set_constant(name, values)


def _nearest(points: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Index of the nearest row of ``words`` for each row of ``points``, a block of rows at a time."""
    norms = words.square().sum(1)
    out = torch.empty(len(points), dtype=torch.int64, device=points.device)
    for start in range(0, len(points), _BLOCK):
        block = points[start : start + _BLOCK]
        out[start : start + _BLOCK] = (norms - 2 * block @ words.T).argmin(1)
    return out
