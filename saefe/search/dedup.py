"""Near-duplicate collapse of a ranked result list (reposts, re-encodes, crops of one meme).

Candidates are taken in rank order; each joins the group of the best-ranked kept result whose
cosine with it is at least ``threshold`` (clip-retrieval and meme-search-engine use ~0.94-0.95),
or starts a new group. Only each group's best result is shown, with the group's size and member
ids. Cosines come from one (n x n) product of the candidates' stored unit vectors, in blocks: for
the few hundred to few thousand candidates of a page that is milliseconds, simpler and exact
next to a FAISS range search over a temporary index of the same vectors.
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


def group_near_duplicates(vectors: np.ndarray, threshold: float = DEFAULT_THRESHOLD, block: int = 1024) -> Groups:
    """Greedy grouping of rank-ordered unit ``vectors`` (n, d): see the module docstring."""
    v = np.asarray(vectors, dtype=np.float32)
    n = len(v)
    group_of = np.full(n, -1, np.int64)  # leader position of each candidate
    leaders: list[int] = []
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        s = v[lo:hi] @ v[:hi].T  # cosines of this block against everything ranked above or in it
        for i in range(lo, hi):
            row = s[i - lo, :i]
            if len(leaders) and i:
                lead = np.asarray(leaders, dtype=np.int64)
                lead = lead[lead < i]
                close = lead[row[lead] >= threshold]
                if len(close):
                    group_of[i] = close[0]  # the best-ranked kept result it duplicates
                    continue
            group_of[i] = i
            leaders.append(i)
    lead = np.asarray(leaders, dtype=np.int64)
    members = [np.flatnonzero(group_of == j) for j in lead]
    return Groups(lead, members)
