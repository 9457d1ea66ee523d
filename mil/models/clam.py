"""Single-branch CLAM (CLAM-SB) of Lu et al. 2021.

"Data-efficient and weakly supervised computational pathology on whole-slide images", Nature
Biomedical Engineering 2021. Gated attention pooling as in ABMIL, plus instance-level
clustering: for the bag's class, the k tiles with the highest attention are pseudo-labelled
positive and the k lowest negative for that class's instance classifier. For subtyping tasks
(every class has its own morphology) the top-k tiles are also pseudo-labelled negative for
every other class's instance classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mil.batch import PackedBatch
from mil.kernels import segment_attention_pool, segment_reduce, segment_topk_mask
from mil.kernels.segments import Segments
from mil.models.base import MILModel, MILOutput, register_model
from mil.models.layers import GatedAttentionScores, label_probabilities, tile_embedding


def top_rows_per_bag(scores: torch.Tensor, segments: Segments, ks: Sequence[int]) -> torch.Tensor:
    """Mark the `ks[b]` highest-scoring rows of each bag b.

    Args:
        scores: [T] scores; padding rows are never selected.
        segments: bag boundaries of the T rows.
        ks: rows to select per bag, each at most the bag's length.

    Returns:
        bool [T], True on selected rows.
    """
    selected = torch.zeros(segments.total, dtype=torch.bool, device=scores.device)
    bag_of_row = segments.segment_ids().to(scores.device)
    # One kernel call per distinct k; a pack usually has one or two (small bags cap k).
    for k in sorted(set(ks)):
        if k == 0:
            continue
        in_group = torch.tensor([k_b == k for k_b in ks] + [False], device=scores.device)
        top = segment_topk_mask(scores, segments, k, mask_fraction=1.0)
        selected |= top & in_group[bag_of_row]
    return selected


@register_model("clam_sb")
class CLAMSB(MILModel):
    """CLAM-SB: gated attention pooling with an instance clustering loss.

    Args:
        in_dim: tile feature size D.
        n_classes: number of classes C.
        embed_dim: size of the tile embedding.
        attention_dim: hidden size of the gated attention.
        dropout: dropout after the tile embedding and inside the attention.
        k_sample: tiles per bag pseudo-labelled positive and negative (8 in CLAM). A bag of n
            tiles uses min(k_sample, n // 2) for its own class, so the positive and negative
            tiles never overlap, and min(k_sample, n) for the other classes.
        subtyping: also train the other classes' instance classifiers to reject the bag's
            top-k tiles (CLAM's setting for subtyping tasks).
        instance_loss_weight: weight of the instance loss relative to the bag loss. CLAM
            trains 0.7 * bag loss + 0.3 * instance loss, a ratio of 0.3 / 0.7 ≈ 0.43.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        embed_dim: int = 512,
        attention_dim: int = 256,
        dropout: float = 0.25,
        k_sample: int = 8,
        subtyping: bool = False,
        instance_loss_weight: float = 0.43,
    ) -> None:
        super().__init__(in_dim, n_classes)
        if k_sample < 1:
            raise ValueError(f"CLAM-SB needs k_sample >= 1, got {k_sample}")
        self.k_sample = k_sample
        self.subtyping = subtyping
        self.instance_loss_weight = instance_loss_weight
        self.embed = tile_embedding(in_dim, embed_dim, dropout)
        self.attention = GatedAttentionScores(embed_dim, attention_dim, dropout=dropout)
        self.classifier = nn.Linear(embed_dim, n_classes)
        # C instance classifiers with two outputs each (tile is / is not evidence of class c),
        # computed as one linear layer.
        self.instance_classifiers = nn.Linear(embed_dim, 2 * n_classes)

    def forward(self, batch: PackedBatch) -> MILOutput:
        """Classify each bag.

        Returns:
            logits [B, C]; attention [T], the softmax weight of each tile within its bag;
            aux_losses `instance` when the batch has labels.
        """
        segments = batch.segments
        tiles = self.embed(batch.features)  # [T, E]
        scores = self.attention(tiles)  # [T, 1]
        pooled, weights = segment_attention_pool(tiles, scores, segments)  # [B,1,E], [T,1]
        logits = self.classifier(pooled[:, 0])  # [B, C]

        aux_losses: dict[str, torch.Tensor] = {}
        if batch.labels is not None:
            instance_loss = self.instance_loss(
                tiles, scores[:, 0].detach(), segments, batch.labels
            )
            aux_losses["instance"] = self.instance_loss_weight * instance_loss
        return MILOutput(logits=logits, attention=weights[:, 0], aux_losses=aux_losses)

    def instance_loss(
        self, tiles: torch.Tensor, scores: torch.Tensor, segments: Segments, labels: torch.Tensor
    ) -> torch.Tensor:
        """Mean over bags of CLAM's instance clustering loss.

        For a soft label p [C] (hyperslides mix classes), class c's in-class term is weighted
        by p_c and its out-of-class term by 1 - p_c; a hard label gives CLAM's loss exactly.

        Args:
            tiles: [T, E] tile embeddings.
            scores: [T] attention logits, only used to rank tiles.
            segments: bag boundaries of the T rows.
            labels: [B] class indices or [B, C] class probabilities.
        """
        lengths = segments.lengths
        in_class_k = [min(self.k_sample, n // 2) for n in lengths]
        out_class_k = [min(self.k_sample, n) for n in lengths]
        positive = top_rows_per_bag(scores, segments, in_class_k)  # [T]
        negative = top_rows_per_bag(-scores, segments, in_class_k)
        top = top_rows_per_bag(scores, segments, out_class_k)

        log_probs = F.log_softmax(
            self.instance_classifiers(tiles).view(-1, self.n_classes, 2), dim=-1
        )  # [T, C, 2], index 1 = tile is evidence of the class
        # Per bag and class: sums of the cross-entropy over the pseudo-labelled tiles.
        in_class_sum = segment_reduce(
            -(positive[:, None] * log_probs[..., 1] + negative[:, None] * log_probs[..., 0]),
            segments,
            reduce="sum",
        )  # [B, C]
        out_class_sum = segment_reduce(-(top[:, None] * log_probs[..., 0]), segments, "sum")

        device, dtype = tiles.device, tiles.dtype
        in_class_count = 2 * torch.tensor(in_class_k, device=device, dtype=dtype).clamp(min=1)
        out_class_count = torch.tensor(out_class_k, device=device, dtype=dtype).clamp(min=1)
        in_class_loss = in_class_sum / in_class_count[:, None]  # [B, C]
        out_class_loss = out_class_sum / out_class_count[:, None]

        probabilities = label_probabilities(labels, self.n_classes, dtype)  # [B, C]
        per_bag = (probabilities * in_class_loss).sum(dim=1)
        if self.subtyping:
            per_bag = (per_bag + ((1 - probabilities) * out_class_loss).sum(dim=1)) / self.n_classes
        return per_bag.mean()
