"""Label profiles: for every label, each SAE feature's mean activation and firing frequency.

    mean[l, j] = sum over images i with label l of a_j(i) / n_l      (inactive features count as 0)
    freq[l, j] = #{i with label l : a_j(i) > 0} / n_l

computed as one sparse product ``M.T @ codes`` of the (N x L) membership matrix with the corpus'
(N x d_hidden, k non-zeros a row) CSR codes, so d_hidden 262144 costs no dense (N, d_hidden) matrix.

Seed rankings (the UI shows the top K = 10):

* shared over labels S:   score[j] = min_{l in S} mean[l, j]      ties by sum_{l in S} mean[l, j]
* distinct for label e:   score[j] = mean[e, j] - mean_{l != e} mean[l, j]   ties by mean[e, j]

Both are ranked over the features that fire at all for the label(s) (sum of means > 0 for shared,
mean[e] > 0 for distinct); remaining ties go to the lower feature id.

On disk (``OUT``, e.g. ``weights/NAME/labels/``):

* ``profiles.parquet``: wide, one row per feature (row j = feature j), column ``feature`` (int64)
  then ``mean:<label>`` and ``freq:<label>`` (float32) for every profiled label.
* ``labels.json``: labels, image counts, source (+ matching report), VAD thresholds, shared /
  distinct top-K, the encoder manifest and the SAE (dir name, sha256 of model.safetensors,
  weights fingerprint, config). Loading refuses profiles made with another SAE or encoder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from saefe.labels.annotations import Membership, MembershipReport
from saefe.errors import CorpusError, IncompatibleError, SaefeError, SteeringError
from saefe.manifest import EncoderInfo, file_sha256, read_json, write_json_atomic

log = logging.getLogger(__name__)

PROFILES_FILE = "profiles.parquet"
LABELS_FILE = "labels.json"
FORMAT_VERSION = 1
DEFAULT_TOP_K = 10
DEFAULT_TOP_N = 50
ENCODE_CHUNK = 4096


# -- SAE identity -------------------------------------------------------------------------


def sae_fingerprint(sae) -> str:
    """Cheap identity of an SAE's weights in memory: sha256 over the config and a strided sample
    (at most ~1M values) of both projection matrices. Two trainings never share it."""
    import torch
    from dataclasses import asdict

    h = hashlib.sha256(json.dumps(asdict(sae.config), sort_keys=True).encode())
    with torch.no_grad():
        for w in (sae.up_proj.weight, sae.down_proj.weight):
            flat = w.detach().reshape(-1)
            step = max(1, flat.numel() // (1 << 20))
            h.update(flat[::step].float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def sae_identity(sae, sae_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    from dataclasses import asdict

    ident: dict[str, Any] = {"config": asdict(sae.config), "fingerprint": sae_fingerprint(sae)}
    if sae_dir is not None:
        p = Path(sae_dir)
        ident["name"] = p.resolve().name
        w = p / "model.safetensors"
        if w.exists():
            ident["sha256"] = file_sha256(w)
    return ident


# -- activations --------------------------------------------------------------------------


def compute_codes(store, sae, chunk: int = ENCODE_CHUNK):
    """(N, d_hidden) CSR codes of the store's vectors, encoded in chunks under no_grad."""
    import scipy.sparse as sp
    import torch

    n, h, k = len(store.vectors), sae.config.d_hidden, sae.config.top_k
    param = next(sae.parameters())
    data = np.empty(n * k, np.float32)
    ind = np.empty(n * k, np.int64)
    with torch.no_grad():
        for off in range(0, n, chunk):
            x = torch.from_numpy(np.asarray(store.vectors[off : off + chunk], dtype=np.float32))
            v, i = sae.encode(x.to(param.device, param.dtype))
            data[off * k : (off + len(x)) * k] = v.float().cpu().numpy().reshape(-1)
            ind[off * k : (off + len(x)) * k] = i.cpu().numpy().reshape(-1)
    indptr = np.arange(0, n * k + 1, k, dtype=np.int64)
    csr = sp.csr_matrix((data, ind, indptr), shape=(n, h))
    csr.eliminate_zeros()
    csr.sort_indices()
    return csr


