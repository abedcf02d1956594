"""``saefe evaluate``: how well SAE features recognise labels, and how biased a search is.

1. Label recognition on an annotated set (EMOTIC-style CSV), split by image into train / test
   with a fixed seed; per-label average precision (AP) on the test images and their mean (mAP) for

   (a) a linear probe on the SAE codes (one-vs-rest logistic regression on the sparse
       activations, L1 by default; the number of features it uses = non-zero coefficients),
   (b) a linear probe on the raw embeddings (same classifier, L2, standardised inputs),
   (c) zero-shot: cosine of image embeddings to the label's text embedding (the prompt is
       the prompt given for the label (``--prompts FILE``; on the demo, its own prompt table), else
       "a photo of a person feeling {label}").

   Chance AP of a label = its share of positives among the test images.

2. Bias of a search: the share of each demographic group (Male/Female, Kid/Teenager/Adult) among
   the top-k results, MaxSkew@k and NDKL against the corpus' base rates (``saefe.search.bias``), for a
   label query and an attenuating expression (``Esteem`` vs ``Esteem - Male + Adult``), in both
   search modes.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from saefe.errors import CorpusError, SaefeError

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "a photo of a person feeling {label}"
DEFAULT_BIAS_LABEL = "Esteem"
DEFAULT_BIAS_EXPR = "Esteem - Male + Adult"
MIN_POSITIVES = 2  # per split, for a label to be evaluated


@dataclass
class LabelResult:
    label: str
    n_train_pos: int
    n_test_pos: int
    chance: float
    ap_sae: float
    n_features: int  # non-zero coefficients of the SAE probe
    ap_raw: float
    ap_zero_shot: float
    prompt: str


@dataclass
class BiasRow:
    mode: str
    query: str
    k: int
    precision: float | None  # share of results carrying the bias label
    shares: dict[str, dict[str, float]]
    max_skew: dict[str, float]
    ndkl: dict[str, float]


@dataclass
class EvalReport:
    n_images: int
    n_train: int
    n_test: int
    seed: int
    penalty: str
    C: float
    labels: list[LabelResult] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    mAP: dict[str, float] = field(default_factory=dict)
    base_rates: dict[str, dict[str, float]] = field(default_factory=dict)
    bias: list[BiasRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))


def _clean(o):
    if isinstance(o, float):
        return None if not math.isfinite(o) else o
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, np.generic):
        return _clean(o.item())
    return o


# -- metrics ------------------------------------------------------------------------------


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """AP as in sklearn (step-wise, no interpolation); NaN when there is no positive."""
    from sklearn.metrics import average_precision_score

    y = np.asarray(y_true, dtype=bool)
    if y.sum() == 0:
        return float("nan")
    return float(average_precision_score(y, np.asarray(scores, dtype=np.float64)))


def split_images(ids: np.ndarray, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/test split of image ids (sorted within each part)."""
    if not 0.0 < float(test_fraction) < 1.0:
        raise SaefeError(f"--test-fraction must be strictly between 0 and 1, got {test_fraction}")
    ids = np.asarray(ids, dtype=np.int64)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(ids)
    n_test = int(round(len(ids) * float(test_fraction)))
    if n_test < 1 or n_test >= len(ids):
        raise SaefeError(f"{len(ids)} annotated images are too few to split with test fraction {test_fraction}")
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _probe(x_train, y_train, x_test, penalty: str, C: float, seed: int) -> tuple[np.ndarray, int]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    # sklearn >= 1.8 spells the penalty as l1_ratio (1 = L1, 0 = L2); older versions need penalty=.
    import sklearn

    major, minor = (int(v) for v in re.findall(r"\d+", sklearn.__version__)[:2])
    kw = {"l1_ratio": 1.0 if penalty == "l1" else 0.0} if (major, minor) >= (1, 8) else {"penalty": penalty}
    clf = LogisticRegression(C=C, solver="liblinear", max_iter=2000, random_state=seed, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)
        clf.fit(x_train, y_train)
    return clf.decision_function(x_test), int(np.count_nonzero(clf.coef_))


def prompts_for(labels: Sequence[str], template: str = DEFAULT_TEMPLATE,
                overrides: dict[str, str] | None = None) -> dict[str, str]:
    """One zero-shot prompt per label: the override where given, else the template."""
    table = dict(overrides or {})
    return {l: table.get(l, template.format(label=l)) for l in labels}


