"""Where the protected groups sit around one query: the measures ``project`` and ``ablate`` use,
and the calibration that sets their strength.

Why local. A label's bias lives in its own results, not in the corpus at large. On the demo the
Esteem query ranks 244 male Esteem images before its first female one, yet its direction is
nearly orthogonal to the corpus-wide gender direction (|u.q| = 0.02: removing that direction moves
nothing), and none of its features is tied to gender corpus-wide (their maleness is what the
Esteem label explains). What separates the groups is local: among the query's nearest images,
men and women differ along a direction, and in a few features, that corpus-wide measures average
away. So both methods first take the query's *neighbourhood*, the shortest prefix of its ranking
holding at least ``per_group`` images of every group (BendVLM's reference images nearest to the
query play the same role), and measure there:

* :func:`local_directions`: the groups' mean offsets over the neighbourhood (G-1 directions per
  attribute). Projecting them out of the query gives every group the same mean score over the
  neighbourhood (BendVLM's equalisation); a strength above 1 leans the other way.
* :func:`feature_gaps`: per feature of the mix, the standardised difference of mean activation
  between the group most over its target in the results and the other images of the
  neighbourhood (Cohen's d). A feature that pushes the results towards that group by half a
  standard deviation or more is tied to the bias *of this query*.

:func:`calibrate` then picks the smallest strength whose top-k meets the target shares, so a query
whose results are already fair does not move. Groups are true labels or probe estimates
(expected counts), as everywhere else (:mod:`saefe.labels.demographics`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

DEFAULT_PER_GROUP = 40  # images of each group in the neighbourhood (demo sweep: 10, 20, 40; 40 best)
MIN_PER_GROUP = 2.0  # fewer (expected) images of a group: no local measure for that attribute
DEFAULT_GAP_THRESHOLD = 0.5  # |Cohen's d| that ties a feature to this query's bias ("medium")
BISECT_STEPS = 6


@dataclass(frozen=True)
class Neighbourhood:
    """The query's nearest images that hold every group (see the module docstring)."""

    ids: np.ndarray  # (N,) corpus rows, best first
    complete: bool  # every group of every attribute reached per_group
    counts: dict[str, dict[str, float]] = field(default_factory=dict)  # expected images per group

    def usable(self, attr: str) -> bool:
        """Enough images of each of ``attr``'s groups to measure anything."""
        return min(self.counts.get(attr, {"": 0.0}).values()) >= MIN_PER_GROUP


def neighbourhood(ranked: np.ndarray, attrs, per_group: int = DEFAULT_PER_GROUP) -> Neighbourhood:
    """The shortest prefix of ``ranked`` (corpus rows, best first) with >= ``per_group`` images of
    every group of every attribute in ``attrs`` (AttributeGroups); all of ``ranked`` when it has
    fewer."""
    ranked = np.asarray(ranked, dtype=np.int64)
    if len(ranked) == 0:
        return Neighbourhood(ranked, False, {ag.name: {g: 0.0 for g in ag.groups} for ag in attrs})
    reached = np.ones(len(ranked), bool)
    for ag in attrs:
        reached &= (np.cumsum(ag.member[ranked], axis=0, dtype=np.float64) >= per_group).all(axis=1)
    n = int(np.argmax(reached)) + 1 if reached.any() else len(ranked)
    ids = ranked[:n]
    counts = {ag.name: {g: float(c) for g, c in zip(ag.groups, ag.member[ids].sum(axis=0, dtype=np.float64))}
              for ag in attrs}
    return Neighbourhood(ids, bool(reached.any()), counts)


