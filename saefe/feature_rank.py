"""Exact feature-space ranking through an inverted index of the corpus' SAE codes.

score(image) = sum_j w_j * a_j(image). Every image has at most k active features, so the
codes are a sparse (N, d_hidden) matrix; its CSC form lists, per feature, the images where it
fires (a posting list). A mix of a few features touches only their postings, so ranking a
million images costs a few thousand additions instead of a pass over the corpus.
"""

from __future__ import annotations

import numpy as np

from .errors import SteeringError


class FeatureRanker:
    def __init__(self, csc, n_total: int | None = None):
        self.csc = csc.tocsc() if not hasattr(csc, "indptr") or csc.format != "csc" else csc
        self.n_total = int(n_total if n_total is not None else self.csc.shape[0])
        self.d_hidden = int(self.csc.shape[1])
        self._indptr = self.csc.indptr
        self._indices = self.csc.indices
        self._data = self.csc.data

    def postings(self, feature: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self._indptr[feature], self._indptr[feature + 1]
        return self._indices[lo:hi], self._data[lo:hi]

    def frequency(self, feature: int) -> float:
        return float(self._indptr[feature + 1] - self._indptr[feature]) / max(1, self.n_total)

    def rank(self, ids: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(image ids, scores) of the exact top-k, best first; ties broken by lower id."""
        ids = np.asarray(ids, dtype=np.int64)
        weights = np.asarray(weights, dtype=np.float32)
        if len(ids) == 0:
            raise SteeringError("all sliders are zero")
        if ids.min() < 0 or ids.max() >= self.d_hidden:
            raise SteeringError(f"feature id out of range [0, {self.d_hidden})")
        k = max(1, min(int(k), self.n_total))
        segs = [(self._indptr[j], self._indptr[j + 1]) for j in ids]
        cand = np.concatenate([self._indices[a:b] for a, b in segs]) if segs else np.zeros(0, np.int64)
        vals = np.concatenate([self._data[a:b] * w for (a, b), w in zip(segs, weights)]) if segs else np.zeros(0)
        if len(cand):
            uniq, inv = np.unique(cand, return_inverse=True)
            scores = np.bincount(inv, weights=vals, minlength=len(uniq)).astype(np.float32)
        else:
            uniq, scores = np.zeros(0, np.int64), np.zeros(0, np.float32)
        # Images outside every posting list score exactly 0; they rank between + and - scores.
        pos = scores > 0
        top_ids, top_s = _top(uniq[pos], scores[pos], k)
        if len(top_ids) < k:
            need = k - len(top_ids)
            zero_ids = uniq[scores == 0]
            outside = np.setdiff1d(np.arange(min(self.n_total, need + len(uniq)), dtype=np.int64), uniq)
            fill = np.sort(np.concatenate([zero_ids, outside]))[:need]
            top_ids = np.concatenate([top_ids, fill])
            top_s = np.concatenate([top_s, np.zeros(len(fill), np.float32)])
            if len(top_ids) < k:
                neg_ids, neg_s = _top(uniq[scores < 0], scores[scores < 0], k - len(top_ids))
                top_ids, top_s = np.concatenate([top_ids, neg_ids]), np.concatenate([top_s, neg_s])
        return top_ids, top_s


def _top(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if len(ids) > k:
        part = np.argpartition(-scores, k - 1)[:k]
        ids, scores = ids[part], scores[part]
    order = np.lexsort((ids, -scores))
    return ids[order], scores[order]
