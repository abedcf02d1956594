"""The last steps of an update: the new generation's FAISS index and SAE codes, then the switch.

The switch is one atomic rename of the top-level manifest (``write_json_atomic``): a reader that
read the old manifest opens only old files, one that read the new one only new files. The
generation before the switched-out one is deleted; the one just switched out is kept until the
next update, so a reader that read its manifest a moment ago can still open its files.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from saefe.ingest.index import IndexConfig, VectorIndex
from saefe.ingest.store import DATA_FILES, VECTORS, EmbeddingStore, read_manifest, write_manifest
from saefe.manifest import read_json

log = logging.getLogger(__name__)

GEN_PREFIX = "gen-"
STICKY = ("default_sae", "dedup_threshold")  # top-level manifest settings an update keeps
EXTENDABLE = ("flat", "hnsw", "ivf", "ivf-sq8")  # FAISS kinds that take appended rows as they are


def _same_prefix(old: EmbeddingStore, vectors: np.ndarray, old_rows: np.ndarray) -> bool:
    """True when the new generation starts with exactly the old rows, in order, with equal vectors."""
    n_old = len(old)
    if len(old_rows) < n_old or not np.array_equal(old_rows[:n_old], np.arange(n_old)):
        return False
    for lo in range(0, n_old, 65536):
        hi = min(n_old, lo + 65536)
        if not np.array_equal(np.asarray(old.vectors[lo:hi]), np.asarray(vectors[lo:hi])):
            return False
    return True


def _keeps_kind(cfg: IndexConfig, old_kind: str, old_params: dict[str, Any], n_new: int) -> bool:
    """Whether ``auto`` would still pick the old kind without measuring again: exact while the
    corpus is small or when exact won the build-time measurement; the approximate kind above."""
    if cfg.kind != "auto":
        return cfg.kind == old_kind
    if old_kind == "flat":
        return n_new <= cfg.flat_max or bool(old_params.get("fallback"))
    return n_new > cfg.flat_max


def index_for_generation(old: EmbeddingStore, gen_dir: Path, cfg: IndexConfig, old_rows: np.ndarray,
                         n_new: int, progress: bool = False) -> VectorIndex:
    """Extend the old index with the appended rows when the new generation only appended (ids
    stable, no vector changed) and the same kind still fits; else build it from the stored vectors."""
    vectors = np.load(gen_dir / VECTORS, mmap_mode="r")
    old_kind = str(old.manifest.get("index_type", ""))
    if (old_kind in EXTENDABLE and _keeps_kind(cfg, old_kind, old.manifest.get("index_params") or {}, n_new) and (old.data / "index.faiss").exists()
            and _same_prefix(old, vectors, old_rows)):
        vi = VectorIndex.load(old.data, use_gpu=False)
        if vi.ntotal == len(old):
            for lo in range(len(old), n_new, 65536):
                vi.index.add(np.ascontiguousarray(vectors[lo : min(n_new, lo + 65536)], dtype=np.float32))
            vi.params["rows_added_since_build"] = int(vi.params.get("rows_added_since_build", 0)) + n_new - len(old)
            vi.save(gen_dir)
            log.info("extended the %s index with %d rows", vi.kind, n_new - len(old))
            return vi
    vi = VectorIndex.build(vectors, cfg, progress=progress)
    vi.save(gen_dir)
    return vi


def carry_codes(old: EmbeddingStore, new: EmbeddingStore, progress: bool = False) -> dict[str, str]:
    """SAE codes for every SAE the old generation had codes for, re-encoded from the new
    generation's stored vectors (no image is embedded again). Returns notes for the summary."""
    from saefe.sae.codes import CODES_DIR, CODES_JSON, encode_corpus, weights_hash

    notes: dict[str, str] = {}
    root = old.data / CODES_DIR
    if not root.is_dir():
        return notes
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        cj = d / CODES_JSON
        if not cj.exists():
            continue
        meta = read_json(cj)
        sae = meta.get("sae", {})
        sae_dir = Path(sae.get("dir", ""))
        try:
            same = sae_dir.is_dir() and weights_hash(sae_dir) == sae.get("weights_sha256")
        except Exception:  # noqa: BLE001 - any failure means: cannot re-encode
            same = False
        if not same:
            notes[f"SAE codes {d.name}"] = f"not carried: the SAE at {sae_dir} is gone or changed; run `saefe encode-sae`"
            log.warning("SAE codes %s not carried over: the SAE at %s is gone or changed", d.name, sae_dir)
            continue
        encode_corpus(new.dir, sae_dir, progress=progress)
        notes[f"SAE codes {d.name}"] = f"encoded for {len(new)} rows from the stored vectors"
    return notes


def switch_generation(out: Path, gen_dir: Path, manifest: dict[str, Any], g: int) -> dict[str, Any]:
    """Point the top-level manifest at ``gen_dir`` (one rename), then delete older generations."""
    current = read_manifest(out) or {}
    top = dict(manifest)
    top["data_dir"] = gen_dir.name
    top["generation"] = int(g)
    top.pop("corpus_root_rel", None)
    root = top.get("corpus_root")
    if root and top.get("source_kind") != "embeddings":
        try:
            top["corpus_root_rel"] = str(Path(root).resolve().relative_to(out.resolve()))
        except ValueError:
            pass
    for key in STICKY:  # set (perhaps meanwhile) on the top-level manifest, not by the build
        if key in current:
            top[key] = current[key]
        else:
            top.pop(key, None)
    write_manifest(out, top)
    previous = current.get("data_dir") or "."
    _cleanup(out, keep={gen_dir.name, previous})
    return top


def _cleanup(out: Path, keep: set[str]) -> None:
    for p in out.iterdir():
        if p.is_dir() and p.name.startswith(GEN_PREFIX) and p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
    if "." not in keep:  # the first build's files at the top level are two generations old now
        for name in DATA_FILES:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                os.unlink(p)
