"""One page of results: filters, near-duplicate collapse and paging over the engine's two modes.

``search_page(engine, terms, k, mode, offset, where, dedup)`` is what the CLI, the app and the
HTTP backend call. It fetches ranked candidates (more than one page when collapsing duplicates,
doubling until the page is full or the candidates run out), collapses near-duplicates
(saefe.search.dedup), and cuts ``[offset, offset + k)`` out of the collapsed list.

Filters (saefe.search.filters) restrict the candidates, not the page:
- direction mode: exact scan of the selected rows when they are few, else the FAISS index with
  an ``IDSelectorBitmap`` (works for flat, IVF and HNSW); an index that refuses selectors (GPU)
  is over-fetched and filtered.
- feature mode: the posting-list merge is masked, then ranked as FeatureRanker does (positive
  scores, then rows outside every posting list by id, then negative scores).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from saefe.errors import SaefeError, SteeringError
from saefe.search.dedup import check_threshold, default_threshold, group_near_duplicates
from saefe.search.filters import Filter, cached_mask

log = logging.getLogger(__name__)

MAX_WINDOW = 10_000  # offset + k (the engine's own cap on k)
DEDUP_FETCH = 10  # collapsing fetches at most this many candidates per result wanted (then stops short)
EXACT_SCAN_MAX = 20_000  # filtered direction search: scan the selected rows exactly up to this many


@dataclass
class Page:
    results: list  # SearchResult, best first
    offset: int
    k: int
    has_more: bool
    matching: int | None = None  # rows the filter lets through (None: no filter)
    dedup_threshold: float | None = None
    filter: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def next_offset(self) -> int:
        """Where the next page starts (collapsing may return fewer than k from a crowded region)."""
        return self.offset + len(self.results)

    def to_json(self) -> dict[str, Any]:
        return {"results": [r.to_json() for r in self.results], "offset": self.offset, "k": self.k,
                "has_more": self.has_more, "next_offset": self.next_offset, "matching": self.matching,
                "dedup_threshold": self.dedup_threshold, "filter": self.filter}


def check_paging(k, offset) -> tuple[int, int]:
    try:
        k, offset = int(k), int(offset)
    except (TypeError, ValueError):
        raise SaefeError(f"k and offset must be integers, got {k!r} and {offset!r}") from None
    if k < 1:
        raise SaefeError(f"number of results must be at least 1, got {k}")
    if offset < 0:
        raise SaefeError(f"offset must be 0 or more, got {offset}")
    if offset + k > MAX_WINDOW:
        raise SaefeError(f"offset + k must be at most {MAX_WINDOW} (got {offset} + {k}); narrow the search with a filter")
    return k, offset


def _threshold(engine, dedup) -> float | None:
    """"auto": the index's own near-duplicate cosine; None / 0: off; else the number given."""
    if isinstance(dedup, str) and dedup == "auto":
        return default_threshold(getattr(engine, "store", None))
    return check_threshold(dedup)


def search_page(engine, terms: Sequence, k: int = 20, mode: str = "direction", offset: int = 0,
                where: Filter | Sequence[str] | str | dict | None = None,
                dedup: float | str | None = "auto") -> Page:
    from saefe.search.types import MODES

    if mode not in MODES:
        raise SaefeError(f"unknown search mode {mode!r}; use one of {', '.join(MODES)}")
    if mode == "direction":
        return search_vector_page(engine, engine.query_vector(terms), k, offset, where, dedup)
    ids, ws = feature_weights(engine, terms)
    return rank_features_page(engine, ids, ws, k, offset, where, dedup)


