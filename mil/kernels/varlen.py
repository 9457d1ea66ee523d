"""CUDA backend on `torch.nn.attention.varlen.varlen_attn` (FlashAttention for packed sequences).

`varlen_attn` takes the pack as is: [T, H, D] tensors plus cumulative bag offsets, no padding to
the longest bag and no mask. Its signature changed between releases: torch 2.9 has a positional
`is_causal` and no `scale`, torch 2.10 made `return_aux` keyword-only and added `scale` and
`window_size`, later releases add more keywords. The wrapper reads the installed signature once.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

from mil.kernels.segments import Segments

_HALF_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _varlen_function() -> tuple[Callable[..., Any], frozenset[str]] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


# FlashAttention kernels behind varlen_attn support head dimensions up to 256.
MAX_HEAD_DIM = 256


def varlen_unavailable_reason(q: torch.Tensor, v: torch.Tensor | None = None) -> str | None:
    """Return why the varlen backend cannot run on queries `q` and values `v`, or None."""
    if _varlen_function() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (needs torch >= 2.9)"
    if q.device.type != "cuda":
        return f"varlen_attn needs a CUDA tensor, got device {q.device}"
    if q.dtype not in _HALF_DTYPES:
        return f"varlen_attn needs float16 or bfloat16, got {q.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"varlen_attn supports head dimensions up to {MAX_HEAD_DIM}, got {q.shape[-1]}"
    if v is not None and v.shape[-1] != q.shape[-1]:
        return f"varlen_attn needs values with the head dimension of q, got {v.shape[-1]}"
    return None


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_segments: Segments,
    kv_segments: Segments,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention within each bag with one `varlen_attn` call for the whole pack.

    Args:
        q: [Tq, H, Dh]; k: [Tk, H, Dh]; v: [Tk, H, Dh] (FlashAttention needs Dv == Dh), CUDA,
            float16 or bfloat16.
        q_segments, kv_segments: bag boundaries of queries and keys.
        scale: softmax temperature, default 1/sqrt(Dh).

    Returns:
        [Tq, H, Dh]; padding rows and queries of a bag without keys are 0.
    """
    reason = varlen_unavailable_reason(q, v)
    resolved = _varlen_function()
    if reason is not None or resolved is None:
        raise RuntimeError(f"backend='varlen' cannot run: {reason}; use backend='reference'")
    varlen_attn, parameters = resolved

    num_q, num_kv = q_segments.num_valid, kv_segments.num_valid
    out = q.new_zeros((q.shape[0], q.shape[1], v.shape[2]))
    if num_q == 0 or num_kv == 0:
        return out

    keywords: dict[str, Any] = {}
    if "scale" in parameters:
        keywords["scale"] = scale
    elif scale is not None:
        # Releases without `scale` use 1/sqrt(Dh); rescaling q gives the requested temperature.
        q = q * (scale * math.sqrt(q.shape[-1]))
    if "is_causal" in parameters:
        keywords["is_causal"] = False

    cu_seq_q = q_segments.offsets.to(device=q.device, dtype=torch.int32)
    cu_seq_k = kv_segments.offsets.to(device=q.device, dtype=torch.int32)
    attended = varlen_attn(
        q[:num_q].contiguous(),
        k[:num_kv].contiguous(),
        v[:num_kv].contiguous(),
        cu_seq_q,
        cu_seq_k,
        q_segments.max_len,
        kv_segments.max_len,
        **keywords,
    )
    # Queries of a bag without keys have no defined FlashAttention output; they are set to 0.
    empty_kv = [
        n_q > 0 and n_kv == 0
        for n_q, n_kv in zip(q_segments.lengths, kv_segments.lengths, strict=True)
    ]
    if any(empty_kv):
        keep = torch.tensor([not e for e in empty_kv] + [False], device=q.device)
        ids = q_segments.segment_ids().to(q.device)[:num_q]
        attended = attended * keep[ids].view(-1, 1, 1).to(attended.dtype)
    return torch.cat([attended, out[num_q:]], dim=0)
