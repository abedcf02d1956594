"""Fair re-ranking: the top-k of a relevance-ordered candidate list with target group proportions.

Given each candidate's group (in relevance order) and target shares, :func:`fair_rerank` returns
a top-k that

* holds exactly ``quota[g]`` candidates of group g, where ``quota`` is the largest-remainder
  rounding of ``target * k`` (for an intersection of attributes, :func:`joint_quota`: exact
  per-attribute roundings, cells as close to the joint target as those allow) whenever the pool has that many of every group (else the missing
  slots go to the groups that have spare candidates, in proportion to their targets, and the
  result says the target was not met);
* keeps each group's candidates in their relevance order (group g contributes exactly its
  ``quota[g]`` most relevant candidates);
* interleaves the groups so every prefix stays close to the proportions: at rank i a group below
  ``floor(share * i)`` goes first (the ranked-group-fairness constraint of FA*IR, Zehlike et al.
  2017, and DetConstSort, Geyik et al. 2019), otherwise the most relevant next candidate of any
  group still under its quota.

Written here rather than taken from ``fairsearchcore`` (FA*IR's reference implementation): that
package was last released in 2019, handles one binary protected group with a minimum proportion
(a statistical test, not exact shares), and cannot express several groups or an intersection of
attributes, which ``--protect gender,age`` needs. The algorithm is a few lines of integer work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class FairRanking:
    order: np.ndarray  # (k',) positions in the candidate list, best first
    quota: np.ndarray  # (G,) candidates of each group in the top-k
    wanted: np.ndarray  # (G,) what the target asked for
    available: np.ndarray  # (G,) candidates of each group in the pool
    met: bool  # quota == wanted
    short: dict[int, int] = field(default_factory=dict)  # group -> candidates missing


def apportion(shares: np.ndarray, k: int) -> np.ndarray:
    """Largest-remainder rounding of ``shares * k`` (shares >= 0, summing to 1): integer counts
    summing to k; ties go to the larger fractional part, then the lower group index."""
    s = np.asarray(shares, dtype=np.float64)
    if k <= 0 or len(s) == 0:
        return np.zeros(len(s), np.int64)
    raw = s / s.sum() * k
    base = np.floor(raw + 1e-9).astype(np.int64)
    rest = int(k - base.sum())
    if rest > 0:
        frac = raw - base
        order = np.lexsort((np.arange(len(s)), -np.round(frac, 12)))
        base[order[:rest]] += 1
    return base


def joint_quota(marginals: list[np.ndarray], joint: np.ndarray, k: int) -> np.ndarray:
    """Counts per cell of several attributes' intersection (cells in C order of the attributes'
    groups) summing to k, whose per-attribute totals are exactly each marginal's apportionment:
    cells are filled one slot at a time, largest joint deficit (joint * k - count) first, among the
    cells whose every group is still under its marginal quota (one always is while slots remain)."""
    sizes = [len(m) for m in marginals]
    quotas = [apportion(m, k) for m in marginals]
    joint = np.asarray(joint, dtype=np.float64).reshape(sizes)
    joint = joint / joint.sum() if joint.sum() > 0 else np.full(sizes, 1.0 / joint.size)
    count = np.zeros(sizes, np.int64)
    totals = [np.zeros(n, np.int64) for n in sizes]
    cells = list(np.ndindex(*sizes))
    for _ in range(int(k)):
        best, best_d = None, -np.inf
        for c in cells:
            if all(totals[a][c[a]] < quotas[a][c[a]] for a in range(len(sizes))):
                d = joint[c] * k - count[c]
                if d > best_d + 1e-12:
                    best, best_d = c, d
        count[best] += 1
        for a in range(len(sizes)):
            totals[a][best[a]] += 1
    return count.reshape(-1)


def feasible_quota(wanted: np.ndarray, available: np.ndarray, shares: np.ndarray, k: int) -> np.ndarray:
    """``wanted`` capped by ``available``; freed slots go to groups with spare candidates in
    proportion to their shares (largest remainder), repeatedly, until k is filled or the pool is."""
    quota = np.minimum(wanted, available).astype(np.int64)
    k = min(int(k), int(available.sum()))
    while quota.sum() < k:
        spare = available - quota
        open_ = spare > 0
        w = np.where(open_, np.maximum(shares, 1e-12), 0.0)
        extra = np.minimum(apportion(w / w.sum(), k - int(quota.sum())), spare)
        if extra.sum() == 0:  # rounding gave everything to full groups: one slot to the best open one
            extra[int(np.argmax(w))] = 1
        quota += extra
    return quota


def fair_rerank(groups: np.ndarray, shares: np.ndarray, k: int, wanted: np.ndarray | None = None) -> FairRanking:
    """Re-rank candidates (``groups[i]`` = group index of the i-th most relevant, 0..G-1) to ``shares``
    (``wanted``: exact counts per group summing to k, instead of apportioning the shares).

    Returns positions into the candidate list; see the module docstring for the guarantees."""
    groups = np.asarray(groups, dtype=np.int64)
    shares = np.asarray(shares, dtype=np.float64)
    n_groups = len(shares)
    if n_groups == 0 or not np.isfinite(shares).all() or (shares < 0).any() or shares.sum() <= 0:
        raise ValueError(f"target shares must be non-negative and not all zero, got {shares.tolist()}")
    if len(groups) and (groups.min() < 0 or groups.max() >= n_groups):
        raise ValueError("every candidate needs a group index in [0, number of groups)")
    shares = shares / shares.sum()
    k = max(0, min(int(k), len(groups)))
    available = np.bincount(groups, minlength=n_groups).astype(np.int64)
    if wanted is None or int(np.sum(wanted)) != k:
        wanted = apportion(shares, k)
    wanted = np.asarray(wanted, dtype=np.int64)
    quota = feasible_quota(wanted, available, shares, k)
    queues = [np.flatnonzero(groups == g) for g in range(n_groups)]
    head = np.zeros(n_groups, np.int64)
    # prefix targets follow the feasible quota, so the lower bounds can always be met
    prefix_share = quota / max(1, quota.sum())
    order = np.empty(k, np.int64)
    for i in range(1, k + 1):
        open_ = head < quota
        below = open_ & (head < np.floor(prefix_share * i + 1e-9))
        pick_from = np.flatnonzero(below if below.any() else open_)
        nxt = np.array([queues[g][head[g]] for g in pick_from])
        g = int(pick_from[int(np.argmin(nxt))])
        order[i - 1] = queues[g][head[g]]
        head[g] += 1
    short = {int(g): int(wanted[g] - available[g]) for g in range(n_groups) if available[g] < wanted[g]}
    return FairRanking(order, quota, wanted, available, bool((quota == wanted).all()), short)