def feature_weights(engine, terms: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """The summed (feature ids, weights) of feature-mode terms (labels, expressions, mixes)."""
    from saefe.search.types import MIX_KINDS, TERM_KINDS
    from saefe.search.mix import check_weight, sum_mixes

    if not terms:
        raise SteeringError("empty query: give a label, expression or features")
    weighted = []
    for t in terms:
        if t.kind not in TERM_KINDS:
            raise SaefeError(f"unknown term type {t.kind!r}; use one of {', '.join(TERM_KINDS)}")
        if t.kind not in MIX_KINDS:
            raise SaefeError(f"feature mode ranks by SAE features; a {t.kind} term needs --mode direction")
        weighted.append((check_weight(t.weight, f"{t.kind} term"), engine.mix(t)))
    ids, ws = sum_mixes(weighted)
    if not len(ids):
        raise SteeringError("all sliders are zero")
    return ids, ws


def _mask(engine, where) -> tuple[np.ndarray | None, str]:
    flt = where if isinstance(where, Filter) else Filter.parse(where)
    if not flt:
        return None, ""
    if engine.backend is not None:
        raise SaefeError("filters need the local index (not available with --backend)")
    return cached_mask(flt, engine.store.metadata), str(flt)


def search_vector_page(engine, vec: np.ndarray, k: int = 20, offset: int = 0, where=None,
                       dedup: float | str | None = "auto") -> Page:
    k, offset = check_paging(k, offset)
    thr = _threshold(engine, dedup)
    v = np.asarray(vec, dtype=np.float32).reshape(-1)
    if engine.backend is not None:  # remote: no stored vectors or metadata here; plain top-k
        if where:
            raise SaefeError("filters need the local index (not available with --backend)")
        res = engine.search_vector(v, offset + k + 1)
        return Page(res[offset: offset + k], offset, k, len(res) > offset + k)
    mask, desc = _mask(engine, where)
    sel = None if mask is None else np.flatnonzero(mask)
    limit = engine.n_total if sel is None else len(sel)

    def fetch(m: int) -> tuple[np.ndarray, np.ndarray]:
        if sel is None:
            scores, ids = engine.index.search(v[None, :], m)
            return ids[0], scores[0]
        return _filtered_direction(engine, v, m, mask, sel)

    return _paginate(engine, fetch, k, offset, thr, limit, None if sel is None else len(sel), desc)


def rank_features_page(engine, ids: np.ndarray, ws: np.ndarray, k: int = 20, offset: int = 0, where=None,
                       dedup: float | str | None = "auto") -> Page:
    if engine.backend is not None:
        raise SaefeError("feature-space ranking needs the local index (not available with --backend)")
    k, offset = check_paging(k, offset)
    thr = _threshold(engine, dedup)
    mask, desc = _mask(engine, where)
    ranker = engine.ranker
    fids, fws = ranker._validate(ids, ws)
    n_sel = None if mask is None else int(mask.sum())

    def fetch(m: int) -> tuple[np.ndarray, np.ndarray]:
        if mask is None:
            return ranker.rank(fids, fws, m)
        return masked_rank(ranker, fids, fws, m, mask)

    return _paginate(engine, fetch, k, offset, thr, engine.n_total if mask is None else n_sel, n_sel, desc)


def _paginate(engine, fetch: Callable[[int], tuple[np.ndarray, np.ndarray]], k: int, offset: int,
              thr: float | None, limit: int, matching: int | None, desc: str) -> Page:
    need = offset + k
    if limit <= 0:
        return Page([], offset, k, False, matching, thr, desc)
    m = min(limit, need + 1 if thr is None else max(2 * need, need + 32))
    cap = min(limit, MAX_WINDOW * 4, max(DEDUP_FETCH * need, 200))
    while True:
        ids, scores = fetch(m)
        keep = ids >= 0
        ids, scores = np.asarray(ids[keep], dtype=np.int64), np.asarray(scores[keep], dtype=np.float32)
        if thr is None:
            results = engine._results(ids[offset:need], scores[offset:need])
            return Page(results, offset, k, len(ids) > need, matching, None, desc)
        groups = group_near_duplicates(engine.store.vectors_f32(ids), thr)
        if len(groups.leaders) > need or m >= cap or len(ids) < m:
            break
        m = min(cap, 2 * m)
    page = groups.leaders[offset:need]
    results = engine._results(ids[page], scores[page])
    for r, j in zip(results, range(offset, offset + len(page))):
        r.group = [int(x) for x in ids[groups.members[j]]]
    # more follows if another group is known, or candidates were left unfetched
    more = len(groups.leaders) > need or (len(ids) >= m and m < limit)
    return Page(results, offset, k, bool(more), matching, thr, desc)


def _filtered_direction(engine, v: np.ndarray, m: int, mask: np.ndarray, sel: np.ndarray):
    m = min(m, len(sel))
    if len(sel) <= EXACT_SCAN_MAX:
        s = np.empty(len(sel), np.float32)
        for lo in range(0, len(sel), 8192):
            s[lo: lo + 8192] = engine.store.vectors_f32(sel[lo: lo + 8192]) @ v
        top = np.argpartition(-s, m - 1)[:m] if m < len(s) else np.arange(len(s))
        top = top[np.lexsort((sel[top], -s[top]))]
        return sel[top], s[top]
    try:
        return _selector_search(engine.index, v, m, mask)
    except (RuntimeError, AttributeError, TypeError) as e:  # e.g. a GPU index: over-fetch and filter
        log.debug("no ID selector for this index (%s); over-fetching", e)
        want = min(engine.n_total, max(m, int(m * engine.n_total / max(1, len(sel)) * 1.5)))
        while True:
            scores, ids = engine.index.search(v[None, :], want)
            ok = (ids[0] >= 0) & mask[np.maximum(ids[0], 0)]
            if ok.sum() >= m or want >= engine.n_total:
                return ids[0][ok][:m], scores[0][ok][:m]
            want = min(engine.n_total, 2 * want)


def _selector_search(vi, v: np.ndarray, m: int, mask: np.ndarray):
    import faiss

    bits = np.packbits(mask.astype(np.uint8), bitorder="little")
    sel = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits))
    index = vi.index
    if vi.kind == "hnsw" or hasattr(index, "hnsw"):
        p = faiss.SearchParametersHNSW()
        p.efSearch = max(int(index.hnsw.efSearch), m)
    elif "nprobe" in vi.params:
        p = faiss.SearchParametersIVF()
        p.nprobe = int(vi.params["nprobe"])
    else:
        p = faiss.SearchParameters()
    p.sel = sel
    scores, ids = index.search(np.ascontiguousarray(v[None, :]), m, params=p)
    del bits  # kept alive until here: the selector points into it
    return ids[0], scores[0]


