"""``saefe evaluate --debias``: how each bias-attenuation method trades label precision for
demographic balance on a labelled corpus.

For one label (the most skewed one by default) and the protected attributes, one row per method
and k: the seed's label query (``none``), the seed's arithmetic variants (``Esteem - Male +
Adult``, ``Esteem - 2*Male + 2*Female``...), ``ablate``, ``project``, ``rerank`` and their
combinations. Columns: label precision (share of results carrying the label), each group's share,
MaxSkew@k and NDKL against the corpus' base rates, the gap of the first group's share to its
target, whether the method met the target, and the query latency (median of ``repeats``).
Ground truth is the index's true labels (``attributes.parquet``), never estimates.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from saefe.errors import SaefeError

DEFAULT_METHODS = ("none", "ablate", "project", "rerank", "ablate+rerank", "project+rerank", "ablate+project")
FEATURE_METHODS = ("none", "ablate", "rerank", "ablate+rerank")  # project needs a query vector


@dataclass
class DebiasRow:
    method: str
    mode: str
    k: int
    precision: float
    shares: dict[str, dict[str, float]]
    max_skew: dict[str, float]
    ndkl: dict[str, float]
    gap: float  # |share - corpus share| of the first group of the first protected attribute
    met: bool | None
    ms: float
    notes: list[str] = field(default_factory=list)


@dataclass
class DebiasEval:
    label: str
    protect: list[str]
    target: str
    base_rates: dict[str, dict[str, float]]
    label_shares: dict[str, dict[str, float]]
    rows: list[DebiasRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def seed_variants(label: str, attr_groups: dict[str, list[str]], labels: Sequence[str]) -> list[str]:
    """The seed's arithmetic for ``label``: minus the first group, plus another group or Adult."""
    out = []
    gender = attr_groups.get("gender", [])
    if len(gender) >= 2 and all(g in labels for g in gender[:2]):
        a, b = gender[:2]
        if "Adult" in labels:
            out.append(f"{label} - {a} + Adult")
        out += [f"{label} - {a} + {b}", f"{label} - 2*{a} + 2*{b}"]
    return out


def most_skewed_label(attributes, demographics, attr: str = "gender", min_images: int = 20) -> str:
    """The non-demographic label whose images are furthest from the corpus on ``attr``."""
    ag = demographics.require([attr])[0]
    base = ag.base_rates()
    demo_cols = {g for gs in demographics.groups().values() for g in gs}
    best, best_gap = None, -1.0
    for col in attributes.columns:
        rows = attributes[col].to_numpy().astype(bool)
        if col in demo_cols or rows.sum() < min_images:
            continue
        sub = ag.member[rows].sum(axis=0)
        gap = float(np.abs(sub / max(sub.sum(), 1e-9) - base).max())
        if gap > best_gap:
            best, best_gap = col, gap
    if best is None:
        raise SaefeError("no label with enough images to evaluate")
    return best


