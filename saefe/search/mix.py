"""Feature mixes: the seed's sliders, label operations and a tiny expression language.

A :class:`FeatureMix` maps feature id -> slider weight in [-1, 1]. Operations (seed semantics):

* ``apply_label(profiles, label, features)``: every slider in ``features`` := label mean, clipped.
* ``add_label`` / ``subtract_label(profiles, label, m, features)``: slider +=/-= m * label mean,
  clipped to [-1, 1] after each operation.
* ``set(feature, weight)`` (clipped), ``reset()``, ``l2_normalised()``.

``query_vector(mix, sae)`` = sum_j w_j * decoder column j, L2-normalised.

Expressions (``"Esteem - Male + Adult"``, ``"2*Happiness - 0.3 * Male"``, ``"Esteem + 0.5*f17"``,
``"Doubt/Confusion + #12"``) are read by a small hand-written tokenizer and recursive-descent
parser for this grammar (no parentheses; there is nothing to group)::

    expr  := ['+' | '-'] term (('+' | '-') term)*
    term  := [number ['*']] atom ['*' number]
    atom  := LABEL | FEATURE                 FEATURE = f123 | #123
    number := 12 | 0.5 | .5 | 1e-3

Label names may hold spaces, slashes and hyphens ("Doubt/Confusion", "Valence high"): when the
label list is known the tokenizer takes the longest known label (case-insensitive) at the cursor;
otherwise a name runs up to the next '+', '*', or a '-' that follows a space. Terms are applied
left to right from an empty mix, exactly like pressing the seed's add/subtract buttons: a label
term with coefficient c is ``add_label(label, c)``, a feature term adds c to that slider.

Which features a label term touches (``features=``):

* ``"nonzero"`` (default): every feature with a non-zero mean activation for any label of the
  expression. The resulting query is then the direction of the labels' mean SAE reconstruction
  (minus decoder bias), i.e. what the label looks like in the SAE's terms, with no arbitrary cut.
* ``"top"``: the union of each label's top-``top_n`` distinct features and the labels' top-``top_n``
  shared features (what the seed UI shows as sliders).
* an iterable of feature ids: exactly those sliders.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np

from saefe.errors import SteeringError

SLIDER_RANGE = (-1.0, 1.0)
MAX_WEIGHT = 1e6
FEATURE_RE = re.compile(r"^(?:[fF]|#)(\d+)$")
NUMBER_RE = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
DEFAULT_TOP_N = 10


def _check_weight(w, what: str) -> float:
    try:
        w = float(w)
    except (TypeError, ValueError):
        raise SteeringError(f"{what} must be a number, got {w!r}") from None
    if not math.isfinite(w):
        raise SteeringError(f"{what} is {w}; weights must be finite")
    if abs(w) > MAX_WEIGHT:
        raise SteeringError(f"{what} is {w:g}; weights must be within +-{MAX_WEIGHT:g}")
    return w


check_weight = _check_weight  # the one weight check, shared with the engine


class FeatureMix(Mapping[int, float]):
    """Slider weights over SAE features. ``clip`` = the slider range (None: no clipping)."""

    def __init__(
        self, weights: Mapping[int, float] | None = None, d_hidden: int | None = None,
        clip: tuple[float, float] | None = SLIDER_RANGE,
    ):
        self.d_hidden = d_hidden
        self.clip = clip
        self._w: dict[int, float] = {}
        for f, w in (weights or {}).items():
            self.set(f, w)

    # -- mapping -----------------------------------------------------------------------------
    def __getitem__(self, f: int) -> float:
        return self._w[int(f)]

    def __iter__(self) -> Iterator[int]:
        return iter(self._w)

    def __len__(self) -> int:
        return len(self._w)

    def __repr__(self) -> str:
        items = ", ".join(f"f{f}: {w:.3g}" for f, w in list(self._w.items())[:8])
        more = ", ..." if len(self._w) > 8 else ""
        return f"FeatureMix({{{items}{more}}})"

    def get(self, f, default=0.0):  # noqa: D401 - Mapping.get with default 0
        return self._w.get(int(f), default)

    # -- operations ----------------------------------------------------------------------------
    def _feature(self, f) -> int:
        if isinstance(f, (bool, np.bool_)) or not isinstance(f, (int, np.integer)):
            if isinstance(f, str) and FEATURE_RE.match(f.strip()):
                f = int(FEATURE_RE.match(f.strip()).group(1))
            else:
                try:
                    if float(f) != int(f):
                        raise ValueError
                    f = int(f)
                except (TypeError, ValueError):
                    raise SteeringError(f"feature id must be an integer, got {f!r}") from None
        f = int(f)
        if f < 0 or (self.d_hidden is not None and f >= self.d_hidden):
            hi = self.d_hidden if self.d_hidden is not None else "d_hidden"
            raise SteeringError(f"feature id {f} is out of range [0, {hi})")
        return f

    def _clip(self, w: float) -> float:
        return float(min(max(w, self.clip[0]), self.clip[1])) if self.clip else float(w)

    def _clip_array(self, w: np.ndarray) -> np.ndarray:
        return np.clip(w, self.clip[0], self.clip[1]) if self.clip else w

    def set(self, feature, weight) -> "FeatureMix":
        """Manual slider: weight clipped to the slider range."""
        f = self._feature(feature)
        self._w[f] = self._clip(_check_weight(weight, f"weight of feature {f}"))
        return self

    def add(self, feature, delta) -> "FeatureMix":
        f = self._feature(feature)
        self._w[f] = self._clip(self._w.get(f, 0.0) + _check_weight(delta, f"weight of feature {f}"))
        return self

    def reset(self) -> "FeatureMix":
        self._w.clear()
        return self

    def _label_features(self, profiles, labels: Sequence[str], features, top_n: int) -> np.ndarray:
        if self.d_hidden is None:
            self.d_hidden = profiles.d_hidden
        elif self.d_hidden != profiles.d_hidden:
            raise SteeringError(f"the mix has d_hidden {self.d_hidden} but the label profiles have {profiles.d_hidden}")
        return resolve_features(profiles, labels, features, top_n)

    def apply_label(self, profiles, label: str, features="nonzero", top_n: int = DEFAULT_TOP_N) -> "FeatureMix":
        """Seed "apply to all sliders": each slider in ``features`` := clip(label mean)."""
        mean = profiles.mean_of(label)
        ids = self._label_features(profiles, [label], features, top_n)
        self._w.update(zip(ids.tolist(), self._clip_array(mean[ids].astype(np.float64)).tolist()))
        return self

    def add_label(
        self, profiles, label: str, multiplier: float = 1.0, features="nonzero", top_n: int = DEFAULT_TOP_N
    ) -> "FeatureMix":
        """Seed add-label: slider += multiplier * label mean, clipped."""
        m = _check_weight(multiplier, f"multiplier of {label!r}")
        mean = profiles.mean_of(label)
        ids = self._label_features(profiles, [label], features, top_n)
        keys = ids.tolist()
        get = self._w.get
        cur = np.fromiter((get(f, 0.0) for f in keys), dtype=np.float64, count=len(keys))
        new = self._clip_array(cur + m * mean[ids].astype(np.float64))
        self._w.update(zip(keys, new.tolist()))
        return self

    def subtract_label(
        self, profiles, label: str, multiplier: float = 1.0, features="nonzero", top_n: int = DEFAULT_TOP_N
    ) -> "FeatureMix":
        return self.add_label(profiles, label, -_check_weight(multiplier, f"multiplier of {label!r}"), features, top_n)

    # -- views -------------------------------------------------------------------------------
    def as_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 ascending, weights float32) of the non-zero sliders: feature-space scores of
        an image are codes[:, ids] @ weights."""
        ids = np.fromiter(self._w.keys(), dtype=np.int64, count=len(self._w))
        ws = np.fromiter(self._w.values(), dtype=np.float64, count=len(self._w))
        keep = ws != 0.0
        ids, ws = ids[keep], ws[keep]
        order = np.argsort(ids, kind="stable")
        return ids[order], ws[order].astype(np.float32)

    def is_zero(self) -> bool:
        return not any(w != 0.0 for w in self._w.values())

    def norm(self) -> float:
        return float(math.sqrt(sum(w * w for w in self._w.values())))

    def l2_normalised(self) -> "FeatureMix":
        """A new mix with unit L2 norm over the sliders (SteeringError when all are zero)."""
        n = self.norm()
        if n == 0.0:
            raise SteeringError("all sliders are zero")
        out = FeatureMix(d_hidden=self.d_hidden, clip=self.clip)
        out._w = {f: w / n for f, w in self._w.items()}
        return out

    def to_dict(self) -> dict[int, float]:
        return dict(self._w)

    def copy(self) -> "FeatureMix":
        out = FeatureMix(d_hidden=self.d_hidden, clip=self.clip)
        out._w = dict(self._w)
        return out


