"""Each image's demographic group per protected attribute: true labels where they exist, probe
estimates elsewhere, and a record of which is which.

The bias report, the bias panel and fair re-ranking all ask the same questions (which group is
image i in, what are the corpus' base rates, is that a label or a guess), so they share this one
resolver. True labels come from ``attributes.parquet`` (0/1 group columns written by ``saefe
labels``); estimates come from ``estimated_demographics.parquet`` (group probabilities from the
probes, see :mod:`saefe.labels.estimates`). A row with any true group column set is a label; else
the estimate's probabilities; else the image's group is unknown (a zero row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from saefe.errors import SaefeError
from saefe.labels.attributes import DEMOGRAPHICS


@dataclass
class AttributeGroups:
    """One protected attribute over the corpus."""

    name: str
    groups: list[str]
    member: np.ndarray  # (N, G) float32: 0/1 true labels, or probabilities; a zero row = unknown
    estimated: np.ndarray  # (N,) bool: the row is a probe estimate, not a label

    def shares(self, ids: np.ndarray | None = None) -> np.ndarray:
        """(G,) group shares among ``ids`` (all images when None); an estimated image counts with
        its probabilities (expected shares)."""
        m = self.member if ids is None else self.member[np.asarray(ids, dtype=np.int64)]
        tot = m.sum(axis=0, dtype=np.float64)
        return tot / tot.sum() if tot.sum() > 0 else np.full(len(self.groups), np.nan)

    @property
    def source(self) -> str:
        """'labels', 'estimates' or 'labels+estimates' (over the images whose group is known)."""
        known = self.member.sum(axis=1) > 0
        est = bool((self.estimated & known).any())
        lab = bool((~self.estimated & known).any())
        return "labels+estimates" if est and lab else ("estimates" if est else "labels")

    @property
    def any_estimated(self) -> bool:
        return bool(self.estimated.any())

    def hard(self) -> np.ndarray:
        """(N,) group index per image: the true group, or the estimate's most likely one; -1 when
        unknown or when a label names several groups (several people in one image)."""
        m = self.member
        out = np.argmax(m, axis=1).astype(np.int64)
        known = m.sum(axis=1) > 0
        multi = ~self.estimated & ((m > 0).sum(axis=1) > 1)
        out[~known | multi] = -1
        return out

    def base_rates(self) -> np.ndarray:
        """(G,) share of each group over the corpus (estimates count as expected shares)."""
        return self.shares()


class Demographics:
    """The protected attributes known for an index (labels, estimates or both)."""

    def __init__(self, n: int, attributes: dict[str, AttributeGroups]):
        self.n = int(n)
        self.attributes = attributes

    def __contains__(self, name: str) -> bool:
        return name in self.attributes

    @property
    def available(self) -> dict[str, str]:
        """attribute -> source, for error messages and the UI."""
        return {a: ag.source for a, ag in self.attributes.items()}

    def describe_available(self) -> str:
        av = self.available
        return ", ".join(f"{a} ({s})" for a, s in av.items()) if av else "none"

    def require(self, names: Iterable[str], why: str = "protect") -> list[AttributeGroups]:
        """The attributes ``names`` (also accepted: a group name such as 'Male' for its attribute);
        one SaefeError naming what is available otherwise."""
        out: list[AttributeGroups] = []
        for raw in names:
            name = str(raw).strip()
            key = name.lower()
            hit = next((ag for a, ag in self.attributes.items() if a.lower() == key), None)
            if hit is None:
                hit = next((ag for ag in self.attributes.values() if key in (g.lower() for g in ag.groups)), None)
            if hit is None:
                known = set(DEMOGRAPHICS) | {g.lower() for gs in DEMOGRAPHICS.values() for g in gs}
                what = "no per-image labels and no probe" if key in known else "not a protected attribute here"
                raise SaefeError(
                    f"cannot {why} {name!r}: {what} (available: {self.describe_available()}; "
                    f"attributes: {', '.join(DEMOGRAPHICS)}; fit probes with `saefe labels --annotations`)")
            if hit not in out:
                out.append(hit)
        if not out:
            raise SaefeError(f"name at least one attribute to {why} (available: {self.describe_available()})")
        return out

    def frame(self, names: Sequence[str] | None = None) -> pd.DataFrame:
        """(N, groups) frame of membership weights, the input ``measure_bias`` takes."""
        cols: dict[str, np.ndarray] = {}
        for a, ag in self.attributes.items():
            if names is None or a in names:
                for j, g in enumerate(ag.groups):
                    cols[g] = ag.member[:, j]
        return pd.DataFrame(cols)

    def groups(self) -> dict[str, list[str]]:
        return {a: list(ag.groups) for a, ag in self.attributes.items()}

    @classmethod
    def resolve(cls, n: int, labels: pd.DataFrame | None = None, estimates: pd.DataFrame | None = None,
                groups: dict[str, list[str]] | None = None) -> "Demographics":
        """True labels (0/1 group columns) where a row has any; estimate probabilities elsewhere."""
        groups = groups or DEMOGRAPHICS
        out: dict[str, AttributeGroups] = {}
        for attr, names in groups.items():
            have_l = labels is not None and len(labels) == n and sum(g in labels.columns for g in names) >= 2
            have_e = estimates is not None and len(estimates) == n and all(g in estimates.columns for g in names)
            if not (have_l or have_e):
                continue
            gs = [g for g in names if (have_l and g in labels.columns) or (have_e and g in estimates.columns)]
            member = np.zeros((n, len(gs)), np.float32)
            truth = np.zeros(n, bool)
            if have_l:
                lab = np.stack([labels[g].to_numpy(np.float32) if g in labels.columns else np.zeros(n, np.float32)
                                for g in gs], axis=1)
                truth = lab.sum(axis=1) > 0
                member[truth] = lab[truth]
            est = np.zeros(n, bool)
            if have_e:
                prob = np.stack([estimates[g].to_numpy(np.float32) for g in gs], axis=1)
                est = ~truth & (prob.sum(axis=1) > 0)
                member[est] = prob[est]
            out[attr] = AttributeGroups(attr, gs, member, est)
        return cls(n, out)
