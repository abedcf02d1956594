"""Bias attenuation for searches: ``--debias METHOD[+METHOD] --protect ATTR[,ATTR] [--target T]``.

Methods, applied in this order whatever order they are written in (mix -> query -> list):

* ``ablate``: in every SAE feature mix of the query (labels, expressions, feature sliders), take
  weight away from the features that carry the query's bias, then rescale the mix to its former
  L2 norm. A feature carries it when, among the query's nearest images, it separates the group
  over its target from the rest by half a standard deviation or more in the direction its weight
  pulls (:mod:`saefe.search.debias_local`), or when it is tied to the attribute corpus-wide (the
  audit's excess share, :mod:`saefe.analysis.audit`, where labelled images measured it).
  Calibrated: the share taken away is the least in [0, 1] whose top-k meets the targets (1 =
  the features are gone: plain ablation).
* ``project``: remove the attribute's directions from the query vector: q(l) = q - l * U U^T q,
  renormalised. U holds the groups' mean offsets among the query's nearest images, where the
  query's own bias lives (corpus-wide probe directions for an attribute whose groups are missing
  there). At l = 1 every group has the same mean score over those images (BendVLM's
  equalisation); l > 1 leans the other way. Calibrated: l is the smallest value in [0, 4] whose
  top-k meets the target shares within the tolerance (a grid, then bisection), so a query whose
  results are already fair does not move at all.
  When ``rerank`` follows, neither is calibrated (strength 1; rerank sets the shares); with both,
  project is calibrated after a full ablation.
* ``rerank``: fetch a deeper candidate list (``pool``, 10k by default), then fair re-ranking
  (:mod:`saefe.search.fair_rank`) to the target proportions, each group in relevance order.

Targets: ``corpus`` (the index's base rates, the default), ``parity`` (equal shares) or explicit
shares ``Male=0.5,Female=0.5`` (groups not named share the rest in corpus proportions). Groups are
true labels where an image has them and probe estimates elsewhere (``engine.demographics``); the
response says which. The seed's label arithmetic is untouched: these only act when asked for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from saefe.errors import SaefeError, SteeringError
from saefe.search.debias_config import (  # noqa: F401 (re-exported: the public names of debiasing)
    DEFAULT_POOL, DEFAULT_TOLERANCE, METHODS, DebiasConfig, DebiasedResults, DebiasInfo, parse_methods,
    parse_protect, parse_target, resolve_targets)
from saefe.search.debias_local import deviation  # noqa: F401

LAMBDA_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)  # project: 1 = plain projection, above leans the other way
ABLATE_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)  # ablate: share of the tied features' weight taken away

# -- group lookups ------------------------------------------------------------------------------


def local_ids(engine, results, strict: bool = True) -> np.ndarray:
    """Corpus row ids of ``results``; a remote backend's matches are found by sha256, then path.
    ``strict``: a match not in the local index is an error (its groups would be unknown)."""
    if engine.backend is None:
        return np.array([r.id for r in results], dtype=np.int64)
    md = engine.store.metadata
    by_sha = dict(zip(md["sha256"], range(len(md)))) if "sha256" in md else {}
    by_path = dict(zip(md["path"], range(len(md)))) if "path" in md else {}
    base = engine.store._image_base()
    if base and "path" in md:
        import os

        by_path.update({os.path.normpath(os.path.join(base, p)): i for p, i in list(by_path.items()) if isinstance(p, str)})
    ids = []
    for r in results:
        i = by_sha.get(r.metadata.get("sha256"), by_path.get(r.metadata.get("path")))
        if i is None and strict:
            where = getattr(engine.backend, "url", "the backend")
            raise SaefeError(f"{where} returned {r.metadata.get('path') or r.metadata.get('url')!r}, which is not in the "
                             f"local index {engine.store.dir}, so its demographic group is unknown; debiasing and "
                             "the bias report need a backend serving the same corpus as the local index")
        if i is not None:
            ids.append(i)
    return np.array(ids, dtype=np.int64)


# -- the query: parts that ablate can rewrite -----------------------------------------------------


@dataclass
class Part:
    """One weighted term of a query: a feature mix (labels, expressions, sliders), which ablate can
    rewrite, or a fixed vector (text, image, embedding)."""

    weight: float
    mix: Any = None  # FeatureMix
    vector: np.ndarray | None = None


def ablate_mix(mix, cut: np.ndarray, strength: float = 1.0):
    """A copy of ``mix`` with feature f's weight times (1 - strength * cut[f]) (``cut``: (H,) bool
    or shares in [0, 1]; 1 = the feature is gone), rescaled to the original L2 norm."""
    from saefe.search.mix import FeatureMix

    take = strength * np.asarray(cut, dtype=np.float64)
    keep = {f: w * (1.0 - take[int(f)]) for f, w in mix.items() if w != 0.0 and take[int(f)] < 1.0}
    if not keep:
        raise SteeringError("every feature of the mix is tied to the protected attribute; nothing is left after ablation")
    out = FeatureMix(keep, d_hidden=mix.d_hidden, clip=None)
    scale = mix.norm() / max(out.norm(), 1e-12)
    return FeatureMix({f: w * scale for f, w in keep.items()}, d_hidden=mix.d_hidden, clip=None)


def _query(engine, parts: Sequence[Part], mode: str, cut: np.ndarray | None = None):
    """direction mode: the unit query vector; features mode: (feature ids, weights). ``cut``:
    what ablation takes from each feature (see ablate_mix)."""
    from saefe.search.engine import _unit
    from saefe.search.mix import sum_mixes

    ablating = cut is not None and bool(np.any(cut))
    mixes = [(p, ablate_mix(p.mix, cut) if p.mix is not None and ablating else p.mix) for p in parts]
    if mode == "direction":
        acc = np.zeros(engine.dim, np.float64)
        for p, mix in mixes:
            acc += p.weight * (engine.direction(mix) if mix is not None else p.vector)
        return _unit(acc, "the combined query")
    ids, ws = sum_mixes([(p.weight, mix) for p, mix in mixes if mix is not None])
    if not len(ids):
        raise SteeringError("all sliders are zero")
    return ids, ws


def _ranked(engine, query, mode: str, n: int) -> list:
    return engine.search_vector(query, n) if mode == "direction" else engine._rank_arrays(*query, n)


def ranked_ids(engine, query, mode: str, n: int) -> np.ndarray:
    """Corpus rows of the top ``n`` for a query (a vector, or (feature ids, weights)): what the
    neighbourhood and calibration searches need, without building each result's metadata row
    (~55 ms per 10k on the demo); a remote backend's matches go through :func:`local_ids`."""
    if engine.backend is not None:
        return local_ids(engine, _ranked(engine, query, mode, n))
    if mode == "direction":
        _, ids = engine.index.search(np.asarray(query, np.float32).reshape(1, -1), min(int(n), 10_000))
        ids = ids[0]
    else:
        ids, _ = engine.ranker.rank(*query, min(int(n), 10_000))
    ids = np.asarray(ids, np.int64)
    return ids[ids >= 0]