def masked_rank(ranker, ids: np.ndarray, ws: np.ndarray, k: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FeatureRanker.rank restricted to rows where ``mask`` holds, same order: positive scores
    (ties by lower id), then rows scoring exactly 0 by id, then negative scores."""
    parts = [ranker.postings(int(f)) for f in ids]
    cand = np.concatenate([p[0] for p in parts]).astype(np.int64) if parts else np.zeros(0, np.int64)
    vals = np.concatenate([p[1].astype(np.float64) * w for p, w in zip(parts, ws)]) if parts else np.zeros(0)
    uniq, inv = np.unique(cand, return_inverse=True)
    scores = np.bincount(inv, weights=vals, minlength=len(uniq))
    keep = mask[uniq]
    uniq, scores = uniq[keep], scores[keep]
    pos, neg = scores > 0, scores < 0
    o = np.lexsort((uniq[pos], -scores[pos]))[:k]
    out_ids, out_s = [uniq[pos][o]], [scores[pos][o]]
    left = k - len(o)
    if left > 0:
        zero = mask.copy()
        zero[uniq[scores != 0]] = False
        z = np.flatnonzero(zero)[:left]
        out_ids.append(z)
        out_s.append(np.zeros(len(z)))
        left -= len(z)
    if left > 0:
        o = np.lexsort((uniq[neg], -scores[neg]))[:left]
        out_ids.append(uniq[neg][o])
        out_s.append(scores[neg][o])
    return np.concatenate(out_ids).astype(np.int64), np.concatenate(out_s).astype(np.float32)
