"""How far a ranked list's demographic make-up is from the corpus' base rates.

Share of each group among the top-k, MaxSkew@k (the largest log-ratio of a group's share to
its base rate; Geyik et al. 2019) and NDKL (rank-discounted KL divergence of every prefix's
distribution from the base rates). 0 for both means the list mirrors the corpus.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from saefe.labels.attributes import DEMOGRAPHICS  # noqa: F401 - re-exported (attribute -> groups)


@dataclass
class BiasReport:
    k: int
    shares: dict[str, dict[str, float]] = field(default_factory=dict)
    base_rates: dict[str, dict[str, float]] = field(default_factory=dict)
    max_skew: dict[str, float] = field(default_factory=dict)
    ndkl: dict[str, float] = field(default_factory=dict)
    estimated: dict[str, bool] = field(default_factory=dict)  # attribute -> some groups are probe estimates
    sources: dict[str, str] = field(default_factory=dict)  # attribute -> labels | estimates | labels+estimates

    def to_dict(self) -> dict:
        return _finite({"k": self.k, "shares": self.shares, "base_rates": self.base_rates,
                        "max_skew": self.max_skew, "ndkl": self.ndkl, "estimated": self.estimated,
                        "sources": self.sources})

    def by_attribute(self) -> dict:
        """``{ATTR: {"groups": {GROUP: {"results": share, "corpus": share}}, "max_skew", "ndkl",
        "estimated", "source"}}``: the ``bias`` member of ``saefe search --bias --json``."""
        out = {}
        for attr, shares in self.shares.items():
            out[attr] = {
                "groups": {g: {"results": s, "corpus": self.base_rates[attr][g]} for g, s in shares.items()},
                "max_skew": self.max_skew.get(attr), "ndkl": self.ndkl.get(attr),
                "estimated": bool(self.estimated.get(attr, False)), "source": self.sources.get(attr, "labels"),
            }
        return _finite(out)


def _finite(o):
    """NaN -> None, so the JSON is valid."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    return o


def _dist(member: np.ndarray) -> np.ndarray:
    """Group distribution of rows (R, G); images with no group label are left out."""
    tot = member.sum(axis=0).astype(np.float64)
    s = tot.sum()
    return tot / s if s > 0 else np.full(member.shape[1], np.nan)


def _kl(p: np.ndarray, q: np.ndarray, eps: float = 1e-9) -> float:
    m = p > 0
    return float(np.sum(p[m] * np.log(p[m] / np.maximum(q[m], eps))))


def measure_bias(ranked_ids: np.ndarray, attributes, groups: dict[str, list[str]] | None = None) -> BiasReport:
    """``attributes``: a DataFrame of 0/1 group columns, one row per corpus image (row = id)."""
    groups = groups or DEMOGRAPHICS
    ranked = np.asarray(ranked_ids, dtype=np.int64)
    rep = BiasReport(k=len(ranked))
    for attr, names in groups.items():
        names = [n for n in names if n in attributes.columns]
        if len(names) < 2 or len(ranked) == 0:
            continue
        all_m = attributes[names].to_numpy(dtype=np.float64)
        base = _dist(all_m)
        top = all_m[ranked]
        share = _dist(top)
        rep.base_rates[attr] = {n: float(b) for n, b in zip(names, base)}
        rep.shares[attr] = {n: float(s) for n, s in zip(names, share)}
        skews = [math.log(max(s, 1e-9) / b) for s, b in zip(share, base) if b > 0 and not math.isnan(s)]
        rep.max_skew[attr] = float(max(skews)) if skews else float("nan")
        z, acc, cum = 0.0, 0.0, np.zeros(len(names))
        for i, row in enumerate(top, start=1):
            cum += row
            if cum.sum() == 0:
                continue
            w = 1.0 / math.log2(i + 1)
            z += w
            acc += w * _kl(cum / cum.sum(), base)
        rep.ndkl[attr] = acc / z if z > 0 else float("nan")
    return rep


def measure_demographics(ranked_ids: np.ndarray, demographics) -> BiasReport:
    """``measure_bias`` over a :class:`saefe.labels.demographics.Demographics` (labels and/or
    estimates, counted with their probabilities), recording for each attribute whether estimates
    were involved."""
    rep = measure_bias(ranked_ids, demographics.frame(), demographics.groups())
    for attr, ag in demographics.attributes.items():
        if attr in rep.shares:
            rep.estimated[attr] = ag.any_estimated
            rep.sources[attr] = ag.source
    return rep
