"""Mean and max pooling baselines: embed each tile, pool the bag, classify the pooled vector."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from mil.batch import PackedBatch
from mil.kernels import segment_reduce
from mil.kernels.segments import Segments
from mil.models.base import MILModel, MILOutput, register_model
from mil.models.layers import expand_to_rows, tile_embedding


class _PoolingMIL(MILModel):
    """Tile embedding, a parameter-free pooling over each bag, and a linear classifier.

    Args:
        in_dim: tile feature size D.
        n_classes: number of classes C.
        embed_dim: size of the tile embedding that is pooled.
        dropout: dropout after the tile embedding.
    """

    reduce: Literal["mean", "max"] = "mean"

    def __init__(
        self, in_dim: int, n_classes: int, embed_dim: int = 256, dropout: float = 0.25
    ) -> None:
        super().__init__(in_dim, n_classes)
        self.embed = tile_embedding(in_dim, embed_dim, dropout)
        self.classifier = nn.Linear(embed_dim, n_classes)

    def forward(self, batch: PackedBatch) -> MILOutput:
        segments = batch.segments
        tiles = self.embed(batch.features)  # [T, E]
        pooled = segment_reduce(tiles, segments, reduce=self.reduce)  # [B, E]
        logits = self.classifier(pooled)  # [B, C]
        attention = self.tile_weights(tiles, pooled, segments)  # [T]
        return MILOutput(logits=logits, attention=attention)

    def tile_weights(
        self, tiles: torch.Tensor, pooled: torch.Tensor, segments: Segments
    ) -> torch.Tensor:
        """Per-tile share [T] of the pooled vector; sums to 1 over each bag, 0 on padding."""
        raise NotImplementedError


@register_model("mean")
class MeanPoolingMIL(_PoolingMIL):
    """Mean of the tile embeddings; each tile of a bag of n tiles gets attention 1/n."""

    reduce = "mean"

    def tile_weights(
        self, tiles: torch.Tensor, pooled: torch.Tensor, segments: Segments
    ) -> torch.Tensor:
        lengths = torch.tensor(segments.lengths, dtype=tiles.dtype, device=tiles.device)
        return expand_to_rows(1.0 / lengths.clamp(min=1), segments)


@register_model("max")
class MaxPoolingMIL(_PoolingMIL):
    """Channel-wise max of the tile embeddings.

    A tile's attention is the fraction of embedding channels whose bag maximum it holds;
    a channel where several tiles tie for the maximum is shared equally among them.
    """

    reduce = "max"

    def tile_weights(
        self, tiles: torch.Tensor, pooled: torch.Tensor, segments: Segments
    ) -> torch.Tensor:
        valid = segments.valid_mask()[:, None]
        holds_max = ((tiles == expand_to_rows(pooled, segments)) & valid).to(tiles.dtype)  # [T, E]
        ties = segment_reduce(holds_max, segments, reduce="sum")  # [B, E], >= 1 unless empty
        share = holds_max / expand_to_rows(ties, segments).clamp(min=1)
        return share.mean(dim=1).detach()
