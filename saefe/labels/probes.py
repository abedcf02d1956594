"""Demographic probes: per protected attribute, a linear classifier of the group from an image's
embedding (or SAE codes), fit on annotated images and saved beside the label profiles.

They let a corpus with no annotations (the Reddit folder a user actually searches) get a bias
panel, fair re-ranking and projection: any index made with the same encoder gets per-image
estimates (:mod:`saefe.labels.estimates`). ``saefe labels --annotations`` fits them.

* Classifier: scikit-learn ``LogisticRegression`` (L2, lbfgs; multinomial for 3+ groups) on
  standardised embeddings (or max-abs-scaled SAE codes). The coefficients, intercepts and the
  scaler are exported so prediction needs only numpy, and equals sklearn's ``predict_proba``.
* Held-out accuracy and soft confusion (mean predicted probability of each group over the held-out
  images of each true group): a fixed-seed 80/20 split by image; the saved probe is then refit
  on all. A set's estimated share is its mean probability, uncorrected: correcting with the
  confusion ("adjusted classify and count") assumes the set differs from the training images
  only in group shares, which a query's top-k does not (on the demo it overshot, 100% for a
  90%-male top-50 where the plain mean said 81%).
* Directions (for ``--debias project``), in embedding space: each group's mean minus the mean of
  the group means, computed within each stratum (images with the same set of non-demographic
  labels) and averaged with weight = the stratum's smallest group. Stratifying keeps a label's own look out of the direction: in
  a corpus where Esteem images are mostly men, the plain male-female mean difference also points
  at Esteem, and removing it would remove Esteem. The orthonormal basis of these offsets (rank
  G-1) is what the projection removes.

On disk (``OUT``, e.g. ``weights/NAME/labels/``): ``probes.safetensors`` (tensors
``<attr>.coef``, ``.intercept``, ``.mean``, ``.scale``, ``.offsets``; float32) and ``probes.json``
(attributes, group order, space, accuracy, training counts, encoder, SAE identity). No pickle.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from saefe.errors import IncompatibleError, SaefeError
from saefe.labels.attributes import DEMOGRAPHICS
from saefe.manifest import EncoderInfo, read_json, write_json_atomic

log = logging.getLogger(__name__)

PROBES_FILE = "probes.safetensors"
PROBES_META = "probes.json"
FORMAT_VERSION = 1
SPACES = ("embedding", "sae")
MIN_PER_GROUP = 5  # training images per group for a probe
MIN_STRATUM = 3  # images per group for a label to count as a stratum of the directions


@dataclass
class AttributeProbe:
    attribute: str
    groups: list[str]  # column order of predict_proba
    coef: np.ndarray  # (C, D): C = 1 for two groups (logit of groups[1]), else C = G
    intercept: np.ndarray  # (C,)
    mean: np.ndarray  # (D,) scaler centre (0 for SAE codes)
    scale: np.ndarray  # (D,) scaler scale
    offsets: np.ndarray  # (G, d_emb) stratified group-mean offsets in embedding space
    n_train: dict[str, int] = field(default_factory=dict)
    accuracy: float = float("nan")  # held-out
    confusion: np.ndarray | None = None  # (G, G) held-out mean P(predicted j | true i)
    strata: int = 0  # labels the offsets were averaged over (0: unstratified)

    def decision(self, x) -> np.ndarray:
        """(N, C) logits; ``x`` dense (N, D) or scipy sparse."""
        w = (self.coef / self.scale[None, :]).astype(np.float64)  # fold the scaler into the weights
        b = self.intercept.astype(np.float64) - w @ self.mean.astype(np.float64)
        z = x @ w.T
        return np.asarray(z, dtype=np.float64) + b[None, :]

    def predict_proba(self, x) -> np.ndarray:
        z = self.decision(x)
        if z.shape[1] == 1:  # binary: sklearn's classes_[1] is the positive class
            p1 = 1.0 / (1.0 + np.exp(-z[:, 0]))
            return np.stack([1.0 - p1, p1], axis=1)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def directions(self) -> np.ndarray:
        """(G-1, d_emb) orthonormal basis of the group offsets (what ``project`` removes)."""
        return orthonormal_basis(self.offsets, len(self.groups) - 1)


def orthonormal_basis(vectors: np.ndarray, rank: int) -> np.ndarray:
    v = np.asarray(vectors, dtype=np.float64)
    if v.size == 0 or rank < 1:
        return np.zeros((0, v.shape[-1] if v.ndim == 2 else 0), np.float32)
    _, s, vt = np.linalg.svd(v, full_matrices=False)
    keep = s > 1e-8 * max(float(s[0]), 1e-30)
    return vt[: min(rank, int(keep.sum()))].astype(np.float32)


@dataclass
class ProbeSet:
    probes: dict[str, AttributeProbe]
    space: str = "embedding"
    encoder_info: EncoderInfo | None = None
    sae: dict[str, Any] = field(default_factory=dict)  # SAE identity when space == "sae"
    C: float = 1.0
    source: dict[str, Any] = field(default_factory=dict)
    dir: Path | None = None
    sha256: str | None = None  # fingerprint of probes.safetensors + per-attribute metadata once saved/loaded

    def predict(self, x) -> dict[str, np.ndarray]:
        """attribute -> (N, G) group probabilities."""
        return {a: p.predict_proba(x) for a, p in self.probes.items()}

    # -- persistence ---------------------------------------------------------------------------
    def save(self, out: str | os.PathLike) -> Path:
        from safetensors.numpy import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, np.ndarray] = {}
        for a, p in self.probes.items():
            for key in ("coef", "intercept", "mean", "scale", "offsets"):
                tensors[f"{a}.{key}"] = np.ascontiguousarray(getattr(p, key), dtype=np.float32)
        tmp = out / (PROBES_FILE + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, out / PROBES_FILE)
        meta = {
            "format_version": FORMAT_VERSION, "space": self.space, "C": self.C, "source": self.source,
            "encoder": self.encoder_info.to_dict() if self.encoder_info else None, "sae": self.sae,
            "classifier": "sklearn LogisticRegression (lbfgs, L2); coef/intercept exported, scaler kept apart",
            "attributes": {a: {"groups": p.groups, "n_train": p.n_train, "accuracy": _finite(p.accuracy),
                               "confusion": None if p.confusion is None else np.asarray(p.confusion).tolist(),
                               "strata": p.strata, "classes": "binary" if p.coef.shape[0] == 1 else "multinomial"}
                           for a, p in self.probes.items()},
        }
        self.sha256 = _fingerprint(out / PROBES_FILE, meta["attributes"])
        meta["sha256"] = self.sha256
        write_json_atomic(out / PROBES_META, meta)
        self.dir = out
        return out

    @classmethod
    def load(cls, dir: str | os.PathLike, encoder_info: EncoderInfo | None = None) -> "ProbeSet":
        from safetensors.numpy import load_file

        d = Path(dir)
        if not (d / PROBES_META).exists() or not (d / PROBES_FILE).exists():
            raise SaefeError(f"no demographic probes at {d}; fit them with `saefe labels --annotations`")
        meta = read_json(d / PROBES_META)
        enc = EncoderInfo.from_dict(meta["encoder"]) if meta.get("encoder") else None
        if encoder_info is not None and enc is not None:
            enc.check_compatible(encoder_info, f"the probes at {d}", "the index")
        try:
            t = load_file(str(d / PROBES_FILE))
        except Exception as e:  # noqa: BLE001 - a damaged file has many failure types
            raise SaefeError(f"the probes at {d / PROBES_FILE} are unreadable ({type(e).__name__})") from None
        probes = {}
        for a, info in (meta.get("attributes") or {}).items():
            try:
                arr = {k: t[f"{a}.{k}"] for k in ("coef", "intercept", "mean", "scale", "offsets")}
            except KeyError as e:
                raise SaefeError(f"the probes at {d} are damaged: no tensor {e.args[0]}") from None
            probes[a] = AttributeProbe(a, list(info["groups"]), n_train=dict(info.get("n_train", {})),
                                       accuracy=float(info.get("accuracy") or float("nan")),
                                       confusion=None if info.get("confusion") is None else np.asarray(info["confusion"]),
                                       strata=int(info.get("strata", 0)), **arr)
        return cls(probes, meta.get("space", "embedding"), enc, meta.get("sae") or {}, float(meta.get("C", 1.0)),
                   meta.get("source") or {}, d, _fingerprint(d / PROBES_FILE, meta.get("attributes") or {}))


def _finite(x: float):
    return None if x is None or not np.isfinite(x) else float(x)


def _fingerprint(path: Path, attributes: dict) -> str:
    """sha256 of the tensors file and the per-attribute metadata (groups, confusion): estimates
    made with other probes are recomputed."""
    import json

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    h.update(json.dumps(attributes, sort_keys=True).encode())
    return h.hexdigest()


def probes_dir_of(profiles) -> Path | None:
    """Where an engine's probes live: beside its label profiles."""
    d = getattr(profiles, "dir", None)
    return Path(d) if d is not None and (Path(d) / PROBES_META).exists() else None


