"""Multi-head attention over packed bags: softmax, linear and sparse kinds, several backends.

Queries attend only to keys of their own bag. Self-attention uses one `Segments` for both sides.
Cross attention (agent tokens, Nyström landmarks, class tokens) passes separate query and key
segments, which must have the same number of bags. Query rows outside every bag (padding)
output exactly 0, and so do queries whose bag has no keys.

Backends:
    reference: a Python loop of `scaled_dot_product_attention` per bag (softmax), per-bag
        φ(K)ᵀV (linear) or the packed region gather of `mil.kernels.sparse` (sparse). Runs
        everywhere, supports autograd, and is what the other backends are tested against.
    varlen: `torch.nn.attention.varlen.varlen_attn` (FlashAttention on CUDA, fp16/bf16, softmax).
    flex: FlexAttention with a document mask built once per pack; supports `score_mod` and the
        sparse kind. Compiled on CUDA; on the CPU it runs eagerly, forward only.
    auto: varlen for fp16/bf16 softmax on CUDA, flex for `score_mod` or sparse on CUDA and for
        `score_mod` on the CPU, otherwise the reference.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F

from mil.kernels.segments import Segments

logger = logging.getLogger(__name__)

AttentionKind = Literal["softmax", "linear", "sparse"]
Backend = Literal["auto", "reference", "varlen", "flex"]
FeatureMap = Callable[[torch.Tensor], torch.Tensor]

_OPTIONS: dict[str, set[str]] = {
    "softmax": {"scale", "score_mod"},
    "linear": {"feature_map", "eps"},
    "sparse": {"scale", "mode", "region_size", "topk"},
}


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_segments: Segments,
    kv_segments: Segments | None = None,
    kind: AttentionKind = "softmax",
    backend: Backend = "auto",
    **options: Any,
) -> torch.Tensor:
    """Attend from each bag's queries to the keys of the same bag.

    Args:
        q: [Tq, H, Dh] queries of a pack.
        k: [Tk, H, Dh] keys.
        v: [Tk, H, Dv] values.
        q_segments: bag boundaries of the query rows.
        kv_segments: bag boundaries of the key rows; None for self-attention (same as queries).
        kind: "softmax" (full attention within each bag), "linear" (non-causal
            φ(q)·Σφ(k)vᵀ / φ(q)·Σφ(k) per bag) or "sparse" (attention restricted to regions of
            each bag, see `mil.kernels.sparse.sparse_attention`).
        backend: "auto", "reference", "varlen" or "flex" (see the module docstring).
        **options: per kind. softmax: `scale` (default 1/sqrt(Dh)), `score_mod` (flex only, the
            FlexAttention signature `(score, b, h, q_idx, kv_idx)` on pack row indices).
            linear: `feature_map` ("elu" = elu + 1, the default; "relu"; or a callable on
            [n, H, Dh]), `eps` (1e-6). sparse: `mode` ("routed" or "block"), `region_size`
            (64), `topk` (4), `scale`.

    Returns:
        [Tq, H, Dv]; padding rows are 0.
    """
    kv_segments = q_segments if kv_segments is None else kv_segments
    _check_inputs(q, k, v, q_segments, kv_segments)
    if kind not in _OPTIONS:
        raise ValueError(f"attention kind must be 'softmax', 'linear' or 'sparse', got {kind!r}")
    unknown = set(options) - _OPTIONS[kind]
    if unknown:
        raise ValueError(
            f"unknown option(s) {sorted(unknown)} for {kind} attention; "
            f"valid options are {sorted(_OPTIONS[kind])}"
        )

    chosen = _choose_backend(q, v, kind, backend, options)
    if kind == "linear":
        return linear_attention_reference(q, k, v, q_segments, kv_segments, **options)
    if kind == "sparse":
        from mil.kernels.sparse import sparse_attention

        sparse_backend: Literal["reference", "flex"] = "flex" if chosen == "flex" else "reference"
        return sparse_attention(q, k, v, q_segments, kv_segments, backend=sparse_backend, **options)
    if chosen == "varlen":
        from mil.kernels.varlen import varlen_attention

        return varlen_attention(q, k, v, q_segments, kv_segments, scale=options.get("scale"))
    if chosen == "flex":
        from mil.kernels.flex import flex_document_attention

        return flex_document_attention(q, k, v, q_segments, kv_segments, **options)
    return softmax_attention_reference(q, k, v, q_segments, kv_segments, **options)


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_segments: Segments,
    kv_segments: Segments,
) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"q, k and v must be [T, H, Dh]; got shapes {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if k.shape[:2] != v.shape[:2] or q.shape[1:] != k.shape[1:]:
        raise ValueError(
            f"k and v must share [Tk, H] and q and k must share [H, Dh]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[0] != q_segments.total or k.shape[0] != kv_segments.total:
        raise ValueError(
            f"q has {q.shape[0]} rows and k {k.shape[0]}, but their segments cover "
            f"{q_segments.total} and {kv_segments.total} rows; pass the segments of these packs"
        )
    if q_segments.num_segments != kv_segments.num_segments:
        raise ValueError(
            f"query and key segments must have the same number of bags, got "
            f"{q_segments.num_segments} and {kv_segments.num_segments}"
        )


def _choose_backend(
    q: torch.Tensor, v: torch.Tensor, kind: str, backend: str, options: dict[str, Any]
) -> Literal["reference", "varlen", "flex"]:
    if backend not in ("auto", "reference", "varlen", "flex"):
        raise ValueError(
            f"attention backend must be 'auto', 'reference', 'varlen' or 'flex', got {backend!r}"
        )
    on_cuda = q.device.type == "cuda"
    if kind == "linear":
        if backend not in ("auto", "reference"):
            raise ValueError(
                f"linear attention has only the reference backend, got backend={backend!r}"
            )
        return "reference"
    if kind == "sparse":
        if backend == "varlen":
            raise ValueError("sparse attention runs on the 'reference' or 'flex' backend")
        if backend == "auto":
            return "flex" if on_cuda else "reference"
        return backend  # type: ignore[return-value]

    if options.get("score_mod") is not None:
        if backend not in ("auto", "flex"):
            raise ValueError(f"score_mod needs backend='flex' or 'auto', got {backend!r}")
        return "flex"
    if backend == "varlen":
        from mil.kernels.varlen import varlen_unavailable_reason

        reason = varlen_unavailable_reason(q, v)
        if reason is not None:
            raise ValueError(f"backend='varlen' cannot run here: {reason}")
        return "varlen"
    if backend == "auto":
        if on_cuda and q.dtype in (torch.float16, torch.bfloat16):
            from mil.kernels.varlen import varlen_unavailable_reason

            if varlen_unavailable_reason(q, v) is None:
                return "varlen"
        return "reference"
    return backend  # type: ignore[return-value]


def _bag_rows(segments: Segments) -> list[slice]:
    return [slice(s, s + n) for s, n in zip(segments.starts, segments.lengths, strict=True)]


def _assemble(
    pieces: list[torch.Tensor | None],
    q_segments: Segments,
    like: torch.Tensor,
    tail: tuple[int, ...],
) -> torch.Tensor:
    """Concatenate per-bag outputs (None = zeros for that bag) and zero padding rows."""
    parts = []
    for piece, n in zip(pieces, q_segments.lengths, strict=True):
        parts.append(piece if piece is not None else like.new_zeros((n, *tail)))
    parts.append(like.new_zeros((q_segments.total - q_segments.num_valid, *tail)))
    return torch.cat(parts, dim=0)


def softmax_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_segments: Segments,
    kv_segments: Segments,
    scale: float | None = None,
    score_mod: None = None,
) -> torch.Tensor:
    """Softmax attention with one `scaled_dot_product_attention` call per bag.

    Shapes as in `attention`. A Python loop over B bags; lengths are Python ints, so the loop
    never synchronises with the device.
    """
    if score_mod is not None:
        raise ValueError("score_mod is supported by the flex backend only")
    pieces: list[torch.Tensor | None] = []
    for q_rows, kv_rows in zip(_bag_rows(q_segments), _bag_rows(kv_segments), strict=True):
        if q_rows.stop == q_rows.start or kv_rows.stop == kv_rows.start:
            pieces.append(None)
            continue
        out = F.scaled_dot_product_attention(
            q[q_rows].transpose(0, 1),  # [H, n, Dh]
            k[kv_rows].transpose(0, 1),
            v[kv_rows].transpose(0, 1),
            scale=scale,
        )
        pieces.append(out.transpose(0, 1))  # [n, H, Dv]
    return _assemble(pieces, q_segments, q, tuple(v.shape[1:]))


def _elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


FEATURE_MAPS: dict[str, FeatureMap] = {"elu": _elu_plus_one, "relu": F.relu}


def resolve_feature_map(feature_map: str | FeatureMap) -> FeatureMap:
    """Return the callable φ for a feature map name ("elu" = elu + 1, "relu") or a callable."""
    if callable(feature_map):
        return feature_map
    if feature_map not in FEATURE_MAPS:
        raise ValueError(
            f"unknown feature_map {feature_map!r}; use one of {sorted(FEATURE_MAPS)} or a callable"
        )
    return FEATURE_MAPS[feature_map]


def linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_segments: Segments,
    kv_segments: Segments,
    feature_map: str | FeatureMap = "elu",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Non-causal linear attention (Katharopoulos et al., ICML 2020), per bag.

    out_i = φ(q_i)ᵀ (Σ_j φ(k_j) v_jᵀ) / (φ(q_i)ᵀ Σ_j φ(k_j) + eps), sums over the keys of the
    query's bag. Cost is linear in the bag length: O(n H Dh Dv) per bag.
    """
    phi = resolve_feature_map(feature_map)
    pieces: list[torch.Tensor | None] = []
    for q_rows, kv_rows in zip(_bag_rows(q_segments), _bag_rows(kv_segments), strict=True):
        if q_rows.stop == q_rows.start or kv_rows.stop == kv_rows.start:
            pieces.append(None)
            continue
        phi_q = phi(q[q_rows])  # [n, H, Dh]
        phi_k = phi(k[kv_rows])  # [m, H, Dh]
        kv = torch.einsum("mhd,mhe->hde", phi_k, v[kv_rows])  # [H, Dh, Dv]
        normaliser = torch.einsum("nhd,hd->nh", phi_q, phi_k.sum(0))  # [n, H]
        out = torch.einsum("nhd,hde->nhe", phi_q, kv) / (normaliser.unsqueeze(-1) + eps)
        pieces.append(out)
    return _assemble(pieces, q_segments, q, tuple(v.shape[1:]))


def default_scale(head_dim: int, scale: float | None) -> float:
    """Return `scale`, or 1/sqrt(head_dim) when it is None (the usual softmax temperature)."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
