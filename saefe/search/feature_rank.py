"""Exact feature-space ranking through an inverted index of the corpus' SAE codes.

score(image) = sum_j w_j * a_j(image). Every image has at most k active features, so the
codes are a sparse (N, d_hidden) matrix; its CSC form lists, per feature, the images where it
fires (a posting list). A mix of a few features touches only their postings, so ranking a
million images costs a few thousand additions instead of a pass over the corpus.

Order: score descending, ties by lower image id. Images outside every posting list score exactly
0, so they rank after the positive scores and before the negative ones.

Two ways to merge the postings (same results): ``sort`` (np.unique over the candidates; best for
small candidate sets) and ``dense`` (scatter-add into a preallocated per-corpus score buffer, read
the candidates back, reset only the touched entries: O(candidates), no sort; best for large sets).
``auto`` picks by the number of postings touched.
"""

from __future__ import annotations

import threading

import numpy as np

from saefe.errors import SteeringError

# Measured (benchmarks/bench_engine.py): the buffer pass wins once the postings are large next to
# the corpus (its random writes then hit a buffer that is mostly touched anyway); below that,
# sorting the candidates is cheaper. Dense from max(20k, n_total / 4) postings.
DENSE_MIN_POSTINGS = 20_000
DENSE_CORPUS_FRACTION = 4