# -- fitting ----------------------------------------------------------------------------------


def label_strata(strata: np.ndarray | None, n: int) -> tuple[np.ndarray, int]:
    """(N,) stratum id per image and the number of strata: images with the same set of
    non-demographic labels share a stratum (a label's own look, not a mix of labels)."""
    if strata is None or strata.shape[1] == 0:
        return np.zeros(n, np.int64), 1
    _, inv = np.unique(np.asarray(strata, bool), axis=0, return_inverse=True)
    inv = np.asarray(inv).reshape(-1)
    return inv.astype(np.int64), int(inv.max()) + 1 if len(inv) else 0


def group_offsets(emb: np.ndarray, member: np.ndarray, strata: np.ndarray | None) -> tuple[np.ndarray, int]:
    """(G, D) stratified group-mean offsets and the number of strata used (0: unstratified).

    ``member`` (N, G) bool, one group per training image; ``strata`` (N, S) bool label columns:
    strata are the distinct label sets, used where every group has MIN_STRATUM images."""
    def offsets(rows: np.ndarray) -> tuple[np.ndarray, int]:
        counts = member[rows].sum(axis=0)
        if (counts < 1).any():
            return np.zeros((member.shape[1], emb.shape[1])), 0
        means = np.stack([emb[rows & member[:, g]].mean(axis=0, dtype=np.float64) for g in range(member.shape[1])])
        return means - means.mean(axis=0, keepdims=True), int(counts.min())

    sid, n_strata = label_strata(strata, len(emb))
    acc = np.zeros((member.shape[1], emb.shape[1]))
    total, used = 0, 0
    if strata is not None and strata.shape[1]:
        for s in range(n_strata):
            rows = sid == s
            if (member[rows].sum(axis=0) < MIN_STRATUM).any():
                continue
            off, w = offsets(rows)
            acc += w * off
            total += w
            used += 1
    if used:
        return acc / total, used
    return offsets(np.ones(len(emb), bool))[0], 0