def resolve_features(profiles, labels: Sequence[str], features="nonzero", top_n: int = DEFAULT_TOP_N) -> np.ndarray:
    """Feature ids (int64, ascending) that label operations touch; see the module docstring."""
    if isinstance(features, str):
        rows = [profiles.label_index(l) for l in labels]
        if features == "nonzero":
            return np.flatnonzero((profiles.mean[rows] != 0).any(axis=0)).astype(np.int64)
        if features == "top":
            names = [profiles.labels[r] for r in rows]
            ids = set(profiles.shared(names, k=top_n))
            for l in names:
                ids.update(profiles.distinct(l, k=top_n))
            return np.array(sorted(ids), dtype=np.int64)
        raise SteeringError(f"features must be 'nonzero', 'top' or a list of feature ids, got {features!r}")
    if isinstance(features, np.ndarray) and np.issubdtype(features.dtype, np.integer):
        arr = features.astype(np.int64).ravel()
        if len(arr) > 1 and not (arr[1:] > arr[:-1]).all():  # sort + dedupe only when needed
            arr = np.sort(arr)
            arr = arr[np.concatenate([[True], arr[1:] != arr[:-1]])]
    else:
        vals = []
        for f in features:
            try:
                ok = not isinstance(f, (bool, np.bool_)) and float(f).is_integer()
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise SteeringError(f"feature id must be an integer, got {f!r}")
            vals.append(int(f))
        arr = np.unique(np.array(vals, dtype=np.int64))
    bad = arr[(arr < 0) | (arr >= profiles.d_hidden)]
    if len(bad):
        raise SteeringError(f"feature id {int(bad[0])} is out of range [0, {profiles.d_hidden})")
    return arr


