"""Attention MIL (ABMIL) of Ilse, Tomczak and Welling 2018, with or without the gate.

"Attention-based Deep Multiple Instance Learning", ICML 2018: tiles are embedded
(h_t = ReLU(W x_t)) and scored within their bag. Gated attention (the default) is
a_t = softmax_t(wᵀ(tanh(V h_t) ⊙ sigmoid(U h_t))), and plain attention is
a_t = softmax_t(wᵀ tanh(V h_t)).
The bag vector z = Σ_t a_t h_t is classified.
"""

from __future__ import annotations

from torch import nn

from mil.batch import PackedBatch
from mil.kernels import segment_attention_pool
from mil.models.base import MILModel, MILOutput, register_model
from mil.models.layers import GatedAttentionScores, TanhAttentionScores, tile_embedding


@register_model("abmil")
class ABMIL(MILModel):
    """Attention pooling with one attention head, gated or plain tanh.

    Args:
        in_dim: tile feature size D.
        n_classes: number of classes C.
        embed_dim: size of the tile embedding h.
        attention_dim: hidden size of the attention (rows of V, and of U when gated).
        dropout: dropout after the tile embedding and inside the attention.
        gated: use gated attention wᵀ(tanh(V h) ⊙ sigmoid(U h)); False uses wᵀ tanh(V h).
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        embed_dim: int = 256,
        attention_dim: int = 128,
        dropout: float = 0.25,
        gated: bool = True,
    ) -> None:
        super().__init__(in_dim, n_classes)
        self.embed = tile_embedding(in_dim, embed_dim, dropout)
        self.attention: GatedAttentionScores | TanhAttentionScores
        if gated:
            self.attention = GatedAttentionScores(embed_dim, attention_dim, dropout=dropout)
        else:
            self.attention = TanhAttentionScores(embed_dim, attention_dim, dropout=dropout)
        self.classifier = nn.Linear(embed_dim, n_classes)

    def forward(self, batch: PackedBatch) -> MILOutput:
        """Classify each bag; attention [T] is the softmax weight of each tile within its bag."""
        tiles = self.embed(batch.features)  # [T, E]
        scores = self.attention(tiles)  # [T, 1]
        pooled, weights = segment_attention_pool(tiles, scores, batch.segments)  # [B,1,E], [T,1]
        logits = self.classifier(pooled[:, 0])  # [B, C]
        return MILOutput(logits=logits, attention=weights[:, 0])