def load_or_compute_codes(store, sae, sae_dir: str | os.PathLike | None = None):
    """The stored codes (``saefe encode-sae``) when present and readable, else encode now."""
    if sae_dir is not None:
        try:
            from saefe.sae.codes import load_codes

            csr, _ = load_codes(getattr(store, "data", store.dir), sae_dir)
            if csr is not None and csr.shape == (len(store.vectors), sae.config.d_hidden):
                log.info("using the stored SAE codes of %s", store.dir)
                return csr.tocsr()
        except (ImportError, SaefeError, OSError, FileNotFoundError, ValueError, KeyError) as e:
            log.debug("no stored codes (%s); encoding the index with the SAE", e)
    log.info("encoding %d vectors with the SAE", len(store.vectors))
    return compute_codes(store, sae)


def profile_arrays(codes, membership: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean (L, H), freq (L, H), counts (L,)) from CSR codes (N, H) and membership (N, L)."""
    import scipy.sparse as sp

    m = sp.csr_matrix(np.asarray(membership, dtype=np.float32))
    counts = np.asarray(membership, dtype=bool).sum(axis=0).astype(np.int64)
    codes = sp.csr_matrix(codes, dtype=np.float32)
    fired = codes.copy()
    fired.data = (fired.data > 0).astype(np.float32)
    sums = np.asarray((m.T @ codes).todense(), dtype=np.float64)
    fires = np.asarray((m.T @ fired).todense(), dtype=np.float64)
    denom = np.maximum(counts, 1)[:, None]
    return (sums / denom).astype(np.float32), (fires / denom).astype(np.float32), counts


# -- rankings -----------------------------------------------------------------------------


def _top(primary: np.ndarray, secondary: np.ndarray, eligible: np.ndarray, k: int) -> list[int]:
    """Top-k ids by primary desc, then secondary desc, then id asc, among eligible features."""
    ids = np.flatnonzero(eligible)
    if len(ids) == 0 or k <= 0:
        return []
    p = primary[ids]
    if len(ids) > k:  # keep every feature tied with the k-th primary score, then sort exactly
        kth = np.partition(p, len(p) - k)[len(p) - k]
        keep = p >= kth
        ids, p = ids[keep], p[keep]
    order = np.lexsort((ids, -secondary[ids], -p))
    return [int(i) for i in ids[order[:k]]]


def shared_ranking(mean: np.ndarray, k: int = DEFAULT_TOP_K) -> list[int]:
    """Seed "shared" features of the rows of ``mean`` (L, H): min over labels, ties by sum."""
    mean = np.asarray(mean, dtype=np.float64)
    total = mean.sum(axis=0)
    return _top(mean.min(axis=0), total, total > 0, k)


def distinct_score(mean: np.ndarray, e: int) -> np.ndarray:
    mean = np.asarray(mean, dtype=np.float64)
    n = mean.shape[0]
    if n == 1:
        return mean[0].copy()
    others = (mean.sum(axis=0) - mean[e]) / (n - 1)
    return mean[e] - others


def distinct_ranking(mean: np.ndarray, e: int, k: int = DEFAULT_TOP_K) -> list[int]:
    """Seed "distinct" features of label row ``e``: mean[e] - mean of the others, ties by mean[e]."""
    mean = np.asarray(mean, dtype=np.float64)
    return _top(distinct_score(mean, e), mean[e], mean[e] > 0, k)


class LabelScore(NamedTuple):
    label: str
    score: float  # distinct score of the feature for this label
    mean: float
    freq: float


# -- the profiles -------------------------------------------------------------------------


@dataclass
class LabelProfiles:
    labels: list[str]
    mean: np.ndarray  # (L, d_hidden) float32
    freq: np.ndarray  # (L, d_hidden) float32
    counts: np.ndarray  # (L,) images per label
    source: dict[str, Any] = field(default_factory=dict)
    encoder_info: EncoderInfo | None = None
    sae: dict[str, Any] = field(default_factory=dict)  # sae_identity()
    skipped: list[str] = field(default_factory=list)  # labels with no image
    thresholds: dict[str, str] = field(default_factory=dict)
    top_k: int = DEFAULT_TOP_K
    dir: Path | None = None

    # -- lookups ---------------------------------------------------------------------------
    @property
    def d_hidden(self) -> int:
        return int(self.mean.shape[1])

    def __len__(self) -> int:
        return len(self.labels)

    def label_index(self, label: str) -> int:
        """Index of ``label`` (case-insensitive); SteeringError listing close matches otherwise."""
        import difflib

        if label in self.labels:
            return self.labels.index(label)
        lower = {name.lower(): i for i, name in enumerate(self.labels)}
        key = " ".join(str(label).split()).lower()
        if key in lower:
            return lower[key]
        if label in self.skipped:
            raise SteeringError(f"label {label!r} has no image in the corpus, so it has no profile")
        close = difflib.get_close_matches(key, list(lower), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(self.labels[lower[c]]) for c in close)}?" if close else ""
        shown = ", ".join(self.labels[:12]) + (", ..." if len(self.labels) > 12 else "")
        raise SteeringError(f"unknown label {label!r}{hint} (labels: {shown})")

    def mean_of(self, label: str) -> np.ndarray:
        return self.mean[self.label_index(label)]

    def freq_of(self, label: str) -> np.ndarray:
        return self.freq[self.label_index(label)]

    def _check_feature(self, feature: int) -> int:
        f = int(feature)
        if not 0 <= f < self.d_hidden:
            raise SteeringError(f"feature id {feature} is out of range [0, {self.d_hidden})")
        return f

    def shared(self, labels: Sequence[str] | None = None, k: int | None = None) -> list[int]:
        rows = [self.label_index(l) for l in labels] if labels else list(range(len(self.labels)))
        if not rows:
            return []
        return shared_ranking(self.mean[rows], self.top_k if k is None else k)

    def distinct(self, label: str, k: int | None = None, among: Sequence[str] | None = None) -> list[int]:
        """Distinct features of ``label`` against all other labels (or those in ``among``)."""
        e = self.label_index(label)
        k = self.top_k if k is None else k
        if among is None:  # the common case: reuse the column totals over all labels
            if getattr(self, "_total", None) is None or self._total.shape != (self.d_hidden,):
                self._total = self.mean.sum(axis=0, dtype=np.float64)
            me = self.mean[e].astype(np.float64)
            n = len(self.labels)
            score = me - (self._total - me) / (n - 1) if n > 1 else me
            return _top(score, me, me > 0, k)
        rows = sorted({e, *map(self.label_index, among)})
        return distinct_ranking(self.mean[rows], rows.index(e), k)

    def labels_for_feature(self, feature: int, top: int = 5) -> list[LabelScore]:
        """Labels most tied to a feature: by distinct score, then mean; only labels where it fires."""
        f = self._check_feature(feature)
        col = self.mean[:, f].astype(np.float64)
        n = len(self.labels)
        scores = col - (col.sum() - col) / (n - 1) if n > 1 else col
        ids = np.flatnonzero(col > 0)
        order = ids[np.lexsort((ids, -col[ids], -scores[ids]))][:top]
        return [LabelScore(self.labels[i], float(scores[i]), float(col[i]), float(self.freq[i, f])) for i in order]

    def most_tied_label(self, feature: int) -> tuple[str | None, float]:
        """(label, distinct score) for a slider caption; (None, 0.0) when no label fires it."""
        best = self.labels_for_feature(feature, top=1)
        return (best[0].label, best[0].score) if best else (None, 0.0)

    def summary(self) -> dict[str, Any]:
        return {
            "shared": self.shared(),
            "distinct": {l: self.distinct(l) for l in self.labels},
        }

    # -- persistence -------------------------------------------------------------------------
    def save(self, out: str | os.PathLike) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        cols: dict[str, np.ndarray] = {"feature": np.arange(self.d_hidden, dtype=np.int64)}
        for i, l in enumerate(self.labels):
            cols[f"mean:{l}"] = self.mean[i].astype(np.float32)
        for i, l in enumerate(self.labels):
            cols[f"freq:{l}"] = self.freq[i].astype(np.float32)
        tmp = out / (PROFILES_FILE + ".tmp")
        # float columns hardly repeat: dictionary encoding only costs time (4x slower to write)
        pq.write_table(pa.table(cols), tmp, use_dictionary=False, compression="zstd")
        os.replace(tmp, out / PROFILES_FILE)
        meta = {
            "format_version": FORMAT_VERSION,
            "labels": self.labels,
            "counts": {l: int(c) for l, c in zip(self.labels, self.counts)},
            "skipped": self.skipped,
            "source": self.source,
            "thresholds": self.thresholds,
            "top_k": self.top_k,
            "encoder": self.encoder_info.to_dict() if self.encoder_info else None,
            "sae": self.sae,
            "d_hidden": self.d_hidden,
            "profiles_layout": "wide: row j = feature j; columns feature, mean:<label>, freq:<label>",
            **self.summary(),
        }
        write_json_atomic(out / LABELS_FILE, meta)
        self.dir = out
        return out

    @classmethod
    def load(
        cls, dir: str | os.PathLike, sae=None, encoder_info: EncoderInfo | None = None
    ) -> "LabelProfiles":
        """Load profiles; with ``sae`` (a TopKSAE or an SAE dir) and/or ``encoder_info``, refuse a
        mismatch naming both sides."""
        import pandas as pd

        d = Path(dir)
        if not (d / LABELS_FILE).exists() or not (d / PROFILES_FILE).exists():
            raise SaefeError(f"no label profiles at {d}; build them with `saefe labels`")
        meta = read_json(d / LABELS_FILE)
        enc = EncoderInfo.from_dict(meta["encoder"]) if meta.get("encoder") else None
        ident = meta.get("sae") or {}
        if encoder_info is not None and enc is not None:
            enc.check_compatible(encoder_info, f"the label profiles at {d}", "the index")
        if sae is not None:
            _check_sae(d, ident, enc, sae)
        df = pd.read_parquet(d / PROFILES_FILE)
        labels = list(meta["labels"])
        missing = [l for l in labels if f"mean:{l}" not in df.columns or f"freq:{l}" not in df.columns]
        if missing:
            raise SaefeError(f"label profiles at {d} are damaged: no columns for {missing[:3]}")
        if len(df) != int(meta.get("d_hidden", len(df))):
            raise SaefeError(f"label profiles at {d} are damaged: {len(df)} rows, expected {meta['d_hidden']}")
        h = len(df)
        mean = np.stack([df[f"mean:{l}"].to_numpy(np.float32) for l in labels]) if labels else np.zeros((0, h), np.float32)
        freq = np.stack([df[f"freq:{l}"].to_numpy(np.float32) for l in labels]) if labels else np.zeros((0, h), np.float32)
        return cls(
            labels=labels, mean=mean, freq=freq,
            counts=np.array([meta["counts"][l] for l in labels], dtype=np.int64),
            source=meta.get("source", {}), encoder_info=enc, sae=ident,
            skipped=list(meta.get("skipped", [])), thresholds=meta.get("thresholds", {}),
            top_k=int(meta.get("top_k", DEFAULT_TOP_K)), dir=d,
        )


def _describe(ident: dict[str, Any]) -> str:
    cfg = ident.get("config", {})
    parts = []
    if ident.get("sha256"):
        parts.append(f"sha256 {ident['sha256'][:12]}")
    elif ident.get("fingerprint"):
        parts.append(f"fingerprint {ident['fingerprint'][:12]}")
    parts.append(f"d_hidden {cfg.get('d_hidden')}, k {cfg.get('top_k')}")
    name = f"{ident['name']!r} " if ident.get("name") else ""
    return f"{name}({', '.join(parts)})"


def _check_sae(d: Path, ident: dict[str, Any], enc: EncoderInfo | None, sae) -> None:
    from dataclasses import asdict

    if isinstance(sae, (str, os.PathLike)):
        p = Path(sae)
        cfg_path = p / "config.json"
        if not cfg_path.exists():
            raise SaefeError(f"no SAE at {p} (expected config.json and model.safetensors)")
        cfg = read_json(cfg_path)
        theirs: dict[str, Any] = {"name": p.resolve().name, "config": cfg.get("sae", {})}
        their_enc = EncoderInfo.from_dict(cfg["encoder"]) if cfg.get("encoder") else None
        same = theirs["config"] == ident.get("config", theirs["config"])
        if same and ident.get("sha256") and (p / "model.safetensors").exists():
            theirs["sha256"] = file_sha256(p / "model.safetensors")
            same = theirs["sha256"] == ident["sha256"]
        elif same and ident.get("fingerprint"):
            from saefe.sae.model import TopKSAE

            theirs["fingerprint"] = sae_fingerprint(TopKSAE.from_pretrained(p))
            same = theirs["fingerprint"] == ident["fingerprint"]
    else:
        theirs = {"config": asdict(sae.config), "fingerprint": sae_fingerprint(sae)}
        their_enc = sae.encoder_info
        same = theirs["config"] == ident.get("config", theirs["config"]) and (
            not ident.get("fingerprint") or theirs["fingerprint"] == ident["fingerprint"]
        )
    if enc is not None and their_enc is not None:
        enc.check_compatible(their_enc, f"the label profiles at {d}", "the SAE")
    if not same:
        mine = dict(ident)
        if "sha256" not in theirs:
            mine.pop("sha256", None)
        raise IncompatibleError(
            f"the label profiles at {d} were made with SAE {_describe(mine)} but the SAE given is "
            f"{_describe(theirs)}; rebuild them with `saefe labels`"
        )


# -- building -----------------------------------------------------------------------------


def build_profiles(
    store,
    sae,
    membership: Membership | np.ndarray,
    label_names: Sequence[str] | None = None,
    source: dict[str, Any] | MembershipReport | str | None = None,
    *,
    codes=None,
    sae_dir: str | os.PathLike | None = None,
    top_k: int = DEFAULT_TOP_K,
) -> LabelProfiles:
    """Profile every label of ``membership`` (a Membership, or an (N, L) bool matrix with
    ``label_names``) on the store's SAE codes (``codes``, else the stored codes, else encoded now)."""
    thresholds: dict[str, str] = {}
    if isinstance(membership, Membership):
        matrix, names, report = membership.matrix, list(membership.labels), membership.report
        source = source if source is not None else report
    else:
        matrix, names = np.asarray(membership, dtype=bool), list(label_names or [])
    if isinstance(source, MembershipReport):
        thresholds = dict(source.thresholds)
        source = source.to_dict()
    elif isinstance(source, str):
        source = {"kind": source}
    source = dict(source or {})
    thresholds = thresholds or dict(source.get("thresholds", {}))
    n = len(store.vectors)
    if matrix.ndim != 2 or matrix.shape[0] != n or matrix.shape[1] != len(names):
        raise SaefeError(
            f"membership matrix has shape {matrix.shape}, expected ({n}, {len(names)}) for this index and labels"
        )
    if len(set(names)) != len(names):
        raise CorpusError(f"duplicate label names: {sorted({x for x in names if names.count(x) > 1})}")
    sae.check_input(store.encoder_info, int(store.vectors.shape[1]), f"the index at {getattr(store, 'dir', '?')}")
    counts = matrix.sum(axis=0)
    skipped = [l for l, c in zip(names, counts) if c == 0]
    if skipped:
        log.warning("labels with no image in the corpus are skipped: %s", ", ".join(skipped))
    keep = [i for i, c in enumerate(counts) if c > 0]
    if not keep:
        raise CorpusError("no label has any image in the corpus; nothing to profile")
    if codes is None:
        codes = load_or_compute_codes(store, sae, sae_dir)
    if codes.shape != (n, sae.config.d_hidden):
        raise IncompatibleError(f"SAE codes have shape {codes.shape}, expected ({n}, {sae.config.d_hidden})")
    mean, freq, cnt = profile_arrays(codes, matrix[:, keep])
    return LabelProfiles(
        labels=[names[i] for i in keep], mean=mean, freq=freq, counts=cnt, source=source,
        encoder_info=store.encoder_info, sae=sae_identity(sae, sae_dir), skipped=skipped,
        thresholds={k: v for k, v in thresholds.items() if k in {names[i] for i in keep}}, top_k=top_k,
    )
