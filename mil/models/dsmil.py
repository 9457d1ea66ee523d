"""Dual-stream MIL (DSMIL) of Li, Li and Eliceiri 2021.

"Dual-stream Multiple Instance Learning Network for Whole Slide Image Classification with
Self-supervised Contrastive Learning", CVPR 2021. The instance stream scores every tile per
class and takes the bag's highest-scoring tile per class as its critical instance. The bag
stream attends from every tile to the critical instance of each class (attention is the softmax
over the bag of q_t · q_critical / sqrt(d)) and classifies the C attention-pooled vectors with a
1D convolution spanning the whole vector.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mil.batch import PackedBatch
from mil.kernels import segment_attention_pool, segment_reduce, weighted_segment_sum
from mil.models.base import MILModel, MILOutput, register_model
from mil.models.layers import bag_cross_entropy, expand_to_rows, tile_embedding


@register_model("dsmil")
class DSMIL(MILModel):
    """DSMIL with a learned tile embedding in front of both streams.

    Args:
        in_dim: tile feature size D.
        n_classes: number of classes C.
        embed_dim: size of the tile embedding h that both streams read.
        query_dim: size of the queries q used for the attention to the critical instance.
        dropout: dropout after the tile embedding.
        value_dropout: dropout before the value projection of the bag stream.
        instance_loss_weight: weight of the cross-entropy of the instance stream (each bag's
            highest instance score per class); DSMIL trains both streams with equal weight.
    """

    attention_axis = "class"

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        embed_dim: int = 256,
        query_dim: int = 128,
        dropout: float = 0.25,
        value_dropout: float = 0.0,
        instance_loss_weight: float = 1.0,
    ) -> None:
        super().__init__(in_dim, n_classes)
        self.query_dim = query_dim
        self.instance_loss_weight = instance_loss_weight
        self.embed = tile_embedding(in_dim, embed_dim, dropout)
        self.instance_classifier = nn.Linear(embed_dim, n_classes)
        self.query = nn.Sequential(
            nn.Linear(embed_dim, query_dim), nn.ReLU(), nn.Linear(query_dim, query_dim), nn.Tanh()
        )
        self.value = nn.Sequential(
            nn.Dropout(value_dropout), nn.Linear(embed_dim, embed_dim), nn.ReLU()
        )
        # One output channel per class, each reading all C pooled vectors in full.
        self.bag_classifier = nn.Conv1d(n_classes, n_classes, kernel_size=embed_dim)

    def forward(self, batch: PackedBatch) -> MILOutput:
        """Classify each bag with the bag stream.

        Returns:
            logits [B, C] of the bag stream; attention [T, C], the weight of each tile in the
            pooled vector of each class; aux_losses `instance_ce` when the batch has labels.
        """
        segments = batch.segments
        tiles = self.embed(batch.features)  # [T, E]
        instance_scores = self.instance_classifier(tiles)  # [T, C]
        max_scores = segment_reduce(instance_scores, segments, reduce="max")  # [B, C]

        # The critical instance of class c is the tile with the highest score for c; tiles
        # that tie for the maximum share the role equally, so packing order cannot matter.
        valid = segments.valid_mask()[:, None]
        is_critical = (instance_scores == expand_to_rows(max_scores, segments)) & valid
        is_critical = is_critical.detach().to(tiles.dtype)  # [T, C]
        queries = self.query(tiles)  # [T, Q]
        critical_sums = weighted_segment_sum(queries, is_critical, segments)  # [B, C, Q]
        critical_counts = segment_reduce(is_critical, segments, reduce="sum").clamp(min=1)
        critical_queries = critical_sums / critical_counts[:, :, None]

        # One [T, Q] product per class keeps memory at T * Q instead of T * C * Q.
        scores = torch.stack(
            [
                (queries * expand_to_rows(critical_queries[:, c], segments)).sum(dim=1)
                for c in range(self.n_classes)
            ],
            dim=1,
        ) / math.sqrt(self.query_dim)  # [T, C]
        values = self.value(tiles)  # [T, E]
        pooled, weights = segment_attention_pool(values, scores, segments)  # [B,C,E], [T,C]
        logits = self.bag_classifier(pooled).squeeze(-1)  # [B, C]

        aux_losses: dict[str, torch.Tensor] = {}
        if batch.labels is not None:
            instance_ce = bag_cross_entropy(max_scores, batch.labels)
            aux_losses["instance_ce"] = self.instance_loss_weight * instance_ce
        return MILOutput(logits=logits, attention=weights, aux_losses=aux_losses)