def sum_mixes(weighted: Sequence[tuple[float, FeatureMix]]) -> tuple[np.ndarray, np.ndarray]:
    """(feature ids, summed weights) of sum_t w_t * mix_t, features whose weights cancel dropped:
    what feature mode ranks by, and which way each feature pulls a combined query."""
    pairs = [(float(w), m.as_arrays()) for w, m in weighted]
    if not pairs:
        return np.zeros(0, np.int64), np.zeros(0)
    ids, inv = np.unique(np.concatenate([f for _, (f, _) in pairs]), return_inverse=True)
    ws = np.bincount(inv, weights=np.concatenate([np.asarray(x, np.float64) * w for w, (_, x) in pairs]),
                     minlength=len(ids))
    keep = ws != 0
    return ids[keep].astype(np.int64), ws[keep]


def query_vector(mix: FeatureMix | Mapping[int, float], sae) -> np.ndarray:
    """(d_emb,) float32: sum_j w_j * decoder column j, L2-normalised (seed)."""
    import torch

    if not isinstance(mix, FeatureMix):
        mix = FeatureMix(mix, d_hidden=sae.config.d_hidden, clip=None)
    ids, ws = mix.as_arrays()
    if len(ids) == 0:
        raise SteeringError("all sliders are zero")
    h = sae.config.d_hidden
    if ids[-1] >= h or ids[0] < 0:
        bad = int(ids[-1] if ids[-1] >= h else ids[0])
        raise SteeringError(f"feature id {bad} is out of range [0, {h})")
    with torch.no_grad():
        d = sae.directions
        if len(ids) * 8 < h:  # few features: gather their columns, sum in float64
            cols = d.index_select(1, torch.from_numpy(ids).to(d.device))  # (d_emb, n)
            v = (cols.double() @ torch.from_numpy(ws.astype(np.float64)).to(d.device)).cpu().numpy()
        else:  # many: one mat-vec with a dense weight vector, no (d_emb, n) copy
            w = torch.zeros(h, dtype=d.dtype, device=d.device)
            w[torch.from_numpy(ids).to(d.device)] = torch.from_numpy(ws).to(d.device, d.dtype)
            v = (d @ w).double().cpu().numpy()
    n = float(np.linalg.norm(v))
    if not math.isfinite(n) or n < 1e-12:
        raise SteeringError("the mix's feature directions cancel out (query vector is zero)")
    return (v / n).astype(np.float32)


