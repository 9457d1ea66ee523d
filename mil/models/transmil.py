"""TransMIL of Shao et al. 2021, on packed bags.

"TransMIL: Transformer based Correlated Multiple Instance Learning for Whole Slide Image
Classification", NeurIPS 2021. Each bag's tiles are embedded, repeated cyclically up to the next
square number s² and prefixed with a class token. Two Nyström self-attention layers (with a
residual depthwise convolution over the values) are separated by the PPEG positional encoding:
depthwise 7×7, 5×5 and 3×3 convolutions over the tiles laid out on an s × s grid. The class
token after a final LayerNorm is classified.

Packing safety: the square padding, class token, Nyström landmarks and pseudo-inverse, the
residual convolution and the PPEG grid are all built per bag, so a bag's output does not depend
on the other bags of the pack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mil.batch import PackedBatch
from mil.kernels import nystrom_attention, segment_softmax
from mil.kernels.segments import Segments
from mil.models.base import MILModel, MILOutput, register_model


@dataclass(frozen=True)
class BagSequences:
    """Layout of the per-bag token sequences [class token, s² tile tokens] built from a pack.

    Attributes:
        segments: bag boundaries of the sequences, one bag of 1 + s_b² rows per input bag.
        source_rows: int64 [S], the pack row each sequence row copies; the class token rows
            point one past the pack's last row, where the class token is appended.
        tile_rows: int64 [S - B], the sequence rows that hold tile tokens.
        tile_segments: bag boundaries of `tile_rows` (s_b² rows per bag).
        class_rows: int64 [B], the sequence row of each bag's class token.
        sides: grid side s_b of each bag.
    """

    segments: Segments
    source_rows: torch.Tensor
    tile_rows: torch.Tensor
    tile_segments: Segments
    class_rows: torch.Tensor
    sides: tuple[int, ...]

    @classmethod
    def from_segments(cls, segments: Segments, device: torch.device) -> BagSequences:
        """Lay out the sequences of the bags of `segments` (built on the CPU, then moved)."""
        class_source = segments.total
        source_parts, tile_parts, class_rows, sides = [], [], [], []
        row = 0
        for start, n in zip(segments.starts, segments.lengths, strict=True):
            side = math.ceil(math.sqrt(n))
            # Tiles are repeated cyclically from the first one to fill the square grid.
            tiles = start + torch.arange(side * side) % max(n, 1)
            source_parts += [torch.tensor([class_source]), tiles]
            tile_parts.append(torch.arange(row + 1, row + 1 + side * side))
            class_rows.append(row)
            sides.append(side)
            row += 1 + side * side
        source = torch.cat(source_parts) if source_parts else torch.zeros(0, dtype=torch.int64)
        tile_rows = torch.cat(tile_parts) if tile_parts else torch.zeros(0, dtype=torch.int64)
        return cls(
            segments=Segments.from_lengths([1 + s * s for s in sides], device=device),
            source_rows=source.to(device),
            tile_rows=tile_rows.to(device),
            tile_segments=Segments.from_lengths([s * s for s in sides], device=device),
            class_rows=torch.tensor(class_rows, dtype=torch.int64, device=device),
            sides=tuple(sides),
        )


class PackedResidualConv(nn.Module):
    """Depthwise convolution over the sequence axis of V, per head, that never crosses bags.

    Nyströmformer adds conv(V) with a kernel of 33 rows to the attention output. On a pack the
    bags are copied into one sequence with kernel_size // 2 zero rows between them, so each
    bag sees zeros beyond its ends exactly as when it is convolved alone.
    """

    def __init__(self, n_heads: int, kernel_size: int) -> None:
        super().__init__()
        self.gap = kernel_size // 2
        self.conv = nn.Conv2d(
            n_heads, n_heads, (kernel_size, 1), padding=(self.gap, 0), groups=n_heads, bias=False
        )

    def forward(self, values: torch.Tensor, segments: Segments) -> torch.Tensor:
        """Return conv(values) [S, H, Dh] for values [S, H, Dh]; padding rows are 0."""
        ids = segments.segment_ids().to(values.device)
        valid = ids < segments.num_segments
        rows = torch.nonzero(valid).flatten()
        gapped_rows = rows + self.gap * (ids[rows] + 1)
        n_gapped = segments.num_valid + self.gap * (segments.num_segments + 1)
        gapped = values.new_zeros((n_gapped, *values.shape[1:])).index_copy(
            0, gapped_rows, values[rows]
        )
        convolved = self.conv(gapped.permute(1, 0, 2).unsqueeze(0))[0].permute(1, 0, 2)
        return values.new_zeros(values.shape).index_copy(0, rows, convolved[gapped_rows])


class NystromLayer(nn.Module):
    """Pre-norm Nyström self-attention layer of TransMIL: x + attention(LN(x)).

    Args:
        dim: token size.
        n_heads: attention heads; must divide `dim`.
        n_landmarks: Nyström landmarks per bag (bags with fewer tokens use every token).
        pinv_iterations: iterations of the pseudo-inverse.
        residual_conv_kernel: rows of the depthwise convolution over V added to the output;
            0 disables it.
        dropout: dropout on the output projection.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_landmarks: int,
        pinv_iterations: int,
        residual_conv_kernel: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.n_landmarks = n_landmarks
        self.pinv_iterations = pinv_iterations
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.residual_conv = (
            PackedResidualConv(n_heads, residual_conv_kernel) if residual_conv_kernel else None
        )
        self.projection = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def queries_and_keys(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys [S, H, Dh] that this layer computes for tokens [S, dim]."""
        q, k, _ = self.split_heads(self.qkv(self.norm(tokens)))
        return q, k

    def split_heads(
        self, qkv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = qkv.view(qkv.shape[0], 3, self.n_heads, self.head_dim).unbind(1)
        return q, k, v

    def forward(self, tokens: torch.Tensor, segments: Segments) -> torch.Tensor:
        q, k, v = self.split_heads(self.qkv(self.norm(tokens)))  # [S, H, Dh] each
        mixed = nystrom_attention(
            q, k, v, segments,
            num_landmarks=self.n_landmarks, pinv_iterations=self.pinv_iterations,
        )
        if self.residual_conv is not None:
            mixed = mixed + self.residual_conv(v, segments)
        return tokens + self.projection(mixed.reshape(tokens.shape))


class PPEG(nn.Module):
    """Pyramid position encoding generator: depthwise 7×7, 5×5, 3×3 convolutions on each bag's grid.

    Bags are grouped by grid side and each group is convolved as one [n, dim, s, s] batch, with
    the convolutions' zero padding at every bag's own grid border. x + conv7(x) + conv5(x) +
    conv3(x) is computed as one 7×7 convolution whose kernel is the sum of the three kernels
    (zero-padded to 7×7) and the identity.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv7 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.conv5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def merged_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Depthwise 7×7 weight [dim, 1, 7, 7] and bias [dim] of identity + the three convs."""
        weight = torch.zeros_like(self.conv7.weight)
        weight[:, :, 3, 3] = 1.0
        weight = weight + self.conv7.weight
        weight = weight + F.pad(self.conv5.weight, (1, 1, 1, 1))
        weight = weight + F.pad(self.conv3.weight, (2, 2, 2, 2))
        biases = [conv.bias for conv in (self.conv7, self.conv5, self.conv3)]
        bias = torch.stack([b for b in biases if b is not None]).sum(dim=0)
        return weight, bias

    def forward(self, tokens: torch.Tensor, layout: BagSequences) -> torch.Tensor:
        """Return tokens [S, dim] with the encoding added on the tile rows of each bag."""
        dim = tokens.shape[1]
        by_side: dict[int, list[int]] = {}
        for bag, side in enumerate(layout.sides):
            if side > 0:
                by_side.setdefault(side, []).append(bag)
        tile_rows = layout.segments.starts
        weight, bias = self.merged_kernel()
        for side, bags in by_side.items():
            rows = torch.cat(
                [torch.arange(tile_rows[b] + 1, tile_rows[b] + 1 + side * side) for b in bags]
            ).to(tokens.device)
            grid = tokens[rows].view(len(bags), side, side, dim).permute(0, 3, 1, 2)
            encoded = F.conv2d(
                grid, weight.to(grid.dtype), bias.to(grid.dtype), padding=3, groups=dim
            )
            tokens = tokens.index_copy(0, rows, encoded.permute(0, 2, 3, 1).reshape(-1, dim))
        return tokens


@register_model("transmil")
class TransMIL(MILModel):
    """TransMIL with packing-safe Nyström attention and per-bag PPEG.

    Args:
        in_dim: tile feature size D.
        n_classes: number of classes C.
        embed_dim: token size (512 in TransMIL).
        n_heads: attention heads (8 in TransMIL); must divide `embed_dim`.
        n_landmarks: Nyström landmarks per bag (embed_dim / 2 = 256 in TransMIL).
        pinv_iterations: iterations of the Nyström pseudo-inverse (6 in TransMIL).
        residual_conv_kernel: rows of the depthwise convolution over V (33 in TransMIL);
            0 disables it.
        dropout: dropout on the attention output projections.
    """

    attention_axis = "head"

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        embed_dim: int = 512,
        n_heads: int = 8,
        n_landmarks: int = 256,
        pinv_iterations: int = 6,
        residual_conv_kernel: int = 33,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(in_dim, n_classes)
        if embed_dim % n_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by n_heads {n_heads}")
        layer_options = (n_heads, n_landmarks, pinv_iterations, residual_conv_kernel, dropout)
        self.embed = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU())
        self.class_token = nn.Parameter(torch.randn(1, embed_dim))
        self.layer1 = NystromLayer(embed_dim, *layer_options)
        self.position_encoding = PPEG(embed_dim)
        self.layer2 = NystromLayer(embed_dim, *layer_options)
        self.norm = nn.LayerNorm(embed_dim)
        self.classifier = nn.Linear(embed_dim, n_classes)

    def forward(self, batch: PackedBatch) -> MILOutput:
        """Classify each bag.

        Returns:
            logits [B, C]; attention [T, H], per head, the softmax attention of the class token
            to the bag's tiles in the second layer, computed exactly for the heatmap (the layer
            itself uses the Nyström approximation). A tile repeated to fill the square grid
            gets the sum of its copies' attention, so each bag and head sums to 1.
        """
        segments = batch.segments
        layout = BagSequences.from_segments(segments, batch.features.device)
        tiles = self.embed(batch.features)  # [T, E]
        tokens = torch.cat([tiles, self.class_token.to(tiles.dtype)])[layout.source_rows]  # [S, E]

        tokens = self.layer1(tokens, layout.segments)
        tokens = self.position_encoding(tokens, layout)
        attention = self.class_token_attention(tokens, layout, segments)  # [T, H]
        tokens = self.layer2(tokens, layout.segments)
        logits = self.classifier(self.norm(tokens)[layout.class_rows])  # [B, C]
        return MILOutput(logits=logits, attention=attention)

    def class_token_attention(
        self, tokens: torch.Tensor, layout: BagSequences, segments: Segments
    ) -> torch.Tensor:
        """Softmax attention [T, H] of each bag's class token over its tiles in `layer2`."""
        q, k = self.layer2.queries_and_keys(tokens)  # [S, H, Dh]
        bag_of_tile_row = layout.tile_segments.segment_ids().to(tokens.device)
        class_queries = q[layout.class_rows][bag_of_tile_row]  # [S - B, H, Dh]
        scores = (class_queries * k[layout.tile_rows]).sum(-1) / math.sqrt(self.layer2.head_dim)
        weights = segment_softmax(scores, layout.tile_segments)  # [S - B, H]
        sources = layout.source_rows[layout.tile_rows]  # pack row of each tile token
        return weights.new_zeros((segments.total, weights.shape[1])).index_add(0, sources, weights)