def _mix_weights(parts: Sequence[Part]) -> tuple[np.ndarray, np.ndarray]:
    """(feature ids, combined weights) over the parts' mixes: which way each feature pulls."""
    from saefe.search.mix import sum_mixes

    return sum_mixes([(p.weight, p.mix) for p in parts if p.mix is not None])


# -- the methods --------------------------------------------------------------------------------


def corpus_flags(engine, attrs, threshold: float | None) -> dict[str, np.ndarray]:
    """attribute -> (H,) features tied to it corpus-wide (the audit's excess share, from labelled
    images); attributes that no labelled images measured are left out."""
    from saefe.analysis.audit import DEFAULT_THRESHOLD, engine_associations

    assoc = engine_associations(engine)
    thr = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    return {ag.name: assoc[ag.name].flagged(thr) for ag in attrs if ag.name in assoc}


def plan_ablation(engine, parts, mode, k, cfg, attrs, targets, info, calibrated: bool) -> np.ndarray:
    """(H,) the share of each feature's weight that ablation takes away: the features of the
    query's mixes that carry its bias for an attribute, in its neighbourhood
    (debias_local.feature_gaps) or corpus-wide (the audit's excess), times that attribute's
    strength (calibrated: the least that meets its target; else 1)."""
    from saefe.search import debias_local as loc

    h = engine.require_sae().config.d_hidden
    feats, wts = _mix_weights(parts)
    if not len(feats):
        info.notes.append("ablate has no SAE feature mix to act on (text, image and embedding terms stay as they are)")
        return np.zeros(h)
    ranked = ranked_ids(engine, _query(engine, parts, mode), mode, _pool(engine, k, cfg))
    nb, gaps = loc.query_gaps(ranked, attrs, targets, k, cfg.per_group, engine.ranker.postings, feats)
    _note_neighbourhood(info, nb, attrs)
    flags = {ag.name: np.zeros(h, bool) for ag in attrs}
    for a, f in corpus_flags(engine, attrs, cfg.threshold).items():
        flags[a] |= f
    for a, tied in loc.tied_features(gaps, wts, cfg.gap_threshold).items():
        flags[a][feats[tied]] = True

    def cut(strengths: dict[str, float]) -> np.ndarray:
        return np.max([strengths[a] * flags[a] for a in flags], axis=0)

    strengths = {a: 1.0 for a in flags}
    if calibrated:
        def search(st: dict[str, float]) -> np.ndarray:
            return ranked_ids(engine, _query(engine, parts, mode, cut(st)), mode, k)

        if any(f[feats].any() for f in flags.values()):
            strengths, dev = loc.calibrate_each(search, attrs, targets, cfg.tolerance, ABLATE_GRID)
        else:  # nothing to take weight from: calibration would search the same query ~6 times and keep 0
            strengths = {a: float(ABLATE_GRID[0]) for a in flags}
            dev = loc.deviation(attrs, targets, search(strengths))
        _note_met(info, dev, cfg, "ablation")
    out = cut(strengths)
    info.ablation = {"strength": max(strengths.values()), "strengths": strengths, "calibrated": calibrated,
                     "neighbourhood": len(nb.ids),
                     "tied": {a: int(f[feats].sum()) for a, f in flags.items()}}
    info.ablated = [int(f) for f in feats[out[feats] > 0]]
    return out