# -- expressions --------------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    coef: float
    kind: str  # "label" | "feature"
    name: str  # label name as written / resolved, or "f123"
    feature: int = -1

    def __str__(self) -> str:
        return f"{self.coef:g}*{self.name}"


@dataclass(frozen=True)
class _Tok:
    kind: str  # "op" | "num" | "name"
    text: str
    pos: int


def _tokenize(text: str, labels: Sequence[str] | None) -> list[_Tok]:
    known = sorted(labels or [], key=len, reverse=True)
    lower = [(l.lower(), l) for l in known]
    toks: list[_Tok] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
            continue
        if c in "+-*":
            toks.append(_Tok("op", c, i))
            i += 1
            continue
        if c == "(" or c == ")":
            raise SteeringError(f"parentheses are not supported (at column {i + 1} of {text!r})")
        hit = None
        for lo, orig in lower:  # longest known label at the cursor, ending at a boundary
            j = i + len(lo)
            if text[i:j].lower() == lo and (j == n or text[j].isspace() or text[j] in "+-*"):
                hit = (orig, j)
                break
        if hit:
            toks.append(_Tok("name", hit[0], i))
            i = hit[1]
            continue
        m = NUMBER_RE.match(text, i)
        if m and (m.end() == n or not (text[m.end()].isalpha() or text[m.end()] in "_/#")):
            toks.append(_Tok("num", m.group(), i))
            i = m.end()
            continue
        # an unknown name: up to '+', '*', or a '-' preceded by whitespace
        j = i
        while j < n and text[j] not in "+*()" and not (text[j] == "-" and j > i and text[j - 1].isspace()):
            j += 1
        name = " ".join(text[i:j].split())
        toks.append(_Tok("name", name, i))
        i = j
    return toks


def _number(tok: _Tok, text: str) -> float:
    return _check_weight(float(tok.text), f"coefficient {tok.text!r}")