# -- the evaluation -------------------------------------------------------------------------


def evaluate_labels(
    engine, membership, test_fraction: float = 0.3, seed: int = 0, penalty: str = "l1", C: float = 1.0,
    labels: Sequence[str] | None = None, prompts: dict[str, str] | None = None, zero_shot: bool = True,
    report: EvalReport | None = None,
) -> EvalReport:
    """Probes and zero-shot AP per label on a by-image split of the annotated images."""
    import scipy.sparse as sp
    from sklearn.preprocessing import MaxAbsScaler, StandardScaler

    from saefe.labels.profiles import load_or_compute_codes

    if penalty not in ("l1", "l2"):
        raise SaefeError(f"--penalty must be l1 or l2, got {penalty!r}")
    if not (isinstance(C, (int, float)) and math.isfinite(C) and C > 0):
        raise SaefeError(f"--C must be a positive number, got {C!r}")
    matrix = np.asarray(membership.matrix, dtype=bool)
    names = list(membership.labels)
    if labels:
        lower = {n.lower(): i for i, n in enumerate(names)}
        missing = [l for l in labels if l.lower() not in lower]
        if missing:
            raise SaefeError(f"labels not in the annotations: {', '.join(missing)} (have: {', '.join(names)})")
        cols = [lower[l.lower()] for l in labels]
    else:
        cols = list(range(len(names)))
    annotated = np.flatnonzero(matrix.any(axis=1))
    train, test = split_images(annotated, test_fraction, seed)
    rep = report or EvalReport(0, 0, 0, seed, penalty, float(C))
    rep.n_images, rep.n_train, rep.n_test = int(len(annotated)), int(len(train)), int(len(test))

    sae = engine.require_sae()
    codes = sp.csr_matrix(load_or_compute_codes(engine.store, sae, engine.sae_dir), dtype=np.float32)
    emb = engine.store.vectors_f32()
    c_scaler = MaxAbsScaler().fit(codes[train])
    c_train, c_test = c_scaler.transform(codes[train]), c_scaler.transform(codes[test])
    e_scaler = StandardScaler().fit(emb[train])
    e_train, e_test = e_scaler.transform(emb[train]), e_scaler.transform(emb[test])

    label_names = [names[c] for c in cols]
    prompts = prompts_for(label_names, overrides=prompts)
    zs_scores: dict[str, np.ndarray] = {}
    if zero_shot:
        try:
            t = engine.encoder.embed_texts([prompts[l] for l in label_names])
            zs = emb[test] @ np.asarray(t, dtype=np.float32).T
            zs_scores = {l: zs[:, i] for i, l in enumerate(label_names)}
        except SaefeError as e:
            rep.notes.append(f"zero-shot skipped: {e}")
    for c, name in zip(cols, label_names):
        y_tr, y_te = matrix[train, c], matrix[test, c]
        if y_tr.sum() < MIN_POSITIVES or y_te.sum() < MIN_POSITIVES or (~y_tr).sum() < MIN_POSITIVES:
            rep.skipped[name] = f"too few positives ({int(y_tr.sum())} train, {int(y_te.sum())} test)"
            continue
        s_sae, nf = _probe(c_train, y_tr, c_test, penalty, C, seed)
        s_raw, _ = _probe(e_train, y_tr, e_test, "l2", C, seed)
        rep.labels.append(LabelResult(
            label=name, n_train_pos=int(y_tr.sum()), n_test_pos=int(y_te.sum()), chance=float(y_te.mean()),
            ap_sae=average_precision(y_te, s_sae), n_features=nf, ap_raw=average_precision(y_te, s_raw),
            ap_zero_shot=average_precision(y_te, zs_scores[name]) if name in zs_scores else float("nan"),
            prompt=prompts[name],
        ))
    if not rep.labels:
        raise CorpusError("no label has enough positive images in both the train and the test split to evaluate")
    for key in ("chance", "ap_sae", "ap_raw", "ap_zero_shot"):
        vals = [getattr(r, key) for r in rep.labels if math.isfinite(getattr(r, key))]
        rep.mAP[key] = float(np.mean(vals)) if vals else float("nan")
    rep.notes.append(f"SAE probe: logistic regression ({penalty}, C={C:g}) on max-abs-scaled SAE codes; raw probe: "
                     f"logistic regression (l2, C={C:g}) on standardised embeddings; chance = test prevalence")
    return rep


