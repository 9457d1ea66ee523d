"""Packing-safe agent attention (Han et al., "Agent Attention: On the Integration of Softmax and
Linear Attention", ECCV 2024).

A small set of agent tokens A per bag first gathers the bag (agent aggregation,
softmax(A Kᵀ) V), then every query reads from the agents (agent broadcast,
softmax(Q Aᵀ) · that). Cost is O(n · a) per bag for a agents. Agents are either the means of
runs of consecutive query rows of each bag (the pooled queries of the paper) or learned tokens
shared by all bags. Agent bias and the depthwise convolution of the paper are model layers.
"""

from __future__ import annotations

from typing import Literal

import torch

from mil.kernels.attention import attention, default_scale
from mil.kernels.groups import groups_by_count
from mil.kernels.pooling import segment_reduce
from mil.kernels.segments import Segments


def agent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: Segments,
    num_agents: int = 49,
    agents: torch.Tensor | None = None,
    scale: float | None = None,
    backend: Literal["auto", "reference", "varlen", "flex"] = "auto",
) -> torch.Tensor:
    """Agent attention within each bag of a pack.

    Args:
        q: [T, H, Dh]; k: [T, H, Dh]; v: [T, H, Dv].
        segments: bag boundaries of the pack.
        num_agents: pooled agents per bag when `agents` is None (a bag of n < num_agents rows
            gets n, each its own query).
        agents: optional learned agent tokens [A, H, Dh], used for every bag.
        scale: softmax temperature of both steps, default 1/sqrt(Dh).
        backend: backend of the two cross-attention steps (see `attention`).

    Returns:
        [T, H, Dv]; padding rows are 0.
    """
    scale = default_scale(q.shape[-1], scale)
    if agents is None:
        groups = groups_by_count(segments, num_agents)
        agent_tokens = segment_reduce(q, groups.rows, "mean")  # [G, H, Dh]
        agent_segments = groups.per_bag
    else:
        if agents.dim() != 3 or agents.shape[1:] != q.shape[1:]:
            raise ValueError(
                f"agents must be [A, H, Dh] = [A, {q.shape[1]}, {q.shape[2]}], "
                f"got {tuple(agents.shape)}"
            )
        num_bags = segments.num_segments
        agent_tokens = agents.repeat(num_bags, 1, 1)  # [B * A, H, Dh]
        agent_segments = Segments.from_lengths([agents.shape[0]] * num_bags, device=q.device)

    agent_values = attention(
        agent_tokens, k, v, agent_segments, segments, backend=backend, scale=scale
    )  # [G, H, Dv]
    return attention(
        q, agent_tokens, agent_values, segments, agent_segments, backend=backend, scale=scale
    )