def fit_probes(x, emb: np.ndarray, labels, *, space: str = "embedding", C: float = 1.0, seed: int = 0,
               groups: dict[str, list[str]] | None = None, encoder_info: EncoderInfo | None = None,
               sae: dict[str, Any] | None = None, source: dict[str, Any] | None = None) -> ProbeSet:
    """Fit one probe per attribute of ``groups`` that ``labels`` (DataFrame of 0/1 columns, one row
    per image) covers. ``x``: probe input rows (embeddings, or SAE codes for space 'sae');
    ``emb``: embeddings (for the directions). Images with exactly one group are the training set."""
    from threadpoolctl import threadpool_limits

    if space not in SPACES:
        raise SaefeError(f"probe space must be one of {', '.join(SPACES)}, got {space!r}")
    # one BLAS thread: these fits are small, and a thread per core on a shared machine is 20x slower
    with threadpool_limits(1):
        return _fit_probes(x, emb, labels, space=space, C=C, seed=seed, groups=groups, encoder_info=encoder_info,
                           sae=sae, source=source)


def _fit_probes(x, emb, labels, *, space, C, seed, groups, encoder_info, sae, source) -> ProbeSet:
    from sklearn.preprocessing import MaxAbsScaler, StandardScaler

    if space not in SPACES:
        raise SaefeError(f"probe space must be one of {', '.join(SPACES)}, got {space!r}")
    groups = groups or DEMOGRAPHICS
    demo_cols = {g for gs in groups.values() for g in gs}
    strata_cols = [c for c in labels.columns if c not in demo_cols]
    strata = labels[strata_cols].to_numpy().astype(bool) if strata_cols else None
    probes: dict[str, AttributeProbe] = {}
    for attr, names in groups.items():
        names = [g for g in names if g in labels.columns]
        if len(names) < 2:
            continue
        m = labels[names].to_numpy().astype(bool)
        rows = m.sum(axis=1) == 1
        y = np.argmax(m[rows], axis=1)
        counts = np.bincount(y, minlength=len(names))
        if (counts < MIN_PER_GROUP).any():
            log.warning("no %s probe: too few labelled images per group (%s)", attr,
                        ", ".join(f"{g} {c}" for g, c in zip(names, counts)))
            continue
        idx = np.flatnonzero(rows)
        xr = x[idx]
        scaler = (StandardScaler() if space == "embedding" else MaxAbsScaler()).fit(xr)
        mean = np.asarray(getattr(scaler, "mean_", np.zeros(xr.shape[1])), dtype=np.float64)
        scale = np.asarray(scaler.scale_, dtype=np.float64)
        scale[scale == 0] = 1.0
        acc, conf = _held_out(scaler, xr, y, C, seed, len(names))
        clf = _logreg(C, seed).fit(scaler.transform(xr), y)
        offsets, used = group_offsets(np.asarray(emb, np.float32)[idx], m[idx], None if strata is None else strata[idx])
        probes[attr] = AttributeProbe(
            attr, names, clf.coef_.astype(np.float32), clf.intercept_.astype(np.float32),
            mean.astype(np.float32), scale.astype(np.float32), offsets.astype(np.float32),
            {g: int(c) for g, c in zip(names, counts)}, acc, conf, used)
        log.info("%s probe: %d images, held-out accuracy %.3f, directions over %d strata", attr, len(idx), acc, used)
    if not probes:
        raise SaefeError(f"no demographic probe could be fit: the labels need at least {MIN_PER_GROUP} images "
                         f"of every group of {' or '.join(groups)}")
    return ProbeSet(probes, space, encoder_info, dict(sae or {}), float(C), dict(source or {}))


