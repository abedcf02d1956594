"""Near-duplicate collapse of a ranked result list (reposts, re-encodes, crops of one meme).

Candidates are taken in rank order; each joins the group of the best-ranked kept result whose
cosine with it is at least ``threshold`` (clip-retrieval and meme-search-engine use ~0.94-0.95
for CLIP-like encoders), or starts a new group. Only each group's best result is shown, with the
group's size and member ids. The close pairs come from one thresholded (n x n) product of the
candidates' stored unit vectors, in blocks (a range search over the candidates, done with numpy:
for the hundreds to few thousands of candidates of a page that is milliseconds, simpler and
exact next to building a temporary FAISS index); the greedy pass then only looks at those pairs.

What counts as a near-duplicate depends on the encoder: an index may record its own threshold
(``dedup_threshold`` in its manifest; the demo's random-weight model puts unrelated images above
0.95), which ``default_threshold`` returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from saefe.errors import SaefeError

DEFAULT_THRESHOLD = 0.95


@dataclass
class Groups:
    leaders: np.ndarray  # positions (into the candidate list) of each group's best member, rank order
    members: list[np.ndarray]  # positions of each group's members, leader first


def check_threshold(threshold: float | None) -> float | None:
    """None / 0 = off; else a cosine in (0, 1]."""
    if threshold is None:
        return None
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise SaefeError(f"dedup threshold must be a number in (0, 1], got {threshold!r}") from None
    if t == 0:
        return None
    if not 0 < t <= 1:
        raise SaefeError(f"dedup threshold must be in (0, 1] (a cosine; 0 turns it off), got {t}")
    return t


def dedup_option(threshold: float | None, on: bool = True) -> float | str | None:
    """A user's setting (CLI flag, API field) -> the search option: off when ``on`` is False or
    the threshold is 0, "auto" (the index's own cosine) when none is given, else the checked cosine."""
    if not on:
        return None
    return "auto" if threshold is None else check_threshold(threshold)


def default_threshold(store) -> float:
    """The index's own near-duplicate cosine (its manifest's ``dedup_threshold``), else 0.95."""
    manifest = getattr(store, "manifest", None) or {}
    return float(manifest.get("dedup_threshold", DEFAULT_THRESHOLD))


def group_near_duplicates(vectors: np.ndarray, threshold: float = DEFAULT_THRESHOLD, block: int = 2048) -> Groups:
    """Greedy grouping of rank-ordered unit ``vectors`` (n, d): see the module docstring."""
    v = np.asarray(vectors, dtype=np.float32)
    n = len(v)
    # close earlier neighbours of each candidate: pairs (i, j), j < i, cosine >= threshold
    rows, cols = [], []
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        close = (v[lo:hi] @ v[:hi].T) >= threshold
        close &= np.arange(hi)[None, :] < np.arange(lo, hi)[:, None]  # keep j < i only
        i, j = np.nonzero(close)
        rows.append(i + lo)
        cols.append(j)
    i = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    j = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    order = np.lexsort((j, i))  # by candidate, then by its neighbours' rank
    i, j = i[order], j[order]
    starts = np.searchsorted(i, np.arange(n + 1))
    group_of = np.arange(n)
    is_leader = np.ones(n, bool)
    for c in np.flatnonzero(starts[1:] > starts[:-1]):  # only candidates with a close earlier one
        near = j[starts[c]: starts[c + 1]]
        lead = near[is_leader[near]]
        if len(lead):
            group_of[c] = lead[0]  # the best-ranked kept result it duplicates
            is_leader[c] = False
    leaders = np.flatnonzero(is_leader)
    order = np.argsort(group_of, kind="stable")
    bounds = np.searchsorted(group_of[order], leaders)
    ends = np.append(bounds[1:], n)
    members = [order[a:b] for a, b in zip(bounds, ends)]
    return Groups(leaders, members)
