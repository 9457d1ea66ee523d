"""Layers and losses shared by several MIL models (gated attention scores, bag-level losses)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mil.kernels.segments import Segments


def tile_embedding(in_dim: int, embed_dim: int, dropout: float) -> nn.Sequential:
    """Linear projection of tile features to `embed_dim`, then ReLU and dropout."""
    return nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout))


class GatedAttentionScores(nn.Module):
    """Gated attention logits (Ilse et al. 2018, "Attention-based Deep Multiple Instance Learning").

    score_k(h) = w_kᵀ (tanh(V h) ⊙ sigmoid(U h)) for K outputs that share V and U and differ only
    in the last linear layer w_k, which is how multi-branch attention (ACMIL) uses it.
    """

    def __init__(self, dim: int, attention_dim: int, n_outputs: int = 1, dropout: float = 0.0):
        super().__init__()
        self.tanh_branch = nn.Sequential(
            nn.Linear(dim, attention_dim), nn.Tanh(), nn.Dropout(dropout)
        )
        self.gate_branch = nn.Sequential(
            nn.Linear(dim, attention_dim), nn.Sigmoid(), nn.Dropout(dropout)
        )
        self.score = nn.Linear(attention_dim, n_outputs)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """Return attention logits [T, K] for tile embeddings [T, dim] (not yet normalised)."""
        return self.score(self.tanh_branch(tiles) * self.gate_branch(tiles))


class TanhAttentionScores(nn.Module):
    """Attention logits without the gate (Ilse et al. 2018): score(h) = wᵀ tanh(V h)."""

    def __init__(self, dim: int, attention_dim: int, dropout: float = 0.0):
        super().__init__()
        self.tanh_branch = nn.Sequential(
            nn.Linear(dim, attention_dim), nn.Tanh(), nn.Dropout(dropout)
        )
        self.score = nn.Linear(attention_dim, 1)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """Return attention logits [T, 1] for tile embeddings [T, dim] (not yet normalised)."""
        return self.score(self.tanh_branch(tiles))


def bag_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over bags for hard labels [B] (int64) or soft labels [B, C] (float)."""
    if labels.dim() == 1:
        return F.cross_entropy(logits, labels.long())
    return F.cross_entropy(logits, labels.to(logits.dtype))


def label_probabilities(labels: torch.Tensor, n_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """Class probabilities [B, C] from hard labels [B] or soft labels [B, C]."""
    if labels.dim() == 1:
        return F.one_hot(labels.long(), n_classes).to(dtype)
    return labels.to(dtype)


def expand_to_rows(per_bag: torch.Tensor, segments: Segments) -> torch.Tensor:
    """Broadcast per-bag values [B, ...] to rows [T, ...]; padding rows get 0."""
    padded = torch.cat([per_bag, per_bag.new_zeros((1, *per_bag.shape[1:]))])
    return padded[segments.segment_ids()]
