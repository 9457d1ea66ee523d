"""FlexAttention backend: document masks over packs, score modifiers, routed sparse masks.

The document mask (a query attends only to keys of its own bag, padding attends to nothing)
depends only on the pack. Its `BlockMask` is therefore built once per (query pack, key pack,
device) and cached beside the `Segments`, and every layer of a model reuses it. Routed sparse
masks depend on the inputs and are built per call.

On CUDA, `flex_attention` is wrapped in `torch.compile` on first use (a fused kernel). On the
CPU it runs eagerly: the unfused path materialises the [H, Tq, Tk] score matrix and, as of
torch 2.14, has no backward, so it is meant for checking masks against the reference.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch

from mil.kernels.cache import pack_cache
from mil.kernels.groups import BagGroups
from mil.kernels.segments import Segments

logger = logging.getLogger(__name__)

ScoreMod = Callable[..., torch.Tensor]


def _flex_module() -> Any:
    try:
        from torch.nn.attention import flex_attention as flex
    except ImportError as err:  # torch < 2.5
        raise RuntimeError(
            f"FlexAttention is not available in torch {torch.__version__}; install torch >= 2.5 "
            "or use backend='reference'"
        ) from err
    return flex


@functools.cache
def _compiled_flex_attention() -> Callable[..., torch.Tensor]:
    flex = _flex_module()
    logger.info("compiling flex_attention for CUDA (first call only)")
    return torch.compile(flex.flex_attention, dynamic=False)


def _run_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: Any,
    score_mod: ScoreMod | None,
    scale: float | None,
) -> torch.Tensor:
    """Call flex_attention on [T, H, D] tensors as one batch of length T; returns [Tq, H, Dv]."""
    flex = _flex_module()
    if q.shape[0] == 0 or k.shape[0] == 0:
        return q.new_zeros((q.shape[0], q.shape[1], v.shape[2]))
    if (
        q.device.type == "cpu"
        and torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad or v.requires_grad)
    ):
        raise RuntimeError(
            "the flex backend has no backward on the CPU in torch "
            f"{torch.__version__}; use backend='reference' for training on the CPU"
        )
    function = _compiled_flex_attention() if q.device.type == "cuda" else flex.flex_attention
    with warnings.catch_warnings():
        # The eager CPU path warns on every process start that it is unfused; that is expected.
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        out = function(
            q.transpose(0, 1).unsqueeze(0),  # [1, H, Tq, Dh]
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            score_mod=score_mod,
            block_mask=block_mask,
            scale=scale,
        )
    return out[0].transpose(0, 1)  # [Tq, H, Dv]


def _zero_padding(tensor: torch.Tensor, num_valid: int) -> torch.Tensor:
    """Zero rows past `num_valid`: masked keys still enter P @ V, where 0 * NaN would be NaN."""
    if num_valid == tensor.shape[0]:
        return tensor
    return torch.cat(
        [tensor[:num_valid], tensor.new_zeros((tensor.shape[0] - num_valid, *tensor.shape[1:]))]
    )


def _document_ids(segments: Segments, device: torch.device, padding: int) -> torch.Tensor:
    ids = segments.segment_ids().to(device)
    return torch.where(ids < segments.num_segments, ids, padding)


def document_block_mask(q_segments: Segments, kv_segments: Segments, device: torch.device) -> Any:
    """Return the cached `BlockMask` letting each query see only the keys of its own bag.

    Query padding rows get bag id B and key padding rows -1, so padding matches nothing and
    its output is 0.
    """
    cache = pack_cache(q_segments)
    key = ("flex_document_mask", kv_segments.lengths, kv_segments.total, device)
    block_mask = cache.get(key)
    if block_mask is not None:
        return block_mask

    flex = _flex_module()
    q_ids = _document_ids(q_segments, device, q_segments.num_segments)
    kv_ids = _document_ids(kv_segments, device, -1)

    def same_bag(batch: Any, head: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return q_ids[q_idx] == kv_ids[kv_idx]

    block_mask = flex.create_block_mask(
        same_bag, None, None, q_segments.total, kv_segments.total, device=device
    )
    cache[key] = block_mask
    return block_mask


def flex_document_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_segments: Segments,
    kv_segments: Segments,
    scale: float | None = None,
    score_mod: ScoreMod | None = None,
) -> torch.Tensor:
    """Softmax attention within each bag through FlexAttention.

    Args:
        q: [Tq, H, Dh]; k: [Tk, H, Dh]; v: [Tk, H, Dv].
        q_segments, kv_segments: bag boundaries of queries and keys.
        scale: softmax temperature, default 1/sqrt(Dh).
        score_mod: FlexAttention score modifier `(score, b, h, q_idx, kv_idx) -> score`;
            `b` is always 0 and the indices are rows of the pack.

    Returns:
        [Tq, H, Dv]; padding rows and queries of a bag without keys are 0.
    """
    if q_segments.num_valid == 0 or kv_segments.num_valid == 0:
        return q.new_zeros((q.shape[0], q.shape[1], v.shape[2]))
    block_mask = document_block_mask(q_segments, kv_segments, q.device)
    k = _zero_padding(k, kv_segments.num_valid)
    v = _zero_padding(v, kv_segments.num_valid)
    return _run_flex(q, k, v, block_mask, score_mod, scale)


def flex_routed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_groups: BagGroups,
    kv_groups: BagGroups,
    routes: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Routed sparse attention through FlexAttention; the routes become a block mask.

    Args:
        q: [Tq, H, Dh]; k: [Tk, H, Dh]; v: [Tk, H, Dv].
        q_groups, kv_groups: regions of the query and key packs.
        routes: int64 [Rq, W] key regions per query region, -1 = unused slot.
        scale: softmax temperature, default 1/sqrt(Dh).

    Returns:
        [Tq, H, Dv]; padding rows are 0.
    """
    flex = _flex_module()
    if q_groups.num_groups == 0 or kv_groups.num_groups == 0 or routes.shape[1] == 0:
        return q.new_zeros((q.shape[0], q.shape[1], v.shape[2]))
    device = q.device
    num_q_regions, num_kv_regions = q_groups.num_groups, kv_groups.num_groups
    # Region table with one extra row and column for padding, which routes nowhere.
    table = torch.zeros((num_q_regions + 1, num_kv_regions + 2), dtype=torch.bool, device=device)
    rows = torch.arange(num_q_regions, device=device).unsqueeze(1).expand_as(routes)
    # Unused slots (-1) land in the last column, which no key region maps to.
    table[rows, torch.where(routes >= 0, routes, num_kv_regions + 1)] = True
    table = table[:, : num_kv_regions + 1]
    q_region = q_groups.rows.segment_ids().to(device)  # padding -> Rq
    kv_region = kv_groups.rows.segment_ids().to(device)  # padding -> Rk

    def routed(batch: Any, head: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return table[q_region[q_idx], kv_region[kv_idx]]

    block_mask = flex.create_block_mask(routed, None, None, q.shape[0], k.shape[0], device=device)
    k = _zero_padding(k, kv_groups.rows.num_valid)
    v = _zero_padding(v, kv_groups.rows.num_valid)
    return _run_flex(q, k, v, block_mask, None, scale)
