"""Attention math over packed bags, shared by every MIL model.

A pack holds several bags back to back, then padding; `Segments` gives the bag boundaries.
Tokens of different bags never interact and padding rows always produce exactly 0.
"""

from mil.kernels.agent import agent_attention
from mil.kernels.attention import attention
from mil.kernels.groups import BagGroups, groups_by_count, groups_by_size
from mil.kernels.nystrom import iterative_pinv, nystrom_attention
from mil.kernels.pooling import (
    segment_attention_pool,
    segment_reduce,
    segment_softmax,
    segment_topk_mask,
    weighted_segment_sum,
)
from mil.kernels.segments import Segments

__all__ = [
    "BagGroups",
    "Segments",
    "agent_attention",
    "attention",
    "groups_by_count",
    "groups_by_size",
    "iterative_pinv",
    "nystrom_attention",
    "segment_attention_pool",
    "segment_reduce",
    "segment_softmax",
    "segment_topk_mask",
    "weighted_segment_sum",
]
