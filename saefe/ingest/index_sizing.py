"""How much RAM (and disk) each index kind needs for N vectors of dimension d, before building it.

``auto`` (and ``--max-index-memory``) choose a kind from these figures, and docs/SCALING.md
quotes them. They count what a loaded index keeps resident: faiss' own arrays plus a margin
for search buffers, not the fp16 store (memory-mapped; the OS pages it in and out).
Formulas follow faiss' layouts; benchmarks/bench_index.py checks them against measured RSS.
"""

from __future__ import annotations

import math
from typing import Any

from saefe.errors import SaefeError

_MARGIN = 32 << 20  # search buffers, Python objects


def _nlist(n: int, params: dict[str, Any]) -> int:
    return int(params.get("nlist") or max(1, min(int(math.sqrt(n)), n // 39 or 1)))


def estimate_memory(kind: str, n: int, d: int, params: dict[str, Any] | None = None) -> int:
    """Resident bytes of a loaded ``kind`` index over ``n`` x ``d`` vectors (``auto`` excluded:
    it is resolved first). ``params``: the same keys the index records (nlist, m, pq_m, ...)."""
    p = dict(params or {})
    if kind == "flat":
        return n * d * 4 + _MARGIN
    if kind == "ivf":
        return n * (d * 4 + 8) + _nlist(n, p) * d * 4 + _MARGIN
    if kind == "ivf-sq8":
        return n * (d + 8) + _nlist(n, p) * d * 4 + 2 * d * 4 + _MARGIN
    if kind == "hnsw":
        m = int(p.get("m", p.get("hnsw_m", 32)))
        # level 0 holds 2*M int32 links per vector; upper levels add ~1/M of that again
        return n * (d * 4 + int(2 * m * 4 * 1.1) + 16) + _MARGIN
    if kind == "ivfpq-ondisk":
        from saefe.ingest.index_ondisk import estimate_memory as ondisk

        return ondisk(n, d, p)
    raise SaefeError(f"no memory estimate for index type {kind!r}")


def estimate_disk(kind: str, n: int, d: int, params: dict[str, Any] | None = None) -> int:
    """Bytes the index files take in the index dir (beside the store's n*d*2 bytes of vectors)."""
    if kind == "ivfpq-ondisk":
        from saefe.ingest.index_ondisk import estimate_disk as ondisk

        return ondisk(n, d, dict(params or {}))
    return estimate_memory(kind, n, d, params) - _MARGIN


def kinds_within(n: int, d: int, budget_bytes: int, has_gpu: bool = False) -> list[str]:
    """Index kinds whose estimate fits ``budget_bytes``, fastest-to-search first (the order
    bench_index.py measured on CPUs); HNSW is dropped when faiss has GPUs (no GPU HNSW)."""
    order = ["flat"] if n <= 50_000 else []
    order += (["ivf", "ivf-sq8"] if has_gpu else ["hnsw", "ivf-sq8", "ivf"]) + ["ivfpq-ondisk"]
    return [k for k in order if estimate_memory(k, n, d) <= budget_bytes]
