"""The embedding store: fp16 vectors (memory-mapped), a Parquet metadata table, a manifest.

Builds write *chunks* first (``chunks/NNNNNN.{npy,parquet,json}``; the JSON is written last
and is the commit marker), so a build killed at any instant resumes from its committed chunks
without re-embedding them and without duplicates. ``finalise`` streams the chunks into the
final ``vectors.npy`` and ``metadata.parquet``; only then is the manifest marked complete.

Generations: an incremental update (saefe.ingest.update) writes a complete, self-contained copy
of the data files into ``gen-NNNNNN/`` and then switches the top-level manifest (one atomic
rename) to point at it with ``data_dir``. Readers resolve every data file through the manifest
they read (``resolve_data_dir``), so they see the old generation or the new one, never a mix.
A first build writes its files at the top level (``data_dir`` absent = ".").
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from saefe.errors import CorpusError, IncompatibleError
from saefe.manifest import FORMAT_VERSION, EncoderInfo, read_json, write_json_atomic

MANIFEST = "manifest.json"
VECTORS = "vectors.npy"
METADATA = "metadata.parquet"
CHUNKS = "chunks"
# Everything one generation owns (what an update writes into gen-NNNNNN/ and later deletes). An
# index kind that keeps extra files beside index.faiss (on-disk inverted lists) adds them here.
DATA_FILES = (VECTORS, METADATA, "index.faiss", "index.json", "attributes.parquet", "attributes.json",
              "skipped.parquet", "remap.npy", "codes", "estimated_demographics.parquet")


class EmbeddingStore:
    """A finished store; ``vectors`` is an fp16 memmap so a million rows cost no RAM to open."""

    def __init__(self, dir: Path, vectors: np.ndarray, metadata: pd.DataFrame, manifest: dict[str, Any],
                 data: Path | None = None):
        self.dir = dir
        self.data = data if data is not None else dir  # where this generation's files live
        self.vectors = vectors
        self.metadata = metadata
        self.manifest = manifest
        self.encoder_info = EncoderInfo.from_dict(manifest["encoder"])

    @classmethod
    def open(cls, dir: str | os.PathLike) -> "EmbeddingStore":
        d = Path(dir)
        mpath = d / MANIFEST
        if not mpath.exists():
            hint = " (a build was interrupted: run the same build command again to resume)" if (d / CHUNKS).exists() else ""
            raise CorpusError(
                f"no index at {d}{hint}; build one with `python scripts/build_index.py` "
                "(demo) or `saefe build --images DIR --out DIR`"
            )
        manifest = read_json(mpath)
        if not manifest.get("complete"):
            raise CorpusError(f"index at {d} is incomplete; run its build command again to finish it")
        if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
            raise CorpusError(f"index at {d} has format {manifest['format_version']}, newer than this saefe")
        data = resolve_data_dir(d, manifest)
        vectors = np.load(data / VECTORS, mmap_mode="r", allow_pickle=False)
        metadata = pd.read_parquet(data / METADATA)
        if vectors.shape[0] != len(metadata) or vectors.shape[0] != int(manifest["count"]):
            raise CorpusError(
                f"index at {d} is inconsistent: {vectors.shape[0]} vectors, {len(metadata)} metadata "
                f"rows, manifest count {manifest['count']}"
            )
        return cls(d, vectors, metadata, manifest, data)

    @property
    def generation(self) -> int:
        """Counter bumped by every switch to a new generation (0: a first build)."""
        return int(self.manifest.get("generation", 0))

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def row(self, i: int) -> dict[str, Any]:
        """Metadata of vector i as plain JSON-able Python values."""
        rec = self.metadata.iloc[int(i)].to_dict()
        return {k: _plain(v) for k, v in rec.items()}

    def rows(self, ids: Iterable[int]) -> list[dict[str, Any]]:
        """Metadata of many rows in one pandas call, plus ``image_path`` where local."""
        ids = [int(i) for i in ids]
        recs = self.metadata.iloc[ids].to_dict("records") if ids else []
        base = self._image_base()
        out = []
        for rec in recs:
            rec = {k: _plain(v) for k, v in rec.items()}
            rel = rec.get("path")
            if base is not None and isinstance(rel, str):
                rec["image_path"] = os.path.normpath(os.path.join(base, rel))
            out.append(rec)
        return out

    def _image_base(self) -> str | None:
        if getattr(self, "_base", None) is None:
            root = self.manifest.get("corpus_root_rel")
            if root is not None:
                self._base = str((self.dir / root).resolve())
            elif self.manifest.get("corpus_root"):
                self._base = str(Path(self.manifest["corpus_root"]).resolve())
            else:
                self._base = ""
        return self._base or None

    def image_path(self, i: int) -> Path | None:
        """Absolute path of image i on this machine, when the corpus was a local folder."""
        rel = self.metadata.iloc[int(i)].get("path") if "path" in self.metadata.columns else None
        if rel is None or (isinstance(rel, float) and np.isnan(rel)):
            return None
        root = self.manifest.get("corpus_root_rel")
        base = (self.dir / root) if root is not None else Path(self.manifest.get("corpus_root", "."))
        return (base / str(rel)).resolve()

    def vectors_f32(self, ids: Iterable[int] | None = None) -> np.ndarray:
        v = self.vectors if ids is None else self.vectors[np.asarray(list(ids), dtype=np.int64)]
        return np.asarray(v, dtype=np.float32)


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and np.isnan(v):
        return None
    return v


def write_store(
    dir: str | os.PathLike,
    vectors: np.ndarray,
    metadata: pd.DataFrame | None,
    encoder_info: EncoderInfo,
    extra_manifest: dict[str, Any] | None = None,
) -> EmbeddingStore:
    """Write a complete store in one go (precomputed imports, tests)."""
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[1] != encoder_info.embedding_dim:
        raise IncompatibleError(
            f"vectors have shape {vectors.shape}, expected (N, {encoder_info.embedding_dim}) for "
            f"encoder {encoder_info.model_id!r}"
        )
    if metadata is None:
        metadata = pd.DataFrame({"id": np.arange(len(vectors))})
    if len(metadata) != len(vectors):
        raise CorpusError(f"{len(vectors)} vectors but {len(metadata)} metadata rows")
    _save_npy_atomic(d / VECTORS, vectors.astype(np.float16))
    _save_parquet_atomic(d / METADATA, metadata.reset_index(drop=True))
    manifest = {
        "format_version": FORMAT_VERSION,
        "encoder": encoder_info.to_dict(),
        "count": int(len(vectors)),
        "dim": int(vectors.shape[1]),
        "complete": True,
        **(extra_manifest or {}),
    }
    write_json_atomic(d / MANIFEST, manifest)
    if not manifest["complete"]:  # the caller finishes it (e.g. adds the FAISS index first)
        return None  # type: ignore[return-value]
    return EmbeddingStore.open(d)


def _save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_parquet_atomic(path: Path, df: pd.DataFrame) -> None:
    tmp = path.with_name(path.name + ".tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


@dataclass
class ChunkInfo:
    chunk_id: int
    count: int
    skipped: list[dict[str, str]] = field(default_factory=list)


class ChunkWriter:
    """Committed, resumable build output. A chunk exists iff its JSON marker exists."""

    def __init__(self, dir: str | os.PathLike, build_key: dict[str, Any]):
        self.dir = Path(dir)
        self.chunks = self.dir / CHUNKS
        self.chunks.mkdir(parents=True, exist_ok=True)
        keyfile = self.chunks / "build.json"
        if keyfile.exists():
            old = read_json(keyfile)
            if old != build_key:
                raise IncompatibleError(
                    f"{self.dir} holds an unfinished build with different settings ({_diff(old, build_key)}); "
                    "run that build again to finish it, or delete the directory to start over"
                )
        else:
            write_json_atomic(keyfile, build_key)

    def _p(self, cid: int, ext: str) -> Path:
        return self.chunks / f"{cid:06d}.{ext}"

    def committed(self) -> dict[int, ChunkInfo]:
        out = {}
        for p in sorted(self.chunks.glob("[0-9]*.json")):
            info = read_json(p)
            out[int(p.stem)] = ChunkInfo(int(p.stem), int(info["count"]), info.get("skipped", []))
        return out

    def commit(self, cid: int, vectors: np.ndarray, metadata: pd.DataFrame, skipped: list[dict[str, str]]) -> None:
        if len(vectors) != len(metadata):
            raise ValueError("vectors and metadata disagree in length")
        _save_npy_atomic(self._p(cid, "npy"), np.asarray(vectors, dtype=np.float16))
        _save_parquet_atomic(self._p(cid, "parquet"), metadata.reset_index(drop=True))
        write_json_atomic(self._p(cid, "json"), {"count": int(len(vectors)), "skipped": skipped})

    def metadata(self, cid: int) -> pd.DataFrame:
        return pd.read_parquet(self._p(cid, "parquet"))

    def finalise(self, encoder_info: EncoderInfo, extra_manifest: dict[str, Any]) -> tuple[int, list[dict[str, str]]]:
        """Stream committed chunks into vectors.npy + metadata.parquet. Returns (count, skips)."""
        chunks = self.committed()
        total = sum(c.count for c in chunks.values())
        dim = encoder_info.embedding_dim
        tmp = self.dir / (VECTORS + ".tmp")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(total, dim))
        metas, skips, pos = [], [], 0
        for cid in sorted(chunks):
            c = chunks[cid]
            if c.count:
                out[pos : pos + c.count] = np.load(self._p(cid, "npy"), allow_pickle=False)
                metas.append(self.metadata(cid))
            pos += c.count
            skips.extend(c.skipped)
        out.flush()
        del out
        os.replace(tmp, self.dir / VECTORS)
        meta = pd.concat(metas, ignore_index=True) if metas else pd.DataFrame()
        _save_parquet_atomic(self.dir / METADATA, meta)
        return total, skips

    def remove(self) -> None:
        shutil.rmtree(self.chunks, ignore_errors=True)


def _diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys[:3])


def write_manifest(dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    write_json_atomic(Path(dir) / MANIFEST, manifest)


def read_manifest(dir: str | os.PathLike) -> dict[str, Any] | None:
    p = Path(dir) / MANIFEST
    return read_json(p) if p.exists() else None


def set_manifest_setting(dir: str | os.PathLike, key: str, value: Any) -> None:
    """Set one top-level setting (e.g. ``dedup_threshold``) on the manifest now on disk; an
    update keeps it (saefe.ingest.generation.STICKY)."""
    m = read_manifest(dir)
    if m is None:
        raise CorpusError(f"no index at {dir}")
    m[key] = value
    write_manifest(dir, m)


def resolve_data_dir(dir: str | os.PathLike, manifest: dict[str, Any] | None = None) -> Path:
    """The folder holding the data files of the generation ``manifest`` (default: the one on disk
    now) points at. Pass the manifest you already read, so that every file comes from one generation."""
    d = Path(dir)
    if manifest is None:
        try:
            manifest = read_manifest(d)
        except (OSError, ValueError):
            manifest = None
    sub = (manifest or {}).get("data_dir")
    if not sub or sub == ".":
        return d
    if "/" in sub or "\\" in sub or sub.startswith("."):
        raise CorpusError(f"index at {d} names a bad data_dir {sub!r} in its manifest")
    return d / sub