def local_directions(vectors: np.ndarray, nb: Neighbourhood, attrs) -> tuple[np.ndarray, list[str]]:
    """((r, D) orthonormal directions, the attribute of each row): the groups' mean offsets over
    the neighbourhood (``vectors``: (N, D) embeddings of ``nb.ids``), attribute by attribute, each
    block orthogonal to the ones before (so each attribute's strength can be set on its own).
    Attributes without enough images are left out (r = 0 when none has them)."""
    from saefe.labels.probes import orthonormal_basis

    x = np.asarray(vectors, dtype=np.float64)
    blocks = []
    for ag in attrs:
        if not nb.usable(ag.name):
            continue
        w = ag.member[nb.ids].astype(np.float64)  # (N, G): labels or probabilities
        means = (w.T @ x) / w.sum(axis=0)[:, None]
        blocks.append((ag.name, orthonormal_basis(means - means.mean(axis=0, keepdims=True), len(ag.groups) - 1)))
    return stack_blocks(blocks, x.shape[1])


def stack_blocks(blocks: Sequence[tuple[str, np.ndarray]], dim: int) -> tuple[np.ndarray, list[str]]:
    """Stack per-attribute direction blocks into one orthonormal basis, each block made orthogonal
    to the blocks before it (Gram-Schmidt by blocks); rows that vanish are dropped."""
    from saefe.labels.probes import orthonormal_basis

    rows: list[np.ndarray] = []
    owner: list[str] = []
    for name, b in blocks:
        b = np.asarray(b, dtype=np.float64).reshape(-1, dim)
        if rows:
            prev = np.stack(rows)
            b = b - (b @ prev.T) @ prev
        b = orthonormal_basis(b, b.shape[0]).astype(np.float64) if len(b) else b
        rows.extend(b)
        owner.extend([name] * len(b))
    return (np.stack(rows) if rows else np.zeros((0, dim))), owner


def over_groups(attrs, targets: dict[str, np.ndarray], ids: np.ndarray) -> dict[str, int]:
    """attribute -> the group most over its target share among ``ids`` (the results)."""
    out = {}
    for ag in attrs:
        s = np.nan_to_num(ag.shares(ids), nan=0.0)
        out[ag.name] = int(np.argmax(s - targets[ag.name]))
    return out


def activations(postings: Callable[[int], tuple[np.ndarray, np.ndarray]], ids: np.ndarray,
                features: Sequence[int]) -> np.ndarray:
    """(N, F) SAE activations of rows ``ids`` on ``features``, read from the features' posting
    lists (``postings(f)`` -> (rows, values): the same codes feature mode ranks by)."""
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    out = np.zeros((len(ids), len(features)), np.float64)
    for j, f in enumerate(features):
        rows, vals = postings(int(f))
        rows = np.asarray(rows, dtype=np.int64)
        pos = np.searchsorted(sorted_ids, rows)
        hit = (pos < len(sorted_ids)) & (sorted_ids[np.minimum(pos, len(sorted_ids) - 1)] == rows)
        out[order[pos[hit]], j] = np.asarray(vals, dtype=np.float64)[hit]
    return out


def feature_gaps(acts: np.ndarray, nb: Neighbourhood, attrs, over: dict[str, int]) -> dict[str, np.ndarray]:
    """attribute -> (F,) Cohen's d of each feature between the attribute's over-represented group
    and the rest of the neighbourhood (``acts``: (N, F) activations of ``nb.ids``); 0 for features
    that do not vary there."""
    out = {}
    for ag in attrs:
        if not nb.usable(ag.name):
            continue
        w = ag.member[nb.ids].astype(np.float64)
        known = w.sum(axis=1) > 0
        a, w = acts[known], w[known]
        p = w[:, over[ag.name]]  # weight of each image in the over-represented group
        mean_in = (p @ a) / max(p.sum(), 1e-12)
        mean_out = ((1.0 - p) @ a) / max((1.0 - p).sum(), 1e-12)
        sd = a.std(axis=0)
        out[ag.name] = np.where(sd > 1e-12, (mean_in - mean_out) / np.maximum(sd, 1e-12), 0.0)
    return out


