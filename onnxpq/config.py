"""Typed, validated settings for one compression run."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from onnxpq.errors import ConfigError

__all__ = ["OP_TYPES", "CompressConfig"]

#: Operator types whose weight input onnxpq knows how to compress.
OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather")

BlockSize = Literal["small", "large"]


@dataclass(frozen=True, kw_only=True)
class CompressConfig:
    """Everything that decides the bytes of the compressed model.

    Parameters
    ----------
    op_types : operator types to compress; ``("all",)`` adds every other large
        float initializer (e.g. LSTM weights).
    nodes_to_exclude, nodes_to_include : regular expressions matched (``re.search``)
        against node names; a pattern that matches no node is an error.
    min_elements : weights with fewer elements stay in float; codebooks would
        cost more than they save.
    keep_first : keep the first Conv (the one reading the image) in float, as PQF does.
    block_size : PQF's block sizes: ``small`` (d=9 for 3x3 kernels, 4 otherwise)
        or ``large`` (18 and 8).
    subvector_dim : a fixed d for every layer, overriding ``block_size``.
    n_codewords : codebook size k, clamped per layer to ``2**floor(log2(n_subvectors / 4))``.
    kmeans_iters : Lloyd iterations after k-means++ initialisation.
    seed : seeds every random choice; same seed and input give identical bytes.
    """

    op_types: tuple[str, ...] = OP_TYPES
    nodes_to_exclude: tuple[str, ...] = ()
    nodes_to_include: tuple[str, ...] = ()
    min_elements: int = 4096
    keep_first: bool = True
    block_size: BlockSize = "small"
    subvector_dim: int | None = None
    n_codewords: int = 256
    kmeans_iters: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [t for t in self.op_types if t not in OP_TYPES and t != "all"]
        if unknown:
            raise ConfigError(f"unknown op type(s) {', '.join(unknown)}; choose from {', '.join(OP_TYPES)} or 'all'")
        if not self.op_types:
            raise ConfigError("op_types is empty: nothing would be compressed")
        for pattern in self.nodes_to_exclude + self.nodes_to_include:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"invalid node pattern {pattern!r}: {err}") from None
        if self.min_elements < 1:
            raise ConfigError(f"min_elements={self.min_elements} must be >= 1")
        if self.block_size not in ("small", "large"):
            raise ConfigError(f"block_size={self.block_size!r} must be 'small' or 'large'")
        if self.subvector_dim is not None and not 1 <= self.subvector_dim <= 64:
            raise ConfigError(f"subvector_dim={self.subvector_dim} must be between 1 and 64")
        if not 2 <= self.n_codewords <= 256:
            raise ConfigError(f"n_codewords={self.n_codewords} must be between 2 and 256 (uint8 indices)")
        if self.kmeans_iters < 0:
            raise ConfigError(f"kmeans_iters={self.kmeans_iters} must be >= 0")

    @property
    def all_op_types(self) -> bool:
        return "all" in self.op_types

    def to_json(self) -> dict[str, Any]:
        """The settings as plain JSON values, for the report and ``metadata_props``."""
        return asdict(self)