class FeatureRanker:
    def __init__(self, csc, n_total: int | None = None):
        # a scipy CSC matrix, or codes_store.SparseArrays (memory-mapped .npy: only the mix's
        # features' postings are ever read from disk)
        self.csc = csc.tocsc() if not hasattr(csc, "indptr") or csc.format != "csc" else csc
        self.n_total = int(n_total if n_total is not None else self.csc.shape[0])
        if self.n_total < self.csc.shape[0]:
            raise SteeringError(f"n_total {self.n_total} is smaller than the codes' {self.csc.shape[0]} rows")
        self.d_hidden = int(self.csc.shape[1])
        self._indptr = np.asarray(self.csc.indptr, dtype=np.int64)
        self._indices = self.csc.indices
        self._data = self.csc.data
        self._buf: np.ndarray | None = None  # dense score buffer (float64, n_total), lazily allocated
        self._lock = threading.Lock()

    def _check_feature(self, feature) -> int:
        f = int(feature)
        if not 0 <= f < self.d_hidden:
            raise SteeringError(f"feature id {feature} is out of range [0, {self.d_hidden})")
        return f

    def postings(self, feature: int) -> tuple[np.ndarray, np.ndarray]:
        f = self._check_feature(feature)
        lo, hi = self._indptr[f], self._indptr[f + 1]
        return self._indices[lo:hi], self._data[lo:hi]

    def frequency(self, feature: int) -> float:
        f = self._check_feature(feature)
        return float(self._indptr[f + 1] - self._indptr[f]) / max(1, self.n_total)

    def n_postings(self, ids) -> int:
        ids = np.asarray(ids, dtype=np.int64)
        return int((self._indptr[ids + 1] - self._indptr[ids]).sum())

    def _validate(self, ids, weights) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(ids).reshape(-1)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise SteeringError("feature ids must be integers")
        ids = ids.astype(np.int64)
        weights = np.asarray(weights, dtype=np.float64).reshape(-1)
        if len(ids) != len(weights):
            raise SteeringError(f"{len(ids)} feature ids but {len(weights)} weights")
        if not np.isfinite(weights).all():
            raise SteeringError("feature weights must be finite numbers (got NaN or infinity)")
        keep = weights != 0
        ids, weights = ids[keep], weights[keep]
        if len(ids) == 0:
            raise SteeringError("all sliders are zero")
        if ids.min() < 0 or ids.max() >= self.d_hidden:
            bad = int(ids.min() if ids.min() < 0 else ids.max())
            raise SteeringError(f"feature id {bad} is out of range [0, {self.d_hidden})")
        if len(np.unique(ids)) != len(ids):  # merge repeated ids (sum their weights)
            u, inv = np.unique(ids, return_inverse=True)
            weights = np.bincount(inv, weights=weights, minlength=len(u))
            ids, weights = u, weights
            keep = weights != 0
            ids, weights = ids[keep], weights[keep]
            if len(ids) == 0:
                raise SteeringError("all sliders are zero")
        return ids, weights

    def rank(self, ids: np.ndarray, weights: np.ndarray, k: int, method: str = "auto") -> tuple[np.ndarray, np.ndarray]:
        """(image ids int64, scores float32) of the exact top-k, best first; ties by lower id."""
        ids, weights = self._validate(ids, weights)
        if method not in ("auto", "sort", "dense"):
            raise SteeringError(f"unknown ranking method {method!r}")
        k = max(1, min(int(k), self.n_total))
        los, his = self._indptr[ids], self._indptr[ids + 1]
        total = int((his - los).sum())
        if method == "auto":
            dense = total >= max(DENSE_MIN_POSTINGS, self.n_total // DENSE_CORPUS_FRACTION)
            method = "dense" if dense and len(ids) > 1 else "sort"
        if len(ids) == 1:  # one posting list: ids are already distinct
            lo, hi = los[0], his[0]
            cand = np.asarray(self._indices[lo:hi], dtype=np.int64)
            scores = self._data[lo:hi].astype(np.float64) * weights[0]
            return self._finish(cand, scores, k, distinct=True)
        if method == "sort":
            cand = np.concatenate([self._indices[a:b] for a, b in zip(los, his)]).astype(np.int64, copy=False)
            vals = np.concatenate([self._data[a:b].astype(np.float64) * w for a, b, w in zip(los, his, weights)])
            if len(cand):
                uniq, inv = np.unique(cand, return_inverse=True)
                scores = np.bincount(inv, weights=vals, minlength=len(uniq))
            else:
                uniq, scores = np.zeros(0, np.int64), np.zeros(0, np.float64)
            return self._finish(uniq, scores, k, distinct=True)
        with self._lock:
            if self._buf is None:
                self._buf = np.zeros(self.n_total, np.float64)
            buf = self._buf
            parts = []
            try:
                for a, b, w in zip(los, his, weights):
                    idx = self._indices[a:b]
                    buf[idx] += self._data[a:b] * w  # a posting list holds each image once
                    parts.append(idx)
                cand = np.concatenate(parts).astype(np.int64, copy=False)
                scores = buf[cand]  # duplicates share the same (final) score
                return self._finish(cand, scores, k, distinct=False, buf=buf, n_feats=len(ids))
            finally:
                for idx in parts:
                    buf[idx] = 0.0

    def _finish(self, cand, scores, k, distinct: bool, buf=None, n_feats: int = 1):
        reps = 1 if distinct else n_feats
        pos = scores > 0
        top_ids, top_s = _top_distinct(cand[pos], scores[pos], k, reps)
        if len(top_ids) < k:
            need = k - len(top_ids)
            # zero-score images, ascending id: outside every posting list, or summing to exactly 0
            hi = min(self.n_total, need + len(cand))
            if buf is not None:
                zeros = np.flatnonzero(buf[:hi] == 0)[:need]
            else:
                nz = cand[(scores != 0) & (cand < hi)]
                mask = np.ones(hi, bool)
                mask[nz] = False
                zeros = np.flatnonzero(mask)[:need]
            top_ids = np.concatenate([top_ids, zeros.astype(np.int64)])
            top_s = np.concatenate([top_s, np.zeros(len(zeros))])
            if len(top_ids) < k:
                neg = scores < 0
                n_ids, n_s = _top_distinct(cand[neg], scores[neg], k - len(top_ids), reps)
                top_ids, top_s = np.concatenate([top_ids, n_ids]), np.concatenate([top_s, n_s])
        return top_ids.astype(np.int64), top_s.astype(np.float32)


def _top_distinct(ids: np.ndarray, scores: np.ndarray, k: int, reps: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Top-k distinct ids by score desc, id asc. ``ids`` may repeat up to ``reps`` times, every
    copy with the same score. Keeps everything tied with the (k*reps)-th score, so the result is
    exact (ties at the boundary go to the lower ids)."""
    m = k * reps
    if len(ids) > m:
        kth = np.partition(scores, len(scores) - m)[len(scores) - m]
        keep = scores >= kth
        ids, scores = ids[keep], scores[keep]
    if reps > 1 and len(ids):
        ids, first = np.unique(ids, return_index=True)
        scores = scores[first]
    order = np.lexsort((ids, -scores))[:k]
    return ids[order], scores[order]


def brute_force_rank(codes, ids, weights, k: int, n_total: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reference ranking: dense scores = codes @ w over the whole corpus (for tests/benchmarks)."""
    import scipy.sparse as sp

    codes = sp.csr_matrix(codes) if not sp.issparse(codes) else codes
    n = codes.shape[0] if n_total is None else int(n_total)
    w = np.zeros(codes.shape[1], np.float64)
    np.add.at(w, np.asarray(ids, dtype=np.int64), np.asarray(weights, dtype=np.float64))
    s = np.zeros(n, np.float64)
    s[: codes.shape[0]] = codes @ w
    k = max(1, min(int(k), n))
    kth = np.partition(s, n - k)[n - k]
    cand = np.flatnonzero(s >= kth)
    order = np.lexsort((cand, -s[cand]))[:k]
    return cand[order], s[cand[order]].astype(np.float32)
