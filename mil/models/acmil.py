"""Attention-Challenging MIL (ACMIL) of Zhang et al. 2023.

"Attention-Challenging Multiple Instance Learning for Whole Slide Image Classification"
(Zhang, Meng, Liu, Wang, Zhao, Zhou; arXiv:2311.07125, ECCV 2024). ACMIL counters attention
that collapses onto a few tiles in two ways:

- Multiple branch attention: M branches share the gated attention projections (V, U) and differ
  in the last layer. Each branch pools the bag and has its own classifier trained on the bag
  label, and a diversity loss (mean pairwise cosine similarity of the branch attention maps)
  pushes the branches to look at different tiles.
- Stochastic top-K instance masking: in training, a random fraction of each branch's top-K
  tiles (by attention logit, within each bag) is masked before the softmax, so the model
  cannot rely only on its most salient tiles.

The reported prediction comes from a slide classifier on the bag vector pooled with the
branch-averaged attention.
"""

from __future__ import annotations

import torch
from torch import nn

from mil.batch import PackedBatch
from mil.kernels import segment_attention_pool, segment_reduce, segment_topk_mask
from mil.kernels.segments import Segments
from mil.models.base import MILModel, MILOutput, register_model
from mil.models.layers import GatedAttentionScores, bag_cross_entropy, tile_embedding


def branch_diversity_loss(attention: torch.Tensor, segments: Segments) -> torch.Tensor:
    """Mean pairwise cosine similarity of branch attention maps, per bag.

    Args:
        attention: [T, M] attention weights of M >= 2 branches; padding rows are ignored.
        segments: bag boundaries of the T rows.

    Returns:
        [B] similarity averaged over the M (M - 1) / 2 branch pairs of each bag: 0 when the
        branches attend to disjoint tiles, 1 when all branches give the same map.
    """
    n_branches = attention.shape[1]
    if n_branches < 2:
        raise ValueError(f"branch diversity needs at least 2 branches, got {n_branches}")
    outer = attention[:, :, None] * attention[:, None, :]  # [T, M, M]
    gram = segment_reduce(outer.reshape(attention.shape[0], -1), segments, reduce="sum")
    gram = gram.reshape(-1, n_branches, n_branches)  # [B, M, M]
    norms = torch.diagonal(gram, dim1=1, dim2=2).clamp(min=1e-12).sqrt()  # [B, M]
    cosine = gram / (norms[:, :, None] * norms[:, None, :])
    pairs = torch.triu_indices(n_branches, n_branches, offset=1, device=attention.device)
    return cosine[:, pairs[0], pairs[1]].mean(dim=1)


@register_model("acmil")
class ACMIL(MILModel):
    """ACMIL with gated multiple branch attention.

    Args:
        in_dim: tile feature size D.
        n_classes: number of classes C.
        embed_dim: size of the tile embedding.
        attention_dim: hidden size of the shared gated attention projections.
        n_branches: attention branches M (5 in the paper).
        top_k: tiles per bag and branch eligible for masking in training (10 in the paper);
            limited to the bag's length.
        mask_fraction: fraction of those top-K tiles masked in training (0.6 in the paper).
        dropout: dropout after the tile embedding.
        branch_loss_weight: weight of the mean cross-entropy of the branch classifiers.
        diversity_weight: weight of the branch diversity loss.
    """

    attention_axis = "branch"

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        embed_dim: int = 256,
        attention_dim: int = 128,
        n_branches: int = 5,
        top_k: int = 10,
        mask_fraction: float = 0.6,
        dropout: float = 0.0,
        branch_loss_weight: float = 1.0,
        diversity_weight: float = 1.0,
    ) -> None:
        super().__init__(in_dim, n_classes)
        if n_branches < 1:
            raise ValueError(f"ACMIL needs n_branches >= 1, got {n_branches}")
        if top_k < 0:
            raise ValueError(f"ACMIL needs top_k >= 0, got {top_k}")
        if not 0.0 <= mask_fraction < 1.0:
            raise ValueError(f"ACMIL needs 0 <= mask_fraction < 1, got {mask_fraction}")
        self.n_branches = n_branches
        self.top_k = top_k
        self.mask_fraction = mask_fraction
        self.branch_loss_weight = branch_loss_weight
        self.diversity_weight = diversity_weight
        self.embed = tile_embedding(in_dim, embed_dim, dropout)
        self.attention = GatedAttentionScores(embed_dim, attention_dim, n_outputs=n_branches)
        self.branch_classifiers = nn.ModuleList(
            nn.Linear(embed_dim, n_classes) for _ in range(n_branches)
        )
        self.slide_classifier = nn.Linear(embed_dim, n_classes)

    def forward(self, batch: PackedBatch) -> MILOutput:
        """Classify each bag.

        Returns:
            logits [B, C] of the slide classifier; attention [T, M], the softmax weights of
            each branch within each bag (after masking in training), whose row mean is the
            attention behind the slide prediction; aux_losses `branch_ce` and `diversity`
            when the batch has labels.
        """
        segments = batch.segments
        tiles = self.embed(batch.features)  # [T, E]
        scores = self.attention(tiles)  # [T, M]
        if self.training and self.top_k > 0 and self.mask_fraction > 0:
            masked = segment_topk_mask(scores.detach(), segments, self.top_k, self.mask_fraction)
            scores = scores.masked_fill(masked, float("-inf"))
        pooled, weights = segment_attention_pool(tiles, scores, segments)  # [B,M,E], [T,M]

        # The softmax weights are linear in the pooled vector, so averaging the branch-pooled
        # vectors equals pooling with the branch-averaged attention.
        logits = self.slide_classifier(pooled.mean(dim=1))  # [B, C]
        aux_losses: dict[str, torch.Tensor] = {}
        if batch.labels is not None:
            branch_logits = torch.stack(
                [head(pooled[:, m]) for m, head in enumerate(self.branch_classifiers)], dim=1
            )  # [B, M, C]
            branch_ce = torch.stack(
                [bag_cross_entropy(branch_logits[:, m], batch.labels)
                 for m in range(self.n_branches)]
            ).mean()
            aux_losses["branch_ce"] = self.branch_loss_weight * branch_ce
            if self.n_branches > 1:
                diversity = branch_diversity_loss(weights, segments).mean()
                aux_losses["diversity"] = self.diversity_weight * diversity
        return MILOutput(logits=logits, attention=weights, aux_losses=aux_losses)
