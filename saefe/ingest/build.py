"""Build an index dir: corpus -> encoder -> embedding store -> FAISS index.

Work is committed in numbered chunks of the corpus' fixed order, so a build killed at any point
(kill -9 included) is finished by running the same command again: committed chunks are neither
re-embedded nor duplicated. Bad images are skipped with a logged reason and counted in the
summary and the manifest. With no source given it builds the offline demo.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from saefe.ingest.corpus import FolderCorpus, HFDatasetCorpus, ImageCorpus, read_precomputed
from saefe.errors import CorpusError, IncompatibleError, SaefeError
from saefe.ingest.loader import ChunkLoader, load_item
from saefe.ingest.index import KINDS, IndexConfig, VectorIndex
from saefe.manifest import FORMAT_VERSION, EncoderInfo
from saefe.ingest.store import ChunkWriter, EmbeddingStore, read_manifest, write_manifest, write_store
from saefe.ingest.models import canonical_model_id
from saefe.ingest.cost import CostEstimate, format_rate

log = logging.getLogger(__name__)



@dataclass
class BuildConfig:
    out: str
    images: str | None = None
    dataset: str | None = None
    split: str = "train"
    image_column: str | None = None
    dataset_builder: str | None = None
    embeddings: str | None = None
    metadata: str | None = None
    model: str = "demo"
    clip_server: str | None = None
    device: str | None = None
    index: IndexConfig = field(default_factory=IndexConfig)
    chunk_size: int = 1024
    loader_workers: int = 0  # threads that read/decode/pre-process ahead of the model (0: one per core)
    force: bool = False
    progress: bool = True


@dataclass
class BuildSummary:
    out: str
    count: int
    skipped: dict[str, int]
    duplicates: int
    seconds: float
    embedded_now: int
    index_type: str
    already_built: bool = False
    extras: dict[str, str] = field(default_factory=dict)
    # Wall time of the embedding loop alone (decode + model), without model load and index build:
    # what the images/s figure is computed from.
    embed_seconds: float = 0.0

    def lines(self) -> list[str]:
        done = f"embedded this run: {self.embedded_now} in {self.seconds:.1f}s"
        if self.embedded_now and self.embed_seconds > 0:
            done += f" ({format_rate(self.embedded_now / self.embed_seconds)} img/s while embedding)"
        out = [
            f"index: {self.out}  ({self.count} images, index type {self.index_type})",
            done + ("  [already complete]" if self.already_built else ""),
            f"duplicates stored once: {self.duplicates}",
            "skipped: " + (", ".join(f"{r}: {n}" for r, n in sorted(self.skipped.items())) or "none"),
        ]
        out += [f"{k}: {v}" for k, v in self.extras.items()]
        return out


def _open_corpus(cfg: BuildConfig) -> ImageCorpus:
    if cfg.images:
        return FolderCorpus.scan(cfg.images)
    return HFDatasetCorpus.load(cfg.dataset, cfg.split, cfg.image_column, cfg.dataset_builder)


def _build_key(cfg: BuildConfig, corpus: ImageCorpus) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "source_kind": corpus.kind,
        "source": corpus.source,
        "items": len(corpus),
        "model": canonical_model_id(cfg.model),
        "clip_server": cfg.clip_server,
        "chunk_size": cfg.chunk_size,
    }


def _load_item(corpus: ImageCorpus, i: int) -> tuple[int, Any, dict[str, Any], str | None]:
    """Read + hash + decode one item (full-size decode). Returns (i, image|None, meta, skip)."""
    return load_item(corpus, i)


def _item_key(meta: dict[str, Any], i: int) -> str:
    return str(meta.get("path") or meta.get("url") or meta.get("key") or i)


def build_index(cfg: BuildConfig) -> BuildSummary:
    """Run (or resume, or confirm) a build; see the module docstring."""
    if cfg.chunk_size < 1:
        raise SaefeError("chunk size must be at least 1")
    out = Path(cfg.out)
    if not (cfg.images or cfg.dataset or cfg.embeddings):
        raise SaefeError("no source: pass --images DIR, --dataset DIR or --embeddings FILE")
    if cfg.embeddings:
        return _import_embeddings(cfg)
    t0 = time.time()
    corpus = _open_corpus(cfg)
    key = _build_key(cfg, corpus)
    done = read_manifest(out)
    if done and done.get("complete"):
        if done.get("build_key") == key and not cfg.force:
            return _summary_of(out, done, 0, time.time() - t0, already=True)
        if not cfg.force:
            raise IncompatibleError(
                f"{out} already holds an index built from {done.get('build_key', {}).get('source')!r} with "
                f"{done['encoder']['model_id']!r}; pass --force to replace it or choose another --out"
            )
    if cfg.force:
        for name in ("manifest.json", "vectors.npy", "metadata.parquet", "index.faiss", "index.json", "chunks"):
            p = out / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    writer = ChunkWriter(out, key)
    committed = writer.committed()
    n = len(corpus)
    nchunks = (n + cfg.chunk_size - 1) // cfg.chunk_size
    todo = [c for c in range(nchunks) if c not in committed]
    if committed:
        log.info("resuming %s: %d of %d chunks already committed", out, len(committed), nchunks)
    seen: set[str] = set()
    for cid in committed:
        if committed[cid].count:
            seen.update(writer.metadata(cid)["sha256"].tolist())
    embedded = 0
    embed_s = 0.0
    encoder = None
    if todo:
        from saefe.ingest.encoder import load_encoder

        encoder = load_encoder(cfg.model, cfg.clip_server, cfg.device)
        _check_encoder_stable(out, encoder.info)
        t_embed = time.time()
        embedded = _embed_chunks(cfg, corpus, writer, todo, committed, seen, encoder)
        embed_s = time.time() - t_embed
    info = encoder.info if encoder else EncoderInfo.from_dict(_read_encoder(out))
    total, skips = writer.finalise(info, {})
    if total == 0:
        raise CorpusError(f"no usable images in {corpus.source}: all {n} were skipped ({_reasons(skips)})")
    store_vectors = np.load(out / "vectors.npy", mmap_mode="r")
    vi = VectorIndex.build(store_vectors, cfg.index, progress=cfg.progress)
    vi.save(out)
    reasons = Counter(s["reason"] for s in skips)
    dups = reasons.pop("duplicate", 0)
    manifest = {
        "format_version": FORMAT_VERSION,
        "encoder": info.to_dict(),
        "count": int(total),
        "dim": info.embedding_dim,
        "index_type": vi.kind,
        "index_params": vi.params,
        "source_kind": corpus.kind,
        "corpus_root": corpus.source,
        "skipped": dict(reasons),
        "skipped_items": [s for s in skips if s["reason"] != "duplicate"][:1000],
        "duplicates": int(dups),
        "build_key": key,
        "complete": True,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    try:
        manifest["corpus_root_rel"] = str(Path(corpus.source).resolve().relative_to(out.resolve()))
    except ValueError:
        pass
    write_manifest(out, manifest)
    writer.remove()
    return _summary_of(out, manifest, embedded, time.time() - t0, embed_seconds=embed_s)


def _embed_chunks(cfg, corpus, writer, todo, committed, seen, encoder) -> int:
    from tqdm import tqdm

    n = len(corpus)
    done_items = sum(min(cfg.chunk_size, n - c * cfg.chunk_size) for c in committed)
    bar = tqdm(total=n, initial=done_items, unit="img", desc="embedding", disable=not cfg.progress, smoothing=0.1)
    embedded = 0
    cost = CostEstimate(images=n - done_items, device=getattr(encoder, "device", None), remote=bool(cfg.clip_server))

    # A local SigLIP's processor runs in the loader thread too, so on a GPU the (PIL-bound,
    # single-threaded) pre-processing of chunk i+1 overlaps the model's work on chunk i.
    preprocess = getattr(encoder, "preprocess_cpu", None)

    def load_chunk(pool, cid):
        return pool.load(cid * cfg.chunk_size, min(n, (cid + 1) * cfg.chunk_size))

    draft = tuple(encoder.info.image_size) if (preprocess is not None and encoder.info.image_size) else None
    with ChunkLoader(corpus, preprocess, draft, cfg.loader_workers) as pool, \
            ThreadPoolExecutor(max_workers=1) as prefetch:
        future = prefetch.submit(load_chunk, pool, todo[0])
        for j, cid in enumerate(todo):
            items, px = future.result()
            if j + 1 < len(todo):  # decode the next chunk while this one is embedded
                future = prefetch.submit(load_chunk, pool, todo[j + 1])
            images, metas, skipped, keep = [], [], [], []
            for i, img, meta, reason in items:
                if reason is None and meta["sha256"] in seen:
                    reason = "duplicate"
                if img is not None:  # one flag per decoded image, aligned with ``px``
                    keep.append(reason is None)
                if reason is not None:
                    skipped.append({"item": _item_key(meta, i), "reason": reason})
                    if reason != "duplicate":
                        log.warning("skipped %s: %s", _item_key(meta, i), reason)
                    continue
                seen.add(meta["sha256"])
                images.append(img)
                metas.append(meta)
            if not images:
                vecs = np.zeros((0, encoder.info.embedding_dim), np.float32)
            elif px is not None:
                import torch

                vecs = encoder.embed_pixels(px[torch.tensor(keep)], on_batch=cost.observe)
            else:
                t_chunk = time.perf_counter()
                vecs = encoder.embed_images(images)
                cost.observe(len(images), time.perf_counter() - t_chunk)
            if vecs.shape[1] != encoder.info.embedding_dim:
                raise IncompatibleError(f"encoder returned dimension {vecs.shape[1]}, expected {encoder.info.embedding_dim}")
            writer.commit(cid, vecs, pd.DataFrame(metas), skipped)
            embedded += len(images)
            bar.update(len(items))
    bar.close()
    return embedded


def _check_encoder_stable(out: Path, info: EncoderInfo) -> None:
    """A resumed build must use the encoder its committed chunks were made with."""
    from saefe.manifest import read_json, write_json_atomic

    p = out / "chunks" / "encoder.json"
    if p.exists():
        EncoderInfo.from_dict(read_json(p)).check_compatible(info, f"the unfinished build in {out}", "this run's encoder")
    else:
        write_json_atomic(p, info.to_dict())


def _read_encoder(out: Path) -> dict[str, Any]:
    from saefe.manifest import read_json

    return read_json(out / "chunks" / "encoder.json")


def _reasons(skips: list[dict[str, str]]) -> str:
    return ", ".join(f"{r}: {c}" for r, c in Counter(s["reason"] for s in skips).most_common()) or "none"


def _summary_of(out: Path, manifest: dict, embedded: int, secs: float, already: bool = False,
                embed_seconds: float = 0.0) -> BuildSummary:
    return BuildSummary(
        out=str(out),
        count=int(manifest["count"]),
        skipped=dict(manifest.get("skipped", {})),
        duplicates=int(manifest.get("duplicates", 0)),
        seconds=secs,
        embedded_now=embedded,
        index_type=str(manifest.get("index_type")),
        already_built=already,
        embed_seconds=embed_seconds,
    )


def _import_embeddings(cfg: BuildConfig) -> BuildSummary:
    """Precomputed vectors: validated, L2-normalised, stored in fp16; nothing is re-embedded."""
    t0 = time.time()
    vecs, meta = read_precomputed(cfg.embeddings, cfg.metadata)
    model_id = canonical_model_id(cfg.model)
    out = Path(cfg.out)
    done = read_manifest(out)
    if done and done.get("complete") and not cfg.force:
        raise IncompatibleError(f"{out} already holds an index; pass --force to replace it or choose another --out")
    v = np.asarray(vecs, dtype=np.float32)
    finite = np.isfinite(v).all(axis=1)
    norms = np.linalg.norm(v, axis=1)
    ok = finite & (norms > 0)
    skipped = {}
    if (~finite).any():
        skipped["non-finite vector"] = int((~finite).sum())
    if (finite & (norms == 0)).any():
        skipped["zero vector"] = int((finite & (norms == 0)).sum())
    for i in np.flatnonzero(~ok)[:20]:
        log.warning("skipped row %d: %s", i, "non-finite vector" if not finite[i] else "zero vector")
    if not ok.any():
        raise CorpusError(f"no usable vectors in {cfg.embeddings}")
    v = v[ok] / norms[ok, None]
    meta = meta[ok].reset_index(drop=True)
    info = EncoderInfo(model_id=model_id, embedding_dim=int(v.shape[1]))
    write_store(out, v, meta, info, {"source_kind": "embeddings", "corpus_root": str(Path(cfg.embeddings).resolve().parent),
                                     "skipped": skipped, "duplicates": 0, "complete": False})
    vi = VectorIndex.build(np.load(out / "vectors.npy", mmap_mode="r"), cfg.index, progress=cfg.progress)
    vi.save(out)
    m = read_manifest(out)
    m.update(index_type=vi.kind, index_params=vi.params, complete=True)
    write_manifest(out, m)
    return _summary_of(out, m, 0, time.time() - t0)