def _note_neighbourhood(info: DebiasInfo, nb, attrs) -> None:
    if not nb.complete:
        few = ", ".join(f"{g} {c:.0f}" for ag in attrs for g, c in nb.counts[ag.name].items())
        info.notes.append(f"the query's {len(nb.ids)} nearest images hold few of some groups ({few}); "
                          "the local measures are rough")


def _note_met(info: DebiasInfo, dev: float, cfg: DebiasConfig, what: str) -> None:
    info.met = dev <= cfg.tolerance
    if not info.met:
        info.notes.append(f"{what} alone cannot reach the target shares (best: off by {dev:.2f}); add rerank to enforce them")


def attribute_directions(engine, attrs) -> np.ndarray:
    """(r, d_emb) orthonormal corpus-wide directions of the protected attributes: from the probes
    beside the profiles, else measured now on the index's labelled images."""
    from saefe.labels.probes import ProbeSet, group_offsets, orthonormal_basis, probes_dir_of

    rows = []
    pdir = probes_dir_of(engine.profiles) if engine.profiles is not None else None
    probes = ProbeSet.load(pdir, encoder_info=engine.info).probes if pdir is not None else {}
    for ag in attrs:
        if ag.name in probes:
            rows.append(probes[ag.name].directions())
            continue
        labels = engine.attributes
        if labels is None:
            raise SaefeError(f"project needs {ag.name}'s directions: fit probes with `saefe labels --annotations`")
        m = ag.member > 0
        one = (m.sum(axis=1) == 1) & ~ag.estimated
        strata_cols = [c for c in labels.columns if c not in {g for a in engine.demographics.groups().values() for g in a}]
        strata = labels[strata_cols].to_numpy().astype(bool)[one] if strata_cols else None
        off, _ = group_offsets(engine.store.vectors_f32()[one], m[one], strata)
        rows.append(orthonormal_basis(off, len(ag.groups) - 1))
    u = np.concatenate(rows, axis=0).astype(np.float64)
    return orthonormal_basis(u, u.shape[0]).astype(np.float64)


def query_directions(engine, q: np.ndarray, k: int, cfg: DebiasConfig, attrs, info: DebiasInfo
                     ) -> tuple[np.ndarray, list[str]]:
    """((r, d_emb) directions, each row's attribute) that ``project`` removes from ``q``: the
    groups' mean offsets among the query's neighbourhood; corpus-wide ones for an attribute whose
    groups are missing there."""
    from saefe.search import debias_local as loc

    ranked = ranked_ids(engine, q, "direction", _pool(engine, k, cfg))
    nb = loc.neighbourhood(ranked, attrs, cfg.per_group)
    _note_neighbourhood(info, nb, attrs)
    x = engine.store.vectors_f32(nb.ids)
    blocks = []
    for ag in attrs:
        if nb.usable(ag.name):
            u, _ = loc.local_directions(x, nb, [ag])
        else:
            info.notes.append(f"project uses corpus-wide directions for {ag.name} (its groups are missing near the query)")
            u = attribute_directions(engine, [ag])
        blocks.append((ag.name, u))
    info.projection["neighbourhood"] = len(nb.ids)
    return loc.stack_blocks(blocks, engine.dim)