def evaluate_debias(engine, label: str | None = None, protect: Sequence[str] = ("gender",), ks=(20, 100),
                    methods: Sequence[str] = DEFAULT_METHODS, target: str = "corpus", repeats: int = 3,
                    features_mode: bool = True, variants: Sequence[str] | None = None) -> DebiasEval:
    from saefe.search.bias import measure_demographics
    from saefe.search.debias import DebiasConfig, local_ids
    from saefe.search.engine import Term

    attrs = engine.attributes
    if attrs is None:
        raise SaefeError(f"evaluating debias methods needs true labels (attributes.parquet) in {engine.store.dir}")
    dem = engine.demographics
    groups = dem.require(protect)
    label = label or most_skewed_label(attrs, dem, groups[0].name)
    label = engine.require_profiles().labels[engine.profiles.label_index(label)]
    if label not in attrs.columns:
        raise SaefeError(f"label {label!r} has no per-image truth in {engine.store.dir}")
    truth = attrs[label].to_numpy().astype(bool)
    ev = DebiasEval(label, [g.name for g in groups], target,
                    {g.name: dict(zip(g.groups, map(float, g.base_rates()))) for g in groups},
                    {g.name: _shares(g, np.flatnonzero(truth)) for g in groups})
    variants = seed_variants(label, dem.groups(), engine.profiles.labels) if variants is None else list(variants)
    runs: list[tuple[str, str, Term, Any]] = []
    for m in methods:
        cfg = DebiasConfig.parse(m, list(protect), target)
        for mode in ("direction", "features"):
            if mode == "features" and (not features_mode or m not in FEATURE_METHODS):
                continue
            runs.append((m, mode, Term("label", label), cfg))
            if m == "none":
                runs += [(v, mode, Term("expr", v), None) for v in variants]
    first = groups[0]
    for k in ks:
        for name, mode, term, cfg in runs:
            times, res = [], None
            for _ in range(max(1, repeats)):
                t0 = time.perf_counter()
                res = engine.search([term], k=k, mode=mode, debias=cfg)
                times.append(time.perf_counter() - t0)
            ids = local_ids(engine, res)
            rep = measure_demographics(ids, dem)
            info = getattr(res, "info", None)
            sh = rep.shares.get(first.name, {})
            gap = abs(sh.get(first.groups[0], math.nan) - rep.base_rates[first.name][first.groups[0]]) if sh else math.nan
            ev.rows.append(DebiasRow(name, mode, k, float(truth[ids].mean()) if len(ids) else math.nan,
                                     {a: rep.shares[a] for a in ev.protect if a in rep.shares},
                                     {a: rep.max_skew[a] for a in ev.protect if a in rep.max_skew},
                                     {a: rep.ndkl[a] for a in ev.protect if a in rep.ndkl}, gap,
                                     info.met if info else None, 1000 * float(np.median(times)),
                                     list(info.notes) if info else []))
    return ev


def _shares(ag, ids: np.ndarray) -> dict[str, float]:
    tot = ag.member[ids].sum(axis=0, dtype=np.float64)
    return {g: float(v / max(tot.sum(), 1e-12)) for g, v in zip(ag.groups, tot)}


def format_debias(ev: DebiasEval) -> str:
    cols = [(a, g) for a in ev.protect for g in ev.base_rates[a]]
    first = cols[0][1] if cols else "?"
    lines = [f"debias methods for {ev.label!r}, protecting {', '.join(ev.protect)}, target {ev.target} "
             "(precision = share of results carrying the label; truth from the index's labels)"]
    lines.append("corpus: " + "  ".join(f"{g} {ev.base_rates[a][g]:.0%}" for a, g in cols) + f" | {ev.label} images: "
                 + "  ".join(f"{g} {ev.label_shares[a][g]:.0%}" for a, g in cols))
    head = (f"{'method':<28} {'mode':<9} {'k':>4} {'prec':>5} " + " ".join(f"{g[:6]:>6}" for _, g in cols)
            + f" {'|gap|':>6} " + " ".join(f"{'skew:' + a[:3]:>8} {'ndkl:' + a[:3]:>8}" for a in ev.protect)
            + f" {'met':>4} {'ms':>7}")
    lines += [head, "-" * len(head)]
    for r in ev.rows:
        shares = " ".join(_pct(r.shares.get(a, {}).get(g)).rjust(6) for a, g in cols)
        mets = " ".join(f"{_num(r.max_skew.get(a), '{:+.2f}'):>8} {_num(r.ndkl.get(a), '{:.3f}'):>8}" for a in ev.protect)
        met = "" if r.met is None else ("yes" if r.met else "no")
        lines.append(f"{r.method[:28]:<28} {r.mode:<9} {r.k:>4} {_pct(r.precision):>5} {shares} "
                     f"{_num(r.gap, '{:.2f}'):>6} {mets} {met:>4} {r.ms:>7.1f}")
    lines.append(f"|gap| = |{first} share - corpus share|; MaxSkew = max over groups of log(share / base rate); "
                 "NDKL = rank-discounted KL from the base rates (0 = mirrors the corpus); ms = median query time")
    return "\n".join(lines)


def _pct(x) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.0%}"


def _num(x, fmt: str) -> str:
    return "n/a" if x is None or not math.isfinite(x) else fmt.format(x)