def _logreg(C: float, seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=2000, random_state=seed)


def _held_out(scaler, x, y: np.ndarray, C: float, seed: int, n_groups: int) -> tuple[float, np.ndarray | None]:
    """(accuracy, soft confusion) on a stratified 20% held out from a fit on the rest."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split

    try:
        tr, te = train_test_split(np.arange(len(y)), test_size=0.2, random_state=seed, stratify=y)
    except ValueError:
        return float("nan"), None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = _logreg(C, seed).fit(scaler.transform(x[tr]), y[tr])
    prob = clf.predict_proba(scaler.transform(x[te]))
    conf = np.stack([prob[y[te] == g].mean(axis=0) for g in range(n_groups)])
    return float((np.argmax(prob, axis=1) == y[te]).mean()), conf



def fit_store_probes(store, labels, *, space: str = "embedding", sae=None, sae_dir=None, C: float = 1.0,
                     seed: int = 0, source: dict[str, Any] | None = None) -> ProbeSet:
    """Probes for the labelled images of ``store`` (``labels``: the attributes frame)."""
    emb = store.vectors_f32()
    ident: dict[str, Any] = {}
    if space == "sae":
        if sae is None:
            raise SaefeError("SAE-code probes need the SAE")
        from saefe.labels.profiles import load_or_compute_codes, sae_identity

        x = load_or_compute_codes(store, sae, sae_dir)
        ident = sae_identity(sae, sae_dir)
    else:
        x = emb
    if len(labels) != len(emb):
        raise IncompatibleError(f"labels have {len(labels)} rows but the index has {len(emb)} images")
    return fit_probes(x, emb, labels, space=space, C=C, seed=seed, encoder_info=store.encoder_info,
                      sae=ident, source=source)


def probe_summary(ps: ProbeSet, attrs: Sequence[str] | None = None) -> str:
    parts = []
    for a, p in ps.probes.items():
        if attrs is None or a in attrs:
            acc = f"{p.accuracy:.0%}" if np.isfinite(p.accuracy) else "n/a"
            parts.append(f"{a} ({'/'.join(p.groups)}, held-out accuracy {acc}, {sum(p.n_train.values())} images)")
    return "; ".join(parts)