def project(q: np.ndarray, u: np.ndarray, lam) -> np.ndarray:
    """q - U diag(lam) U^T q, L2-normalised (``lam``: one strength, or one per row of U; q is
    unchanged where it is 0)."""
    q = np.asarray(q, dtype=np.float64)
    v = q - u.T @ (np.asarray(lam, dtype=np.float64) * (u @ q))
    n = float(np.linalg.norm(v))
    if n < 1e-5 * max(float(np.linalg.norm(q)), 1e-12):
        raise SteeringError("the query lies entirely along the protected attribute's directions; nothing is left to search")
    return (v / n).astype(np.float32)


# -- the search ---------------------------------------------------------------------------------


def debiased_search(engine, terms, k: int, mode: str, cfg: DebiasConfig) -> DebiasedResults:
    """``engine.search`` with ``cfg`` applied; see the module docstring."""
    from saefe.search.engine import _check_k
    from saefe.search.types import MIX_KINDS, TERM_KINDS
    from saefe.search.mix import check_weight

    t0 = time.perf_counter()
    k = _check_k(k)
    attrs, targets, info = start(engine, cfg)
    if "project" in cfg.methods and mode != "direction":
        raise SaefeError("project acts on the query vector; use --mode direction (or ablate/rerank in features mode)")
    if not terms:
        raise SteeringError("empty query: give a label, expression, features, text or image")
    parts = []
    for t in terms:
        if t.kind not in TERM_KINDS:
            raise SaefeError(f"unknown term type {t.kind!r}; use one of {', '.join(TERM_KINDS)}")
        w = check_weight(t.weight, f"{t.kind} term")
        if t.kind in MIX_KINDS:
            parts.append(Part(w, mix=engine.mix(t)))
        elif mode != "direction":
            raise SaefeError(f"feature mode ranks by SAE features; a {t.kind} term needs --mode direction")
        else:
            parts.append(Part(w, vector=engine.term_vector(t)))
    return search_parts(engine, parts, k, mode, cfg, attrs, targets, info, t0)


def search_parts(engine, parts: Sequence[Part], k: int, mode: str, cfg: DebiasConfig, attrs=None, targets=None,
                 info: DebiasInfo | None = None, t0: float | None = None) -> DebiasedResults:
    """The debiased top-k of a query given as parts (the engine's terms, or the search server's
    predefined label embeddings and vectors). Strength is calibrated on the last of ablate /
    project, and on neither when rerank follows (rerank then sets the shares)."""
    t0 = time.perf_counter() if t0 is None else t0
    if attrs is None:
        attrs, targets, info = start(engine, cfg)
    rerank = "rerank" in cfg.methods
    cut = None
    if "ablate" in cfg.methods:
        calibrated = cfg.calibrate and not rerank and "project" not in cfg.methods
        cut = plan_ablation(engine, parts, mode, k, cfg, attrs, targets, info, calibrated)
    query = _query(engine, parts, mode, cut)
    if mode == "direction":
        return vector_search(engine, query, k, cfg, attrs, targets, info, t0)
    return _finish(engine, _ranked(engine, query, mode, _fetch(engine, k, cfg)), k, cfg, attrs, targets, info, t0)


def start(engine, cfg: DebiasConfig) -> tuple[list, dict[str, np.ndarray], DebiasInfo]:
    """(protected attributes, their target shares, a fresh DebiasInfo); the one-line errors for
    attributes with neither labels nor probes, and for bad targets, come from here."""
    attrs = engine.demographics.require(cfg.protect)
    targets = resolve_targets(cfg.target, attrs)
    info = DebiasInfo(list(cfg.methods), [a.name for a in attrs], cfg.target,
                      {a.name: {g: float(s) for g, s in zip(a.groups, targets[a.name])} for a in attrs},
                      {a.name: a.source for a in attrs}, {a.name: a.any_estimated for a in attrs})
    return attrs, targets, info


def _pool(engine, k: int, cfg: DebiasConfig) -> int:
    return min(max(cfg.pool, k), max(1, int(engine.n_total)))


def _fetch(engine, k: int, cfg: DebiasConfig) -> int:
    return _pool(engine, k, cfg) if "rerank" in cfg.methods else k


