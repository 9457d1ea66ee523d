"""Per-pack cache for objects derived from bag boundaries (groupings, FlexAttention masks).

Everything cached here depends only on a pack's `Segments`, so it is built once per pack and
reused by every layer of a model. Entries are dropped with the `Segments` they belong to.
"""

from __future__ import annotations

import weakref
from typing import Any

from mil.kernels.segments import Segments

_PACK_CACHES: weakref.WeakKeyDictionary[Segments, dict[Any, Any]] = weakref.WeakKeyDictionary()


def pack_cache(segments: Segments) -> dict[Any, Any]:
    """Return the cache dict of one pack, created empty on first use."""
    cache = _PACK_CACHES.get(segments)
    if cache is None:
        cache = {}
        _PACK_CACHES[segments] = cache
    return cache
