"""Bias audit: how strongly each SAE feature is tied to a protected attribute, and which of a
label's top features carry the bias. ``--debias ablate`` uses the same measures: this corpus-wide
one, and the gap among the query's own nearest images (:mod:`saefe.search.debias_local`).

Measure (from labelled images; true labels only, never estimates): for feature j and group g,

    share[j, g]    = share of group g among the labelled images where j fires
    expected[j, g] = the share those same images' other (non-demographic) labels explain: the
                     mean over the images of the group share among images with the same label
                     set (shrunk towards the mean of its labels' shares for rare label sets;
                     images with no other label count with the corpus' base rates)
    excess[j, g]   = (share - expected) * n / (n + PRIOR)     n = images where j fires

Comparing with ``expected`` rather than the corpus base rate keeps a label's own features from
being blamed for the label's skew: in a corpus where 85% of Esteem images show men, an "arms on
hips" feature fires on 85% men because Esteem does, and its excess is ~0; a "beard" feature has
a large excess everywhere. The shrinkage by ``PRIOR`` keeps rarely firing features from being
flagged on a handful of images. A feature is flagged for the attribute when max_g |excess| >=
the threshold (0.2 by default: 20 points more of one group than the labels explain).

Also reported: each group's mean activation (``mean_act``), the other measure the issue names.

Stored beside the label profiles as ``feature_bias.parquet`` (row j = feature j) by ``saefe
labels``, so a corpus without annotations can be ablated with the annotated set's measure.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from saefe.errors import SaefeError
from saefe.labels.attributes import DEMOGRAPHICS

log = logging.getLogger(__name__)

FEATURE_BIAS = "feature_bias.parquet"
PRIOR = 10.0
DEFAULT_THRESHOLD = 0.2


@dataclass
class FeatureAssociation:
    """One protected attribute's association with every feature."""

    attribute: str
    groups: list[str]
    support: np.ndarray  # (H,) labelled images where the feature fires
    share: np.ndarray  # (H, G)
    expected: np.ndarray  # (H, G)
    mean_act: np.ndarray  # (H, G) mean activation over each group's images

    @property
    def excess(self) -> np.ndarray:
        n = self.support.astype(np.float64)[:, None]
        return (self.share - self.expected) * n / (n + PRIOR)

    @property
    def score(self) -> np.ndarray:
        """(H,) max_g |excess|: 0 = no tie beyond what the labels explain."""
        return np.abs(self.excess).max(axis=1)

    @property
    def lean(self) -> np.ndarray:
        """(H,) the group each feature leans towards (largest excess)."""
        return np.argmax(self.excess, axis=1)

    def flagged(self, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
        return self.score >= threshold


def _rows_of_labels(labels: pd.DataFrame, names: Sequence[str]) -> np.ndarray:
    return labels[list(names)].to_numpy(np.float64) if names else np.zeros((len(labels), 0))


def measure_associations(codes, labels: pd.DataFrame, groups: dict[str, list[str]] | None = None
                         ) -> dict[str, FeatureAssociation]:
    """Associations of every feature (``codes``: (N, H) sparse activations) with each attribute
    whose groups ``labels`` (0/1 columns, one row per image) holds."""
    import scipy.sparse as sp

    groups = groups or DEMOGRAPHICS
    codes = sp.csr_matrix(codes, dtype=np.float32)
    if codes.shape[0] != len(labels):
        raise SaefeError(f"codes have {codes.shape[0]} rows but the labels {len(labels)}")
    fired = codes.copy()
    fired.data = (fired.data > 0).astype(np.float32)
    demo_cols = {g for gs in groups.values() for g in gs}
    strata = _rows_of_labels(labels, [c for c in labels.columns if c not in demo_cols]) > 0
    out: dict[str, FeatureAssociation] = {}
    for attr, names in groups.items():
        names = [g for g in names if g in labels.columns]
        if len(names) < 2:
            continue
        m = _rows_of_labels(labels, names)
        known = m.sum(axis=1) > 0
        if not known.any():
            continue
        m = m / np.maximum(m.sum(axis=1, keepdims=True), 1)  # several people: split the image
        base = m[known].mean(axis=0)
        expect = _expected_shares(m, known, strata, base)
        mk = m * known[:, None]
        fk = fired.multiply(known[:, None].astype(np.float32)).tocsr()
        counts = np.asarray(fk.T @ mk)
        support = np.asarray(fk.sum(axis=0)).ravel()
        exp_counts = np.asarray(fk.T @ (expect * known[:, None]))
        denom = np.maximum(support, 1)[:, None]
        share = np.where(support[:, None] > 0, counts / denom, base[None, :])
        expected = np.where(support[:, None] > 0, exp_counts / denom, base[None, :])
        mean_act = np.asarray(codes.T @ mk) / np.maximum(mk.sum(axis=0), 1e-9)[None, :]
        out[attr] = FeatureAssociation(attr, names, support.astype(np.int64), share, expected, mean_act)
    return out


def _expected_shares(m: np.ndarray, known: np.ndarray, strata: np.ndarray, base: np.ndarray) -> np.ndarray:
    """(N, G) group shares each image's labels explain: its label set's shares, shrunk (weight
    PRIOR) towards the mean of its single labels' shares; the base rates without labels."""
    from saefe.labels.probes import label_strata

    s_known = strata & known[:, None]
    s_n = s_known.sum(axis=0)
    l_dist = (s_known.T.astype(np.float64) @ m) / np.maximum(s_n, 1)[:, None]
    n_lab = s_known.sum(axis=1)
    per_label = np.where(n_lab[:, None] > 0, (s_known.astype(np.float64) @ l_dist) / np.maximum(n_lab, 1)[:, None],
                         base[None, :])
    sid, n_sets = label_strata(strata, len(m))
    set_n = np.bincount(sid[known], minlength=n_sets).astype(np.float64)
    set_sum = np.zeros((n_sets, m.shape[1]))
    np.add.at(set_sum, sid[known], m[known])
    n_i = set_n[sid][:, None]
    shrunk = (set_sum[sid] + PRIOR * per_label) / (n_i + PRIOR)
    return np.where(n_lab[:, None] > 0, shrunk, base[None, :])


# -- persistence ----------------------------------------------------------------------------------


def save_associations(assoc: dict[str, FeatureAssociation], out: str | os.PathLike) -> Path:
    out = Path(out)
    if not assoc:
        raise SaefeError("no attribute to save associations for")
    h = len(next(iter(assoc.values())).support)
    cols: dict[str, np.ndarray] = {"feature": np.arange(h, dtype=np.int64)}
    for a, fa in assoc.items():
        cols[f"support:{a}"] = fa.support
        for j, g in enumerate(fa.groups):
            cols[f"share:{a}:{g}"] = fa.share[:, j].astype(np.float32)
            cols[f"expected:{a}:{g}"] = fa.expected[:, j].astype(np.float32)
            cols[f"mean_act:{a}:{g}"] = fa.mean_act[:, j].astype(np.float32)
    tmp = out / (FEATURE_BIAS + ".tmp")
    pd.DataFrame(cols).to_parquet(tmp, index=False)
    os.replace(tmp, out / FEATURE_BIAS)
    return out / FEATURE_BIAS


def load_associations(dir: str | os.PathLike) -> dict[str, FeatureAssociation] | None:
    p = Path(dir) / FEATURE_BIAS
    if not p.exists():
        return None
    df = pd.read_parquet(p)
    out = {}
    for col in df.columns:
        if not col.startswith("support:"):
            continue
        a = col.split(":", 1)[1]
        gs = [c.split(":", 2)[2] for c in df.columns if c.startswith(f"share:{a}:")]
        stack = lambda kind: np.stack([df[f"{kind}:{a}:{g}"].to_numpy(np.float64) for g in gs], axis=1)  # noqa: E731
        out[a] = FeatureAssociation(a, gs, df[col].to_numpy(np.int64), stack("share"), stack("expected"),
                                    stack("mean_act"))
    return out or None


def engine_associations(engine) -> dict[str, FeatureAssociation]:
    """The associations stored beside the engine's profiles, else measured on its labelled index;
    {} when neither exists (nothing labelled to measure them on). Kept on the engine either way,
    so an index without them does not re-encode its corpus on every query that asks."""
    if getattr(engine, "_associations", None) is not None:
        return engine._associations
    assoc = None
    if engine.profiles is not None and engine.profiles.dir is not None:
        assoc = load_associations(engine.profiles.dir)
        if assoc is not None and len(next(iter(assoc.values())).support) != engine.require_sae().config.d_hidden:
            assoc = None
    if assoc is None and engine.attributes is not None:
        from saefe.labels.profiles import load_or_compute_codes

        codes = load_or_compute_codes(engine.store, engine.require_sae(), engine.sae_dir)
        assoc = measure_associations(codes, engine.attributes) or None
    engine._associations = assoc or {}
    return engine._associations


# -- the audit report -----------------------------------------------------------------------------


@dataclass
class AuditRow:
    feature: int
    weight: float  # the label's mean activation (its slider value)
    support: int | None  # labelled images where it fires (None: no labelled images)
    shares: dict[str, float]
    expected: dict[str, float]
    excess: float | None  # signed excess of the leaning group, corpus-wide (None: not measured)
    lean: str | None
    gap: float | None  # Cohen's d towards the over-represented group among the label's nearest images
    flagged_corpus: bool  # |excess| >= threshold
    flagged_here: bool  # gap >= gap threshold
    flagged: bool  # either: what ablate takes weight from
    examples: list[str] = field(default_factory=list)


@dataclass
class AuditReport:
    label: str
    attribute: str
    groups: list[str]
    threshold: float
    rows: list[AuditRow]
    label_shares: dict[str, float]  # the label's images
    corpus_shares: dict[str, float]
    gap_threshold: float = 0.5
    gap_group: str | None = None  # the group most over its corpus share in the label's top 100
    neighbourhood: int = 0  # the label's nearest images the gaps were measured on

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _local_gaps(engine, label: str, ag, feats: list[int], per_group: int) -> tuple[np.ndarray, str, int]:
    """(F,) each feature's Cohen's d among the label query's nearest images, towards the group most
    over its corpus share in the label's top 100 (what ``ablate`` measures on a search)."""
    from saefe.search import debias_local as loc
    from saefe.search.debias import ranked_ids
    from saefe.search.engine import Term

    q = engine.direction(engine.mix(Term("label", label)))
    ranked = ranked_ids(engine, q, "direction", min(10_000, max(1, int(engine.n_total))))
    targets = {ag.name: np.nan_to_num(ag.base_rates())}
    nb, gaps = loc.query_gaps(ranked, [ag], targets, 100, per_group, engine.ranker.postings, feats)
    over = loc.over_groups([ag], targets, ranked[:100])[ag.name]
    return gaps.get(ag.name, np.zeros(len(feats))), ag.groups[over], len(nb.ids)


def audit_label(engine, label: str, attribute: str, top: int = 10, threshold: float = DEFAULT_THRESHOLD,
                examples: int = 5, gap_threshold: float | None = None) -> AuditReport:
    """The label's ``top`` features (largest mean activation), and any other feature of its mix
    that carries its bias, with their tie to ``attribute``: corpus-wide (excess share, from
    labelled images) and among the label's own nearest images (Cohen's d, labels or estimates)."""
    from saefe.search.debias_local import DEFAULT_GAP_THRESHOLD, DEFAULT_PER_GROUP

    gthr = DEFAULT_GAP_THRESHOLD if gap_threshold is None else float(gap_threshold)
    profiles = engine.require_profiles()
    label = profiles.labels[profiles.label_index(label)]
    assoc = engine_associations(engine)
    key = attribute.strip().lower()
    fa = next((v for a, v in assoc.items() if a.lower() == key or key in (g.lower() for g in v.groups)), None)
    dem = engine.demographics
    ag = next((v for a, v in dem.attributes.items() if a.lower() == key or key in (g.lower() for g in v.groups)), None)
    if fa is None and ag is None:
        raise SaefeError(f"cannot audit {attribute!r}: no labels, estimates or labelled feature measures for it "
                         f"(available: {dem.describe_available()})")
    groups = fa.groups if fa is not None else ag.groups
    mean = profiles.mean_of(label).astype(np.float64)
    mixed = [int(j) for j in np.argsort(-mean, kind="stable") if mean[j] > 0]
    gaps, over, n_nb = (_local_gaps(engine, label, ag, mixed, DEFAULT_PER_GROUP) if ag is not None and mixed
                        else (None, None, 0))
    here = {j: float(g) for j, g in zip(mixed, gaps)} if gaps is not None else {}
    feats = mixed[:top] + [j for j in mixed[top:] if here.get(j, 0.0) >= gthr][:top]
    rows = []
    for j in feats:
        strip: list[str] = []
        if examples > 0 and engine.index is not None:
            rep = engine.inspect_feature(j, k=examples)
            strip = [str(r.metadata.get("image_path") or r.metadata.get("path") or r.id) for r in rep.top]
        exc = g = None
        if fa is not None:
            g = int(np.argmax(fa.excess[j]))  # the group it leans towards (its excess is >= 0)
            exc = float(fa.excess[j, g])
        f_corpus = exc is not None and abs(exc) >= threshold
        f_here = here.get(j, 0.0) >= gthr
        rows.append(AuditRow(j, float(mean[j]), int(fa.support[j]) if fa is not None else None,
                             {gr: float(fa.share[j, i]) for i, gr in enumerate(fa.groups)} if fa is not None else {},
                             {gr: float(fa.expected[j, i]) for i, gr in enumerate(fa.groups)} if fa is not None else {},
                             exc, fa.groups[g] if g is not None else None, here.get(j), f_corpus, f_here,
                             f_corpus or f_here, strip))
    label_sh, corpus_sh = {}, {}
    if ag is not None and engine.attributes is not None and label in engine.attributes.columns:
        rows_l = engine.attributes[label].to_numpy().astype(bool)
        sub = ag.member[rows_l].sum(axis=0)
        label_sh = {g: float(v / max(sub.sum(), 1e-9)) for g, v in zip(ag.groups, sub)}
    if ag is not None:
        corpus_sh = {g: float(v) for g, v in zip(ag.groups, ag.base_rates())}
    return AuditReport(label, fa.attribute if fa is not None else ag.name, groups, float(threshold), rows, label_sh,
                       corpus_sh, gthr, over, n_nb)


def format_audit(rep: AuditReport) -> str:
    head = f"{'feature':>8} {'weight':>7} {'fires':>6} " + " ".join(f"{g[:10]:>10}" for g in rep.groups) + \
        f"  {'excess':<14} {'gap here':>8} {'bias':<6} examples"
    lines = [f"audit of {rep.label!r} for {rep.attribute}: its top features; share of each group among the labelled "
             "images where the feature fires (what the images' labels explain in brackets), and the feature's gap "
             f"towards {rep.gap_group or '-'} among the label's {rep.neighbourhood} nearest images"]
    if rep.label_shares or rep.corpus_shares:
        lines.append(f"{rep.label} images: " + (", ".join(f"{g} {s:.0%}" for g, s in rep.label_shares.items()) or "-")
                     + "; corpus: " + ", ".join(f"{g} {s:.0%}" for g, s in rep.corpus_shares.items()))
    lines += [head, "-" * len(head)]
    for r in rep.rows:
        shares = " ".join((f"{r.shares[g]:.0%} ({r.expected[g]:.0%})" if r.shares else "-").rjust(10) for g in rep.groups)
        ex = f"{r.excess:+.2f} {r.lean}" if r.excess is not None else "-"
        gap = f"{r.gap:+.2f}" if r.gap is not None else "-"
        bias = "+".join(w for w, on in (("corp", r.flagged_corpus), ("here", r.flagged_here)) if on)
        strip = " ".join(os.path.basename(p) for p in r.examples[:4])
        fires = str(r.support) if r.support is not None else "-"
        lines.append(f"{'f' + str(r.feature):>8} {r.weight:>7.3f} {fires:>6} {shares}  {ex:<14} {gap:>8} {bias:<6} {strip}")
    n = sum(r.flagged for r in rep.rows)
    lines.append(f"{n} of {len(rep.rows)} carry the bias: corp = |excess| >= {rep.threshold:.2f} (group share beyond "
                 f"what the images' labels explain, shrunk for rarely firing features); here = gap >= "
                 f"{rep.gap_threshold:.2f} (Cohen's d). `--debias ablate` takes weight from them")
    return "\n".join(lines)


def fit_bias_models(store, sae, sae_dir, labels: pd.DataFrame, out: str | os.PathLike, codes=None) -> tuple[Any, dict]:
    """What ``saefe labels`` adds for bias work, saved beside the profiles in ``out``: demographic
    probes (for estimates and ``project``) and feature associations (for the audit and ``ablate``).
    Either is skipped, with a log line, when the labels lack the groups it needs."""
    from saefe.labels.probes import fit_store_probes
    from saefe.labels.profiles import load_or_compute_codes

    probes = assoc = None
    try:
        probes = fit_store_probes(store, labels, source={"index": str(store.dir)})
        probes.save(out)
    except SaefeError as e:
        log.warning("no demographic probes: %s", e)
    if codes is None:
        codes = load_or_compute_codes(store, sae, sae_dir)
    assoc = measure_associations(codes, labels)
    if assoc:
        save_associations(assoc, out)
    return probes, assoc