def evaluate_bias(
    engine, attributes, label: str = DEFAULT_BIAS_LABEL, expr: str | None = DEFAULT_BIAS_EXPR, k: int = 20,
    modes: Sequence[str] = ("direction", "features"), report: EvalReport | None = None,
) -> EvalReport:
    """Demographic make-up of the top-k for ``label`` and ``expr`` in each search mode."""
    from saefe.search.bias import measure_bias
    from saefe.search.engine import Term

    rep = report or EvalReport(0, 0, 0, 0, "", 0.0)
    queries = [(label, Term("label", label))] + ([(expr, Term("expr", expr))] if expr else [])
    truth = None
    if label in attributes.columns:
        truth = attributes[label].to_numpy().astype(bool)
    for mode in modes:
        for qname, term in queries:
            res = engine.search([term], k=k, mode=mode)
            ids = np.array([r.id for r in res], dtype=np.int64)
            b = measure_bias(ids, attributes)
            rep.base_rates = b.base_rates
            prec = float(truth[ids].mean()) if truth is not None and len(ids) else None
            rep.bias.append(BiasRow(mode, qname, len(ids), prec, b.shares, b.max_skew, b.ndkl))
    return rep


# -- output ---------------------------------------------------------------------------------


def _f(x: float | None, fmt: str = "{:.3f}") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def format_report(rep: EvalReport) -> str:
    lines = []
    if rep.labels:
        lines.append(f"label recognition: {rep.n_images} annotated images, {rep.n_train} train / {rep.n_test} test "
                     f"(split by image, seed {rep.seed}); average precision on the test images")
        head = f"{'label':<16} {'test+':>5} {'chance':>7} {'SAE probe':>9} {'#feat':>6} {'raw probe':>9} {'zero-shot':>9}"
        lines += [head, "-" * len(head)]
        for r in rep.labels:
            lines.append(f"{r.label[:16]:<16} {r.n_test_pos:>5d} {_f(r.chance):>7} {_f(r.ap_sae):>9} "
                         f"{r.n_features:>6d} {_f(r.ap_raw):>9} {_f(r.ap_zero_shot):>9}")
        lines.append("-" * len(head))
        nf = np.mean([r.n_features for r in rep.labels])
        m = rep.mAP
        lines.append(f"{'mAP':<16} {'':>5} {_f(m.get('chance')):>7} {_f(m.get('ap_sae')):>9} {nf:>6.0f} "
                     f"{_f(m.get('ap_raw')):>9} {_f(m.get('ap_zero_shot')):>9}")
        for name, why in rep.skipped.items():
            lines.append(f"skipped {name}: {why}")
    if rep.bias:
        if lines:
            lines.append("")
        k = rep.bias[0].k
        lines.append(f"bias of the top-{k} (share of each group; corpus base rate in brackets):")
        groups = [(a, g) for a, gs in rep.base_rates.items() for g in gs]
        base = "  ".join(f"{g} {rep.base_rates[a][g]:.0%}" for a, g in groups)
        lines.append(f"corpus: {base}")
        head = f"{'mode':<10} {'query':<26} {'prec':>5} " + " ".join(f"{g[:6]:>6}" for _, g in groups) + \
            "  " + " ".join(f"{'skew:' + a[:3]:>8} {'ndkl:' + a[:3]:>8}" for a in rep.base_rates)
        lines += [head, "-" * len(head)]
        for b in rep.bias:
            shares = " ".join(f"{_f(b.shares.get(a, {}).get(g), '{:.0%}'):>6}" for a, g in groups)
            mets = " ".join(f"{_f(b.max_skew.get(a), '{:+.2f}'):>8} {_f(b.ndkl.get(a)):>8}" for a in rep.base_rates)
            lines.append(f"{b.mode:<10} {b.query[:26]:<26} {_f(b.precision, '{:.0%}'):>5} {shares}  {mets}")
        lines.append("prec = share of the results that carry the query's label; MaxSkew@k = max over groups of "
                     "log(share / base rate); NDKL = rank-discounted KL from the base rates (0 = mirrors the corpus)")
    lines += [f"note: {n}" for n in rep.notes]
    return "\n".join(lines)


# -- CLI ------------------------------------------------------------------------------------