def query_gaps(ranked: np.ndarray, attrs, targets: dict[str, np.ndarray], k: int, per_group: int,
               postings: Callable[[int], tuple[np.ndarray, np.ndarray]], features: Sequence[int]
               ) -> tuple[Neighbourhood, dict[str, np.ndarray]]:
    """A ranking's neighbourhood and each feature's gap there (:func:`feature_gaps`), towards each
    attribute's group most over its target among the first ``k`` results: what ``ablate`` and
    the audit measure."""
    nb = neighbourhood(ranked, attrs, per_group)
    acts = activations(postings, nb.ids, features)
    return nb, feature_gaps(acts, nb, attrs, over_groups(attrs, targets, np.asarray(ranked)[:k]))


def tied_features(gaps: dict[str, np.ndarray], weights: np.ndarray,
                  threshold: float = DEFAULT_GAP_THRESHOLD) -> dict[str, np.ndarray]:
    """attribute -> (F,) bool: the features whose weight pushes the results towards that
    attribute's over-represented group by ``threshold`` standard deviations or more
    (w * d >= threshold * |w|)."""
    w = np.sign(np.asarray(weights, dtype=np.float64))
    return {a: (w * d) >= threshold for a, d in gaps.items()}


def deviation(attrs, targets: dict[str, np.ndarray], ids: np.ndarray) -> float:
    """Largest |share - target| over the protected attributes' groups (inf when unknown)."""
    worst = 0.0
    for ag in attrs:
        s = ag.shares(ids)
        if np.isnan(s).any():
            return float("inf")
        worst = max(worst, float(np.abs(s - targets[ag.name]).max()))
    return worst


def calibrate(search_ids: Callable[[float], np.ndarray], attrs, targets: dict[str, np.ndarray], tol: float,
              grid: Sequence[float]) -> tuple[float, float]:
    """(strength, deviation): the smallest strength in ``grid`` (ascending from 0) whose top-k
    (``search_ids(strength)`` -> corpus rows) meets the targets within ``tol``, narrowed by
    bisection; the strength with the smallest deviation when none does.

    The group most over its target at strength 0 drives the search: the grid finds where its share
    first comes down to within ``tol`` of the target, bisection then narrows that step."""
    devs: dict[float, float] = {}
    over: dict[float, float] = {}
    worst: tuple[str, int] | None = None

    def ev(lam: float) -> None:
        nonlocal worst
        if lam in devs:
            return
        ids = search_ids(lam)
        devs[lam] = deviation(attrs, targets, ids)
        excess = {(ag.name, g): float(s - targets[ag.name][g]) for ag in attrs
                  for g, s in enumerate(np.nan_to_num(ag.shares(ids), nan=0.0))}
        if worst is None:
            worst = max(excess, key=excess.get)
        over[lam] = excess[worst]

    def crossed(lam: float) -> bool:
        ev(lam)
        return devs[lam] <= tol or over[lam] <= tol

    ev(float(grid[0]))
    if devs[grid[0]] <= tol:
        return float(grid[0]), devs[grid[0]]
    prev = float(grid[0])
    for lam in grid[1:]:
        if crossed(float(lam)):
            lo, hi = prev, float(lam)
            for _ in range(BISECT_STEPS):
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if crossed(mid) else (mid, hi)
            if devs[hi] <= tol:
                return hi, devs[hi]
            break
        prev = float(lam)
    best = min(devs, key=lambda lam: (devs[lam], lam))
    return best, devs[best]


def calibrate_each(search_ids: Callable[[dict[str, float]], np.ndarray], attrs, targets: dict[str, np.ndarray],
                   tol: float, grid: Sequence[float], passes: int = 2) -> tuple[dict[str, float], float]:
    """({attribute: strength}, deviation): :func:`calibrate` for one attribute at a time, each on
    its own groups with the others' strengths held (two passes over several attributes), so that
    fixing one attribute never overshoots another that a single shared strength would drag along."""
    strengths = {ag.name: float(grid[0]) for ag in attrs}
    for _ in range(passes if len(attrs) > 1 else 1):
        for ag in attrs:
            strengths[ag.name], _ = calibrate(lambda x: search_ids({**strengths, ag.name: x}), [ag], targets, tol, grid)
        dev = deviation(attrs, targets, search_ids(strengths))
        if dev <= tol:
            break
    return strengths, dev
