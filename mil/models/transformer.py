"""Transformer MIL: self-attention among the tiles of each bag, then gated attention pooling.

The attention kind is a config choice, computed by `mil.kernels` on the packed bags:
"softmax" (full attention within each bag), "linear" (kernelised φ(q)·Σφ(k)vᵀ per bag, linear in
the bag length), "sparse" (block or BiFormer-style routed attention over regions of each bag)
and "agent" (Han et al. 2023, "Agent Attention": a few agent tokens pooled from each bag's
queries gather from all keys and broadcast back). Tokens of different bags never interact.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from mil.batch import PackedBatch
from mil.kernels import agent_attention, attention, segment_attention_pool
from mil.kernels.segments import Segments
from mil.models.base import MILModel, MILOutput, register_model
from mil.models.layers import GatedAttentionScores, tile_embedding

AttentionKind = Literal["softmax", "linear", "sparse", "agent"]
ATTENTION_KINDS: tuple[str, ...] = ("softmax", "linear", "sparse", "agent")


class PackedSelfAttention(nn.Module):
    """Multi-head self-attention within each bag of a pack.

    Args:
        dim: token size.
        n_heads: attention heads; must divide `dim`.
        kind: attention kind (see the module docstring).
        options: keyword options of the kernel for that kind, e.g. `region_size` and `topk`
            for "sparse", `feature_map` for "linear", `num_agents` for "agent".
        dropout: dropout on the output projection.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        kind: AttentionKind,
        options: dict[str, Any],
        dropout: float,
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.kind = kind
        self.options = options
        self.qkv = nn.Linear(dim, 3 * dim)
        self.projection = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def forward(self, tokens: torch.Tensor, segments: Segments) -> torch.Tensor:
        """Return the attention output [T, dim] for tokens [T, dim]; padding rows are 0."""
        n_rows, dim = tokens.shape
        q, k, v = self.qkv(tokens).view(n_rows, 3, self.n_heads, dim // self.n_heads).unbind(1)
        if self.kind == "agent":
            mixed = agent_attention(q, k, v, segments, **self.options)  # [T, H, Dh]
        else:
            mixed = attention(q, k, v, segments, kind=self.kind, **self.options)
        return self.projection(mixed.reshape(n_rows, dim))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        kind: AttentionKind,
        options: dict[str, Any],
        mlp_ratio: float,
        dropout: float,
    ) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = PackedSelfAttention(dim, n_heads, kind, options, dropout)
        hidden = int(dim * mlp_ratio)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )

    def forward(self, tokens: torch.Tensor, segments: Segments) -> torch.Tensor:
        tokens = tokens + self.attention(self.attention_norm(tokens), segments)
        return tokens + self.mlp(self.mlp_norm(tokens))


@register_model("transformer")
class TransformerMIL(MILModel):
    """Transformer encoder over each bag's tiles, pooled with gated attention.

    Args:
        in_dim: tile feature size D.
        n_classes: number of classes C.
        embed_dim: token size.
        n_heads: attention heads per layer; must divide `embed_dim`.
        n_layers: transformer blocks.
        attention_kind: "softmax", "linear", "sparse" or "agent".
        attention_options: keyword options for the attention kernel of that kind (for example
            {"mode": "routed", "region_size": 64, "topk": 4} for "sparse").
        mlp_ratio: hidden size of each block's MLP as a multiple of `embed_dim`.
        attention_dim: hidden size of the gated attention pooling.
        dropout: dropout in the embedding, the blocks and the pooling.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        embed_dim: int = 256,
        n_heads: int = 8,
        n_layers: int = 2,
        attention_kind: AttentionKind = "softmax",
        attention_options: dict[str, Any] | None = None,
        mlp_ratio: float = 2.0,
        attention_dim: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(in_dim, n_classes)
        if attention_kind not in ATTENTION_KINDS:
            raise ValueError(
                f"unknown attention_kind {attention_kind!r}; choose one of "
                f"{', '.join(ATTENTION_KINDS)}"
            )
        if embed_dim % n_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by n_heads {n_heads}")
        options = dict(attention_options or {})
        self.embed = tile_embedding(in_dim, embed_dim, dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(embed_dim, n_heads, attention_kind, options, mlp_ratio, dropout)
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.pool_attention = GatedAttentionScores(embed_dim, attention_dim, dropout=dropout)
        self.classifier = nn.Linear(embed_dim, n_classes)

    def forward(self, batch: PackedBatch) -> MILOutput:
        """Classify each bag; attention [T] is each tile's weight in the pooled bag vector."""
        segments = batch.segments
        tokens = self.embed(batch.features)  # [T, E]
        for block in self.blocks:
            tokens = block(tokens, segments)
        tokens = self.norm(tokens)
        scores = self.pool_attention(tokens)  # [T, 1]
        pooled, weights = segment_attention_pool(tokens, scores, segments)  # [B,1,E], [T,1]
        return MILOutput(logits=self.classifier(pooled[:, 0]), attention=weights[:, 0])
