"""Labels from text prompts: each label's members are the images nearest to its prompt's text
embedding (for corpora without annotations), and the prompt-file reader (JSON or CSV/TSV).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import numpy as np

from saefe.errors import CorpusError, IncompatibleError, SaefeError
from saefe.labels.annotations import Membership, MembershipReport
from saefe.labels.profiles import DEFAULT_TOP_N


def _exact_search(vectors, q: np.ndarray, k: int, chunk: int = 65536) -> np.ndarray:
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for off in range(0, len(vectors), chunk):
        s = q @ np.asarray(vectors[off : off + chunk], dtype=np.float32).T
        cs = np.concatenate([best_s, s], 1)
        ci = np.concatenate([best_i, np.broadcast_to(np.arange(off, off + s.shape[1]), s.shape)], 1)
        kk = min(k, cs.shape[1])
        part = np.argpartition(-cs, kk - 1, axis=1)[:, :kk]
        best_s, best_i = np.take_along_axis(cs, part, 1), np.take_along_axis(ci, part, 1)
    return best_i


def membership_from_texts(
    store, index, encoder, prompts: dict[str, str], top_n: int = DEFAULT_TOP_N
) -> Membership:
    """Label l = the ``top_n`` images nearest to the text embedding of ``prompts[l]``.

    ``index`` is a VectorIndex over the store (None: exact search over the store's vectors)."""
    if not prompts:
        raise CorpusError("no text prompts given")
    if top_n < 1:
        raise SaefeError(f"--top-n must be at least 1, got {top_n}")
    bad = [l for l, p in prompts.items() if not str(l).strip() or not str(p).strip()]
    if bad:
        raise CorpusError(f"empty label or prompt for {bad[:3]}")
    info = getattr(encoder, "info", None)
    if info is not None:
        info.check_compatible(store.encoder_info, "the text encoder", f"the index at {getattr(store, 'dir', '?')}")
    labels = list(prompts)
    q = np.asarray(encoder.embed_texts([prompts[l] for l in labels]), dtype=np.float32)
    if q.shape != (len(labels), store.vectors.shape[1]):
        raise IncompatibleError(
            f"text embeddings have shape {q.shape}, expected ({len(labels)}, {store.vectors.shape[1]})"
        )
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    n = len(store.vectors)
    k = min(int(top_n), n)
    ids = index.search(q, k)[1] if index is not None else _exact_search(store.vectors, q, k)
    matrix = np.zeros((n, len(labels)), dtype=bool)
    for j in range(len(labels)):
        row = np.asarray(ids[j])
        matrix[row[(row >= 0) & (row < n)], j] = True
    report = MembershipReport(
        source="texts", kind="texts", rows=len(labels), matched_rows=len(labels),
        images_labelled=int(matrix.any(axis=1).sum()),
        extra={"prompts": dict(prompts), "top_n": int(top_n), "model": getattr(info, "model_id", None)},
    )
    report.log()
    return Membership(matrix=matrix, labels=labels, report=report)


def read_prompts(path: str | os.PathLike) -> dict[str, str]:
    """JSON ``{label: prompt}`` or lines ``label<TAB>prompt`` (``#`` comments, blank lines ok)."""
    p = Path(path)
    if not p.is_file():
        raise CorpusError(f"prompts file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise CorpusError(f"prompts file {p} is empty")
    if text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise CorpusError(f"prompts file {p} is not valid JSON: {e}") from None
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in obj.items()):
            raise CorpusError(f"prompts file {p} must map label names to prompt strings")
        return dict(obj)
    out: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "\t" not in line:
            raise CorpusError(f"{p}:{lineno}: expected 'label<TAB>prompt', got {line.strip()[:60]!r}")
        label, prompt = line.split("\t", 1)
        out[label.strip()] = prompt.strip()
    return out


# -- CLI ----------------------------------------------------------------------------------
