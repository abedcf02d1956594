"""Bias attenuation for searches: ``--debias METHOD[+METHOD] --protect ATTR[,ATTR] [--target T]``.

Methods, applied in this order whatever order they are written in (mix -> query -> list):

* ``ablate``: in every SAE feature mix of the query (labels, expressions, feature sliders), zero
  the features tied to a protected attribute (:mod:`saefe.analysis.audit`: a group's share among
  the labelled images where the feature fires, beyond what their other labels explain), then
  rescale the mix to its former L2 norm.
* ``project``: remove the attribute's directions (stratified group-mean offsets from the probes,
  :mod:`saefe.labels.probes`) from the query vector: q(l) = q - l * U U^T q, renormalised.
  Calibrated: l is the smallest value in [0, 4] whose top-k meets the target shares within the
  tolerance (found on a grid, then by bisection), so a query whose results are already fair does
  not move at all, l = 1 is the plain projection (the query then has no component along the
  directions) and l > 1 leans the other way, BendVLM-style equalisation. Without per-image groups
  (or when ``rerank`` follows) l = 1.
* ``rerank``: fetch a deeper candidate list (``pool``, 10k by default), then fair re-ranking
  (:mod:`saefe.search.fair_rank`) to the target proportions, each group in relevance order.

Targets: ``corpus`` (the index's base rates, the default), ``parity`` (equal shares) or explicit
shares ``Male=0.5,Female=0.5`` (groups not named share the rest in corpus proportions). Groups are
true labels where an image has them and probe estimates elsewhere (``engine.demographics``); the
response says which. The seed's label arithmetic is untouched: these only act when asked for.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from saefe.errors import SaefeError, SteeringError

METHODS = ("ablate", "project", "rerank")
DEFAULT_POOL = 10_000
DEFAULT_TOLERANCE = 0.05
LAMBDA_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
BISECT_STEPS = 6


@dataclass(frozen=True)
class DebiasConfig:
    methods: tuple[str, ...]
    protect: tuple[str, ...]
    target: str = "corpus"
    pool: int = DEFAULT_POOL
    threshold: float | None = None  # ablate: |excess| that flags a feature (None: audit's default)
    calibrate: bool = True  # project: smallest projection meeting the target
    tolerance: float = DEFAULT_TOLERANCE

    @classmethod
    def parse(cls, method: str | Sequence[str], protect: str | Sequence[str] | None, target: str | None = "corpus",
              **kw) -> "DebiasConfig | None":
        """From CLI/UI strings; None when the method is empty or 'none'."""
        methods = parse_methods(method)
        if not methods:
            return None
        prot = parse_protect(protect)
        if not prot:
            raise SaefeError(f"--debias {'+'.join(methods)} needs --protect ATTR[,ATTR] (e.g. gender)")
        parse_target(target or "corpus")
        pool = int(kw.pop("pool", DEFAULT_POOL) or DEFAULT_POOL)
        if pool < 1:
            raise SaefeError(f"the candidate pool must be at least 1, got {pool}")
        return cls(methods, prot, (target or "corpus").strip(), pool, **kw)


def parse_methods(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """'ablate+rerank' (or a list) -> ('ablate', 'rerank') in application order; '', 'none' -> ()."""
    if spec is None:
        return ()
    parts = spec.replace(",", "+").split("+") if isinstance(spec, str) else list(spec)
    names = [str(p).strip().lower() for p in parts if str(p).strip()]
    if names in ([], ["none"]):
        return ()
    bad = [n for n in names if n not in METHODS]
    if bad:
        raise SaefeError(f"unknown debias method {bad[0]!r}; use {', '.join(METHODS)} or a combination like ablate+rerank")
    return tuple(m for m in METHODS if m in names)


def parse_protect(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    if spec is None:
        return ()
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    return tuple(dict.fromkeys(str(p).strip() for p in parts if str(p).strip()))


def parse_target(spec: str) -> str | dict[str, float]:
    """'corpus' | 'parity' | {group: share} from 'Male=0.5,Female=0.5'."""
    s = str(spec).strip()
    if s.lower() in ("corpus", "parity", ""):
        return s.lower() or "corpus"
    out: dict[str, float] = {}
    for part in s.split(","):
        g, eq, v = part.partition("=")
        try:
            share = float(v)
        except ValueError:
            share = float("nan")
        if not eq or not g.strip() or not 0.0 <= share <= 1.0:
            raise SaefeError(f"bad --target {spec!r}: use corpus, parity or GROUP=SHARE pairs like Male=0.5,Female=0.5")
        out[g.strip()] = share
    return out


def resolve_targets(spec: str, attrs) -> dict[str, np.ndarray]:
    """attribute -> (G,) target shares for the protected ``attrs`` (AttributeGroups)."""
    t = parse_target(spec)
    out: dict[str, np.ndarray] = {}
    named = dict(t) if isinstance(t, dict) else {}
    for ag in attrs:
        base = np.nan_to_num(ag.base_rates())
        if t == "parity":
            out[ag.name] = np.full(len(ag.groups), 1.0 / len(ag.groups))
            continue
        lower = {g.lower(): i for i, g in enumerate(ag.groups)}
        mine = {lower[g.lower()]: v for g, v in named.items() if g.lower() in lower}
        for g in [g for g in named if g.lower() in lower]:
            named.pop(g)
        if not mine:
            out[ag.name] = base
            continue
        given = sum(mine.values())
        if given > 1.0 + 1e-6:
            raise SaefeError(f"--target shares for {ag.name} add up to {given:g}; they must not exceed 1")
        rest = [i for i in range(len(ag.groups)) if i not in mine]
        shares = np.zeros(len(ag.groups))
        for i, v in mine.items():
            shares[i] = v
        if rest:
            w = base[rest] if base[rest].sum() > 0 else np.ones(len(rest))
            shares[rest] = (1.0 - given) * w / w.sum()
        elif abs(given - 1.0) > 1e-6:
            raise SaefeError(f"--target shares for {ag.name} add up to {given:g}; they must add up to 1")
        out[ag.name] = shares
    if named:
        groups = ", ".join(g for ag in attrs for g in ag.groups)
        raise SaefeError(f"--target names {', '.join(map(repr, named))}, not a group of the protected attributes ({groups})")
    return out


@dataclass
class DebiasInfo:
    """What a debiased search did; the ``debias`` member of a response."""

    methods: list[str]
    protect: list[str]
    target: str
    targets: dict[str, dict[str, float]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # attribute -> labels | estimates | labels+estimates
    estimated: dict[str, bool] = field(default_factory=dict)
    ablated: list[int] = field(default_factory=list)
    projection: dict[str, Any] = field(default_factory=dict)
    rerank: dict[str, Any] = field(default_factory=dict)
    met: bool | None = None  # the target shares were reached (None: no method aims at them)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DebiasedResults(list):
    """A result list that also carries its :class:`DebiasInfo` (``.info``)."""

    info: DebiasInfo


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


def shares_of(ag, ids: np.ndarray) -> np.ndarray:
    """(G,) group shares among ``ids`` (estimates corrected for the probe's errors)."""
    return ag.shares(ids)


def deviation(attrs, targets: dict[str, np.ndarray], ids: np.ndarray) -> float:
    """Largest |share - target| over the protected attributes' groups (inf when unknown)."""
    worst = 0.0
    for ag in attrs:
        s = shares_of(ag, ids)
        if np.isnan(s).any():
            return float("inf")
        worst = max(worst, float(np.abs(s - targets[ag.name]).max()))
    return worst


# -- the methods --------------------------------------------------------------------------------


def ablate_mix(mix, flagged: np.ndarray):
    """A copy of ``mix`` without the flagged features, rescaled to the original L2 norm."""
    from saefe.search.mix import FeatureMix

    keep = {f: w for f, w in mix.items() if not flagged[int(f)] and w != 0.0}
    if not keep:
        raise SteeringError("every feature of the mix is tied to the protected attribute; nothing is left after ablation")
    out = FeatureMix(keep, d_hidden=mix.d_hidden, clip=None)
    scale = mix.norm() / max(out.norm(), 1e-12)
    return FeatureMix({f: w * scale for f, w in keep.items()}, d_hidden=mix.d_hidden, clip=None)


def flagged_features(engine, attrs, threshold: float | None) -> np.ndarray:
    from saefe.analysis.audit import DEFAULT_THRESHOLD, engine_associations

    assoc = engine_associations(engine)
    thr = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    out = np.zeros(engine.require_sae().config.d_hidden, bool)
    for ag in attrs:
        if ag.name not in assoc:
            raise SaefeError(f"ablate needs {ag.name}'s association with the SAE features, measured from labelled "
                             f"images (available: {', '.join(assoc) or 'none'})")
        out |= assoc[ag.name].flagged(thr)
    return out


def attribute_directions(engine, attrs) -> np.ndarray:
    """(r, d_emb) orthonormal directions of the protected attributes: from the probes beside the
    profiles, else measured now on the index's labelled images."""
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


def project(q: np.ndarray, u: np.ndarray, lam: float) -> np.ndarray:
    """q - lam * U U^T q, L2-normalised (q unchanged when lam is 0)."""
    q = np.asarray(q, dtype=np.float64)
    v = q - lam * (u.T @ (u @ q))
    n = float(np.linalg.norm(v))
    if n < 1e-5 * max(float(np.linalg.norm(q)), 1e-12):
        raise SteeringError("the query lies entirely along the protected attribute's directions; nothing is left to search")
    return (v / n).astype(np.float32)


def calibrate_projection(search_ids, q: np.ndarray, u: np.ndarray, attrs, targets, tol: float) -> tuple[float, float]:
    """(lambda, deviation): the smallest lambda in [0, max grid] whose top-k meets the targets within
    ``tol``; the lambda with the smallest deviation when none does. ``search_ids(vec)`` -> ids.

    The group most over its target at lambda = 0 drives the search: the grid finds where its share
    first comes down to within tol of the target, bisection then narrows that step."""
    devs: dict[float, float] = {}
    over: dict[float, float] = {}
    worst: tuple[str, int] | None = None

    def ev(lam: float) -> None:
        nonlocal worst
        if lam in devs:
            return
        ids = search_ids(project(q, u, lam))
        devs[lam] = deviation(attrs, targets, ids)
        excess = {(ag.name, g): float(s - targets[ag.name][g]) for ag in attrs
                  for g, s in enumerate(np.nan_to_num(shares_of(ag, ids), nan=0.0))}
        if worst is None:
            worst = max(excess, key=excess.get)
        over[lam] = excess[worst]

    def crossed(lam: float) -> bool:
        ev(lam)
        return devs[lam] <= tol or over[lam] <= tol

    ev(0.0)
    if devs[0.0] <= tol:
        return 0.0, devs[0.0]
    prev = 0.0
    for lam in LAMBDA_GRID[1:]:
        if crossed(lam):
            lo, hi = prev, lam
            for _ in range(BISECT_STEPS):
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if crossed(mid) else (mid, hi)
            if devs[hi] <= tol:
                return hi, devs[hi]
            break
        prev = lam
    best = min(devs, key=lambda lam: (devs[lam], lam))
    return best, devs[best]


# -- the search ---------------------------------------------------------------------------------


def debiased_search(engine, terms, k: int, mode: str, cfg: DebiasConfig) -> DebiasedResults:
    """``engine.search`` with ``cfg`` applied; see the module docstring."""
    from saefe.search.engine import MIX_KINDS, TERM_KINDS, _check_k, _unit
    from saefe.search.mix import check_weight

    t0 = time.perf_counter()
    k = _check_k(k)
    attrs, targets, info = start(engine, cfg)
    if "project" in cfg.methods and mode != "direction":
        raise SaefeError("project acts on the query vector; use --mode direction (or ablate/rerank in features mode)")
    if not terms:
        raise SteeringError("empty query: give a label, expression, features, text or image")
    flagged = flagged_features(engine, attrs, cfg.threshold) if "ablate" in cfg.methods else None
    mixes = []
    for t in terms:
        if t.kind not in TERM_KINDS:
            raise SaefeError(f"unknown term type {t.kind!r}; use one of {', '.join(TERM_KINDS)}")
        w = check_weight(t.weight, f"{t.kind} term")
        mix = engine.mix(t) if t.kind in MIX_KINDS else None
        if mix is not None and flagged is not None:
            before = {int(f) for f, x in mix.items() if x != 0.0}
            mix = ablate_mix(mix, flagged)
            info.ablated = sorted(set(info.ablated) | (before - {int(f) for f in mix}))
        elif flagged is not None:
            info.notes.append(f"ablate leaves the {t.kind} term as it is (it has no SAE features)")
        mixes.append((t, w, mix))
    if mode == "direction":
        acc = np.zeros(engine.dim, np.float64)
        for t, w, mix in mixes:
            acc += w * (engine.direction(mix) if mix is not None else engine.term_vector(t))
        return vector_search(engine, _unit(acc, "the combined query"), k, cfg, attrs, targets, info, t0)
    all_ids, all_ws = [], []
    for t, w, mix in mixes:
        if mix is None:
            raise SaefeError(f"feature mode ranks by SAE features; a {t.kind} term needs --mode direction")
        ids, ws = mix.as_arrays()
        all_ids.append(ids)
        all_ws.append(ws.astype(np.float64) * w)
    ids, inv = np.unique(np.concatenate(all_ids), return_inverse=True)
    ws = np.bincount(inv, weights=np.concatenate(all_ws), minlength=len(ids))
    if not (ws != 0).any():
        raise SteeringError("all sliders are zero")
    cands = engine._rank_arrays(ids[ws != 0], ws[ws != 0], _fetch(engine, k, cfg))
    return _finish(engine, cands, k, cfg, attrs, targets, info, t0)


def start(engine, cfg: DebiasConfig) -> tuple[list, dict[str, np.ndarray], DebiasInfo]:
    """(protected attributes, their target shares, a fresh DebiasInfo); the one-line errors for
    attributes with neither labels nor probes, and for bad targets, come from here."""
    attrs = engine.demographics.require(cfg.protect)
    targets = resolve_targets(cfg.target, attrs)
    info = DebiasInfo(list(cfg.methods), [a.name for a in attrs], cfg.target,
                      {a.name: {g: float(s) for g, s in zip(a.groups, targets[a.name])} for a in attrs},
                      {a.name: a.source for a in attrs}, {a.name: a.any_estimated for a in attrs})
    return attrs, targets, info


def _fetch(engine, k: int, cfg: DebiasConfig) -> int:
    return min(max(cfg.pool, k), max(1, int(engine.n_total))) if "rerank" in cfg.methods else k


def vector_search(engine, q: np.ndarray, k: int, cfg: DebiasConfig, attrs=None, targets=None,
                  info: DebiasInfo | None = None, t0: float | None = None) -> DebiasedResults:
    """Search a query vector with ``project`` and/or ``rerank`` of ``cfg`` (ablate acts on mixes
    before the vector is made; see debiased_search)."""
    t0 = time.perf_counter() if t0 is None else t0
    if attrs is None:
        attrs, targets, info = start(engine, cfg)
    rerank = "rerank" in cfg.methods
    if "project" in cfg.methods:
        u = attribute_directions(engine, attrs)
        lam, dev, calibrated = 1.0, None, cfg.calibrate and not rerank
        if calibrated:
            try:
                lam, dev = calibrate_projection(lambda v: local_ids(engine, engine.search_vector(v, k)),
                                                q, u, attrs, targets, cfg.tolerance)
            except SaefeError as e:  # a remote backend's results that the local index lacks
                if engine.backend is None:
                    raise
                calibrated = False
                info.notes.append(f"projection not calibrated (plain projection): {e}")
        if dev is not None:
            info.met = dev <= cfg.tolerance
            if not info.met:
                info.notes.append(f"projection alone cannot reach the target shares (best: off by {dev:.2f}); "
                                  "add rerank to enforce them")
        q2 = project(q, u, lam)
        info.projection = {"lambda": lam, "directions": int(u.shape[0]), "calibrated": calibrated,
                           "cosine_to_query": float(q2 @ q), "component_removed": float(np.linalg.norm(u @ q))}
        q = q2
    return _finish(engine, engine.search_vector(q, _fetch(engine, k, cfg)), k, cfg, attrs, targets, info, t0)


def _finish(engine, cands, k, cfg, attrs, targets, info, t0) -> DebiasedResults:
    if "rerank" in cfg.methods:
        cands = fair_rerank_results(engine, cands, attrs, targets, k, info)
    out = DebiasedResults(cands[:k])
    info.seconds = time.perf_counter() - t0
    out.info = info
    return out


def ablated_direction(engine, label: str, flagged: np.ndarray) -> np.ndarray:
    """A label's direction after ablation (for the server's predefined embeddings)."""
    from saefe.search.engine import Term

    return engine.direction(ablate_mix(engine.mix(Term("label", label)), flagged))


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
    got = {ag.name: {g: float(s) for g, s in zip(ag.groups, shares_of(ag, ids[fr.order]))} for ag in attrs}
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