def parse_expression(text: str, labels: Sequence[str] | None = None) -> list[Term]:
    """Parse ``text`` into signed terms. With ``labels``, names are resolved against them
    (case-insensitive) and unknown names raise SteeringError with close matches."""
    if not isinstance(text, str) or not text.strip():
        raise SteeringError("empty expression")
    toks = _tokenize(text, labels)
    pos = 0
    terms: list[Term] = []

    def peek() -> _Tok | None:
        return toks[pos] if pos < len(toks) else None

    def where(t: _Tok | None) -> str:
        return f"at column {t.pos + 1}" if t else "at the end"

    while True:
        sign = 1.0
        t = peek()
        if t and t.kind == "op" and t.text in "+-":
            sign = -1.0 if t.text == "-" else 1.0
            pos += 1
        elif terms:
            raise SteeringError(f"expected '+' or '-' before {t.text!r} {where(t)} of {text!r}")
        coef = 1.0
        t = peek()
        if t and t.kind == "num":
            coef = _number(t, text)
            pos += 1
            t = peek()
            if t and t.kind == "op" and t.text == "*":
                pos += 1
        t = peek()
        if not t or t.kind != "name":
            raise SteeringError(f"expected a label or feature (f123 / #123) {where(t)} of {text!r}")
        pos += 1
        atom = t
        t = peek()
        if t and t.kind == "op" and t.text == "*":
            pos += 1
            t = peek()
            if not t or t.kind != "num":
                raise SteeringError(f"expected a number after '*' {where(t)} of {text!r}")
            coef *= _number(t, text)
            pos += 1
        coef = _check_weight(sign * coef, f"coefficient of {atom.text!r}")
        terms.append(_make_term(atom, coef, labels))
        if peek() is None:
            return terms


def _make_term(tok: _Tok, coef: float, labels: Sequence[str] | None) -> Term:
    name = tok.text
    if labels is not None:
        lower = {l.lower(): l for l in labels}
        if name.lower() in lower:
            return Term(coef, "label", lower[name.lower()])
    m = FEATURE_RE.match(name)
    if m:
        return Term(coef, "feature", f"f{int(m.group(1))}", int(m.group(1)))
    if labels is not None:
        close = difflib.get_close_matches(name.lower(), list(lower), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(lower[c]) for c in close)}?" if close else ""
        raise SteeringError(f"unknown label {name!r}{hint}")
    return Term(coef, "label", name)


def evaluate_expression(
    expr: str | Sequence[Term], profiles, features="nonzero", top_n: int = DEFAULT_TOP_N,
    mix: FeatureMix | None = None,
) -> FeatureMix:
    """Apply an expression's terms left to right to ``mix`` (a new one by default).

    ``features`` picks the sliders a label term touches ("nonzero", "top" or ids); with "nonzero"
    and "top" the set is computed over all the expression's labels, so every label term touches
    the same sliders. Raises SteeringError for unknown labels, bad ids or an all-zero result."""
    terms = parse_expression(expr, profiles.labels) if isinstance(expr, str) else list(expr)
    mix = mix if mix is not None else FeatureMix(d_hidden=profiles.d_hidden)
    if mix.d_hidden is None:
        mix.d_hidden = profiles.d_hidden
    if mix.d_hidden != profiles.d_hidden:
        raise SteeringError(f"the mix has d_hidden {mix.d_hidden} but the label profiles have {profiles.d_hidden}")
    rows = [profiles.label_index(t.name) if t.kind == "label" else -1 for t in terms]
    label_names = [profiles.labels[r] for r in rows if r >= 0]
    ids = resolve_features(profiles, label_names, features, top_n) if label_names else np.zeros(0, np.int64)
    for t in terms:
        _check_weight(t.coef, f"coefficient of {t.name!r}")
        if t.kind == "feature":
            mix._feature(t.feature)
    # Same arithmetic as pressing add/subtract per term, on a dense vector (fast for 100k sliders).
    w = np.zeros(profiles.d_hidden, np.float64)
    old = mix.to_dict()
    if old:
        w[list(old)] = list(old.values())
    touched = np.zeros(profiles.d_hidden, bool)
    touched[ids] = True
    for t, r in zip(terms, rows):
        if r >= 0:
            w[ids] = mix._clip_array(w[ids] + t.coef * profiles.mean[r, ids].astype(np.float64))
        else:
            w[t.feature] = mix._clip(w[t.feature] + t.coef)
            touched[t.feature] = True
    keys = np.flatnonzero(touched)
    mix._w.update(zip(keys.tolist(), w[keys].tolist()))
    if mix.is_zero():
        raise SteeringError(f"all sliders are zero after {expr if isinstance(expr, str) else 'the expression'!r}")
    return mix