def vector_search(engine, q: np.ndarray, k: int, cfg: DebiasConfig, attrs=None, targets=None,
                  info: DebiasInfo | None = None, t0: float | None = None) -> DebiasedResults:
    """Search a query vector with ``project`` and/or ``rerank`` of ``cfg`` (ablate acts on mixes
    before the vector is made; see search_parts)."""
    from saefe.search import debias_local as loc

    t0 = time.perf_counter() if t0 is None else t0
    if attrs is None:
        attrs, targets, info = start(engine, cfg)
    rerank = "rerank" in cfg.methods
    if "project" in cfg.methods:
        u, owner = query_directions(engine, q, k, cfg, attrs, info)
        lams, calibrated = {ag.name: 1.0 for ag in attrs}, cfg.calibrate and not rerank

        def per_row(st: dict[str, float]) -> np.ndarray:
            return np.array([st[a] for a in owner], np.float64)

        if calibrated:
            lams, dev = loc.calibrate_each(lambda st: ranked_ids(engine, project(q, u, per_row(st)), "direction", k),
                                           attrs, targets, cfg.tolerance, LAMBDA_GRID)
            _note_met(info, dev, cfg, "projection")
        q2 = project(q, u, per_row(lams))
        info.projection.update({"lambda": max(lams.values()), "lambdas": lams, "directions": int(u.shape[0]),
                                "calibrated": calibrated, "cosine_to_query": float(q2 @ q),
                                "component_removed": float(np.linalg.norm(u @ q))})
        q = q2
    return _finish(engine, engine.search_vector(q, _fetch(engine, k, cfg)), k, cfg, attrs, targets, info, t0)


def _finish(engine, cands, k, cfg, attrs, targets, info, t0) -> DebiasedResults:
    if "rerank" in cfg.methods:
        cands = fair_rerank_results(engine, cands, attrs, targets, k, info)
    out = DebiasedResults(cands[:k])
    info.seconds = time.perf_counter() - t0
    out.info = info
    return out


def fair_rerank_results(engine, cands, attrs, targets: dict[str, np.ndarray], k: int, info: DebiasInfo) -> list:
    """The top-k of ``cands`` re-ranked to the targets over the intersection of ``attrs`` (cells in
    C order; images whose group is unknown form one more bucket kept at its corpus share)."""
    from saefe.search.fair_rank import apportion, fair_rerank, joint_quota

    ids = local_ids(engine, cands)
    sizes = [len(ag.groups) for ag in attrs]
    cell = np.zeros(len(engine.store), np.int64)
    unknown = np.zeros(len(cell), bool)
    for ag, n in zip(attrs, sizes):
        h = ag.hard()
        cell = cell * n + np.maximum(h, 0)
        unknown |= h < 0
    n_cells = int(np.prod(sizes))
    cell[unknown] = n_cells
    if info.target == "corpus":  # the joint corpus distribution; its marginals are the base rates
        joint = np.bincount(cell[~unknown], minlength=n_cells).astype(np.float64)
        joint = joint / joint.sum() if joint.sum() else np.full(n_cells, 1.0 / n_cells)
        marg = [joint.reshape(sizes).sum(axis=tuple(b for b in range(len(sizes)) if b != a)) for a in range(len(sizes))]
    else:
        marg = [targets[ag.name] for ag in attrs]
        joint = np.ones(1)
        for m in marg:
            joint = np.outer(joint, m).ravel()
    unk = float(unknown.mean())
    k_eff = min(k, len(ids))
    k_known, k_unk = apportion(np.array([1.0 - unk, unk]), k_eff)
    wanted = np.concatenate([joint_quota(marg, joint, int(k_known)), [k_unk]])
    shares = np.concatenate([joint * (1.0 - unk), [unk]])
    fr = fair_rerank(cell[ids], shares, k_eff, wanted=wanted)
    picked = [cands[int(i)] for i in fr.order]
    got = {ag.name: {g: float(s) for g, s in zip(ag.groups, ag.shares(ids[fr.order]))} for ag in attrs}
    info.rerank = {"pool": len(cands), "met": fr.met, "shares": got}
    info.met = fr.met if info.met is None else (info.met and fr.met)
    if not fr.met:
        names = _joint_names(attrs)
        short = ", ".join(f"{names[g]}: {int(fr.available[g])} in the pool, {int(fr.wanted[g])} wanted"
                          for g in fr.short)
        info.notes.append(f"target not reachable from the {len(cands)} candidates ({short}); best effort")
    return picked


def _joint_names(attrs) -> list[str]:
    names = [""]
    for ag in attrs:
        names = [f"{a}/{g}" if a else g for a in names for g in ag.groups]
    return names + ["unknown"]
