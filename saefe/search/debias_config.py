"""The settings and the report of a debiased search: ``DebiasConfig`` (what the user asked for:
methods, protected attributes, target shares) and ``DebiasInfo`` (what was done, returned as the
response's ``debias`` member). Parsing lives here so the CLI, the app and the search server give
the same one-line errors."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from saefe.errors import SaefeError
from saefe.search.debias_local import DEFAULT_GAP_THRESHOLD, DEFAULT_PER_GROUP

METHODS = ("ablate", "project", "rerank")
DEFAULT_POOL = 10_000
DEFAULT_TOLERANCE = 0.05


@dataclass(frozen=True)
class DebiasConfig:
    methods: tuple[str, ...]
    protect: tuple[str, ...]
    target: str = "corpus"
    pool: int = DEFAULT_POOL
    threshold: float | None = None  # ablate: |excess| that flags a feature (None: audit's default)
    calibrate: bool = True  # ablate/project: the least strength meeting the target
    tolerance: float = DEFAULT_TOLERANCE
    per_group: int = DEFAULT_PER_GROUP  # images of each group in the query's neighbourhood
    gap_threshold: float = DEFAULT_GAP_THRESHOLD  # ablate: Cohen's d that ties a feature to the query's bias

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
    ablation: dict[str, Any] = field(default_factory=dict)
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


