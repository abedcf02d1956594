"""Build an index dir: corpus -> encoder -> embedding store -> FAISS index.

Work is committed in numbered chunks of the corpus' fixed order, so a build killed at any point
(kill -9 included) is finished by running the same command again: committed chunks are neither
re-embedded nor duplicated. Bad images are skipped with a logged reason and counted in the
summary and the manifest. With no source given it builds the offline demo.

Running the same build on a finished index updates it (saefe.ingest.update): only new and
changed items are embedded, deleted ones are dropped, and the result is switched in as a new
generation. ``--force`` re-embeds everything (also into a new generation, so a running app
keeps a whole index).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from saefe.errors import CorpusError, IncompatibleError, SaefeError
from saefe.ingest.corpus import FolderCorpus, HFDatasetCorpus, ImageCorpus, read_precomputed
from saefe.ingest.cost import CostEstimate, format_rate
from saefe.ingest.encoder import draft_size
from saefe.ingest.index import KINDS, IndexConfig, VectorIndex, build_saved_index
from saefe.ingest.loader import REUSE, ChunkLoader, default_workers
from saefe.ingest.loader_procs import worker_deaths
from saefe.ingest.models import canonical_model_id
from saefe.ingest.store import ChunkWriter, read_manifest, write_manifest, write_store
from saefe.manifest import FORMAT_VERSION, EncoderInfo

log = logging.getLogger(__name__)

__all__ = ["KINDS", "IndexConfig", "BuildConfig", "BuildSummary", "build_index"]

SKIPPED = "skipped.parquet"  # every skipped item with its size/mtime: an update does not re-read them


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
    # >0: that many worker processes instead (loader_procs.py); 0: threads; None: processes on a
    # GPU build, threads on CPUs (see _process_count)
    loader_processes: int | None = None
    batch_size: int = 0  # images per model call (0: 256 on a GPU, 64 on CPUs; encoder.default_batch_size)
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
    update: dict[str, int] | None = None  # added / changed / removed / unchanged (an update)
    index_note: str = ""  # how the index type was chosen (measured recall, speed-up, memory)
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
        ]
        if self.update is not None:
            u = self.update
            out.append(f"update: added {u.get('added', 0)}, changed {u.get('changed', 0)}, removed {u.get('removed', 0)}, "
                       f"unchanged {u.get('unchanged', 0)}" + (f" (generation {u['generation']})" if "generation" in u else ""))
        if self.index_note:
            out.append(f"index choice: {self.index_note}")
        out += [
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


def _item_key(meta: dict[str, Any], i: int) -> str:
    return str(meta.get("path") or meta.get("url") or meta.get("key") or i)


class ChunkEmbedder(Protocol):
    """Turns a build's (or an update's, with its ``plan``) not-yet-committed chunks into
    committed ones (``writer.commit``) instead of this process' loop: saefe.ingest.distributed's
    Ray pipeline. It commits through ``triage`` so both store the same rows and skips."""

    def prepare(self, cfg: BuildConfig) -> EncoderInfo: ...

    def embed(self, cfg: BuildConfig, corpus: ImageCorpus, writer: ChunkWriter, todo: list[int],
              committed: dict, seen: set[str], plan=None) -> int: ...


def build_index(cfg: BuildConfig, embedder: ChunkEmbedder | None = None) -> BuildSummary:
    """Run (or resume, update, or confirm) a build; see the module docstring. ``embedder``: who
    embeds a first build's chunks (default: this process; ``--ray`` passes its pipeline)."""
    if cfg.chunk_size < 1:
        raise SaefeError("chunk size must be at least 1")
    if cfg.loader_workers < 0 or (cfg.loader_processes or 0) < 0:
        raise SaefeError("--loader-workers and --loader-processes must be 0 or more")
    if cfg.batch_size < 0:
        raise SaefeError("--batch-size must be 0 or more (0: the device's default)")
    out = Path(cfg.out)
    if not (cfg.images or cfg.dataset or cfg.embeddings):
        raise SaefeError("no source: pass --images DIR, --dataset DIR or --embeddings FILE")
    if cfg.embeddings:
        return _import_embeddings(cfg)
    corpus = _open_corpus(cfg)
    done = read_manifest(out)
    if done and done.get("complete"):
        from saefe.ingest.update import update_index

        return update_index(cfg, corpus, done, chunk_embedder=embedder)
    t0 = time.time()
    if cfg.force:  # an unfinished first build is started over
        import shutil

        shutil.rmtree(out / "chunks", ignore_errors=True)
    gen = build_generation(cfg, out, corpus, _build_key(cfg, corpus), chunk_embedder=embedder)
    vi = build_saved_index(out, cfg.index, progress=cfg.progress, map_shards=getattr(embedder, "map_shards", None))
    manifest = generation_manifest(gen, corpus, out, vi)
    write_manifest(out, manifest)
    ChunkWriter(out, gen.key).remove()
    return summary_of(out, manifest, gen.embedded, time.time() - t0, embed_seconds=gen.embed_seconds)


@dataclass
class Generation:
    """What ``build_generation`` left in its dir: vectors.npy + metadata.parquet + skipped.parquet."""

    key: dict[str, Any]
    total: int
    skips: list[dict[str, Any]]
    embedded: int
    info: EncoderInfo
    embed_seconds: float = 0.0


def build_generation(cfg: BuildConfig, out: Path, corpus: ImageCorpus, key: dict[str, Any], plan=None,
                     known_info: EncoderInfo | None = None, chunk_embedder: ChunkEmbedder | None = None) -> Generation:
    """Embed ``corpus`` (in its order) into ``out``'s vectors.npy + metadata.parquet through
    committed chunks. With ``plan`` (an update), items the old generation already holds are
    copied from it and the encoder is only loaded if something is left to embed."""
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
    embedder = _Embedder(cfg, out, known_info)
    if todo and chunk_embedder is not None and (plan is None or plan.may_embed()):
        info = chunk_embedder.prepare(cfg)
        if known_info is not None:
            known_info.check_compatible(info, f"the index at {out.parent}", "this run's encoder")
        _check_encoder_stable(out, info)
        t_embed = time.time()
        embedded = chunk_embedder.embed(cfg, corpus, writer, todo, committed, seen, plan)
    else:
        if todo and (plan is None or plan.may_embed()):  # else loaded only if an item needs it after all
            embedder.load()
        t_embed = time.time()  # the images/s figure leaves the model's load out (seconds on a GPU)
        embedded = _embed_chunks(cfg, corpus, writer, todo, committed, seen, embedder, plan) if todo else 0
    embed_s = time.time() - t_embed
    info = embedder.info()
    total, skips = writer.finalise(info, {})
    if total == 0:
        raise CorpusError(f"no usable images in {corpus.source}: all {n} were skipped ({_reasons(skips)})")
    cols = ["item", "reason", "file_size", "mtime_ns", "sha256"]
    skipped = pd.DataFrame([{c: s.get(c) for c in cols} for s in skips], columns=cols).astype(
        {"item": str, "reason": str, "file_size": "Int64", "mtime_ns": "Int64", "sha256": object})
    skipped.to_parquet(out / SKIPPED, index=False)
    return Generation(key, int(total), skips, embedded, info, embed_s if embedded else 0.0)


def generation_manifest(gen: Generation, corpus: ImageCorpus, out: Path, vi: VectorIndex) -> dict[str, Any]:
    reasons = Counter(s["reason"] for s in gen.skips)
    dups = reasons.pop("duplicate", 0)
    manifest = {
        "format_version": FORMAT_VERSION,
        "encoder": gen.info.to_dict(),
        "count": int(gen.total),
        "dim": gen.info.embedding_dim,
        "index_type": vi.kind,
        "index_params": vi.params,
        "source_kind": corpus.kind,
        "corpus_root": corpus.source,
        "skipped": dict(reasons),
        "skipped_items": [{"item": s["item"], "reason": s["reason"]} for s in gen.skips if s["reason"] != "duplicate"][:1000],
        "duplicates": int(dups),
        "build_key": gen.key,
        "complete": True,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    try:
        manifest["corpus_root_rel"] = str(Path(corpus.source).resolve().relative_to(out.resolve()))
    except ValueError:
        pass
    return manifest


class _Embedder:
    """The encoder, loaded on first need (an update that embeds nothing never loads a model)."""

    def __init__(self, cfg: BuildConfig, out: Path, known_info: EncoderInfo | None):
        self.cfg, self.out, self.known = cfg, out, known_info
        self.encoder = None

    def load(self):
        if self.encoder is None:
            from saefe.ingest.encoder import load_encoder

            self.encoder = load_encoder(self.cfg.model, self.cfg.clip_server, self.cfg.device, self.cfg.batch_size)
            if self.known is not None:
                self.known.check_compatible(self.encoder.info, f"the index at {self.out.parent}", "this run's encoder")
            _check_encoder_stable(self.out, self.encoder.info)
        return self.encoder

    def info(self) -> EncoderInfo:
        if self.encoder is not None:
            return self.encoder.info
        p = self.out / "chunks" / "encoder.json"
        if p.exists():
            return EncoderInfo.from_dict(_read_encoder(self.out))
        if self.known is None:
            raise SaefeError(f"no encoder recorded for the build in {self.out}")
        return self.known


def _embed_chunks(cfg, corpus, writer, todo, committed, seen, embedder: _Embedder, plan) -> int:
    from tqdm import tqdm

    n = len(corpus)
    done_items = sum(min(cfg.chunk_size, n - c * cfg.chunk_size) for c in committed)
    bar = tqdm(total=n, initial=done_items, unit="img", desc="embedding", disable=not cfg.progress, smoothing=0.1)
    embedded = 0
    encoder = embedder.encoder
    to_embed = n - done_items if plan is None else plan.estimated_embeds()
    cost = CostEstimate(images=to_embed, device=getattr(encoder, "device", None), remote=bool(cfg.clip_server))

    # A local SigLIP's processor runs in the loader threads too, so on a GPU the (PIL-bound)
    # pre-processing of chunk i+1 overlaps the model's work on chunk i.
    preprocess = getattr(encoder, "preprocess_cpu", None)

    def load_chunk(pool, cid):
        return pool.load(cid * cfg.chunk_size, min(n, (cid + 1) * cfg.chunk_size))

    draft = draft_size(encoder.info) if preprocess is not None else None
    device = getattr(encoder, "device", None)
    with _loader(cfg, corpus, preprocess, draft, plan, todo, device) as pool, ThreadPoolExecutor(max_workers=1) as prefetch, \
            worker_deaths():
        future = prefetch.submit(load_chunk, pool, todo[0])
        for j, cid in enumerate(todo):
            items, px = future.result()
            if j + 1 < len(todo):  # decode the next chunk while this one is embedded
                future = prefetch.submit(load_chunk, pool, todo[j + 1])
            accepted, skipped, keep = triage(items, seen)
            vecs = _vectors_for(accepted, px, keep, embedder, plan, cost)
            metas = []
            for i, _, meta, _ in accepted:
                if plan is not None:
                    meta["_old_row"] = plan.identity_row(i, meta)
                metas.append(meta)
            writer.commit(cid, vecs, pd.DataFrame(metas), skipped)
            embedded += sum(a[3] < 0 for a in accepted)
            bar.update(len(items))
    bar.close()
    return embedded


def _process_count(cfg: BuildConfig, device: str | None) -> int:
    """Loader processes for this build: as asked; by default one per core but two on a GPU (in
    the same H100 calls, 14 processes fed SO400M@384 442-478 images/s, 16 threads 356-442:
    docs/SCALING.md), none on CPUs, where the model is the limit and threads cost no forks."""
    if cfg.loader_processes is not None:
        return cfg.loader_processes
    return max(1, default_workers() - 2) if str(device or "").startswith("cuda") else 0


def _loader(cfg, corpus, preprocess, draft, plan, todo: list[int], device: str | None = None):
    """The CPU side: worker processes when asked for (or by default on a GPU) and possible (a
    local model's pre-processing, not an update), else the thread pool."""
    processes = _process_count(cfg, device)
    if processes > 0:
        if preprocess is not None and plan is None:
            from saefe.ingest.loader_procs import ProcessChunkLoader

            n, cs = len(corpus), cfg.chunk_size
            return ProcessChunkLoader(corpus, preprocess, draft, processes,
                                      [(c * cs, min(n, (c + 1) * cs)) for c in todo])
        if cfg.loader_processes:
            log.info("--loader-processes applies to a full build with a local model; using loader threads")
    return ChunkLoader(corpus, preprocess, draft, cfg.loader_workers, plan)


def triage(items: list, seen: set[str]) -> tuple[list, list[dict[str, Any]], list[bool]]:
    """Decide, in corpus order, what a chunk stores: the first copy of each byte hash (later
    copies become "duplicate" skips), nothing that failed to load. ``items`` are the loader's
    (index, image or None, meta, skip reason or None). Returns (accepted (index, image, meta,
    reuse row or -1), skip records, one keep flag per decoded image); updates ``seen``.
    Shared by this process' loop and the Ray build's writer so both store the same rows."""
    accepted, skipped, keep = [], [], []
    for i, img, meta, reason in items:
        reuse = int(meta.pop(REUSE, -1))
        stale = meta.pop("_kept_stale", None)
        sha = meta.get("sha256")
        if reason is None and sha in seen:
            reason = "duplicate"
        if img is not None:  # one flag per decoded image, aligned with ``px``
            keep.append(reason is None)
        if reason is not None:
            rec = {"item": _item_key(meta, i), "reason": reason}
            keys = ("file_size", "mtime_ns", "sha256") if reason == "duplicate" else ("file_size", "mtime_ns")
            rec.update({k: meta[k] for k in keys if meta.get(k) is not None})
            skipped.append(rec)
            if reason != "duplicate":
                log.warning("skipped %s: %s", rec["item"], reason)
            continue
        if stale:
            skipped.append({"item": _item_key(meta, i), "reason": stale})
        seen.add(sha)
        accepted.append((i, img, meta, reuse))
    return accepted, skipped, keep


def _vectors_for(accepted: list, px, keep: list[bool], embedder: _Embedder, plan, cost: CostEstimate) -> np.ndarray:
    """Rows for the accepted (i, image, meta, reuse) items: copied from the old generation
    (``reuse`` >= 0), or embedded now."""
    fresh = [img for _, img, _, reuse in accepted if reuse < 0]
    new = None
    if fresh:
        enc = embedder.load()
        if px is not None:
            import torch

            new = enc.embed_pixels(px[torch.tensor(keep)], on_batch=cost.observe)
        else:
            t_chunk = time.perf_counter()
            new = enc.embed_images(fresh)
            cost.observe(len(fresh), time.perf_counter() - t_chunk)
        if new.shape[1] != enc.info.embedding_dim:
            raise IncompatibleError(f"encoder returned dimension {new.shape[1]}, expected {enc.info.embedding_dim}")
    dim = new.shape[1] if new is not None else (plan.dim if plan is not None else embedder.info().embedding_dim)
    vecs = np.zeros((len(accepted), dim), np.float32)
    j = 0
    for r, (_, _, _, reuse) in enumerate(accepted):
        if reuse >= 0:
            vecs[r] = plan.vector(reuse)
        else:
            vecs[r] = new[j]
            j += 1
    return vecs


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


def summary_of(out: Path, manifest: dict, embedded: int, secs: float, already: bool = False,
               update: dict[str, int] | None = None, embed_seconds: float = 0.0) -> BuildSummary:
    return BuildSummary(
        out=str(out),
        count=int(manifest["count"]),
        skipped=dict(manifest.get("skipped", {})),
        duplicates=int(manifest.get("duplicates", 0)),
        seconds=secs,
        embedded_now=embedded,
        index_type=str(manifest.get("index_type")),
        already_built=already,
        update=update,
        index_note=str((manifest.get("index_params") or {}).get("choice", "")),
        embed_seconds=embed_seconds,
    )


def clean_vectors(vecs: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Precomputed vectors: (L2-normalised usable rows, mask of usable rows, skip counts)."""
    v = np.asarray(vecs, dtype=np.float32)
    finite = np.isfinite(v).all(axis=1)
    norms = np.linalg.norm(np.where(finite[:, None], v, 0), axis=1)
    ok = finite & (norms > 0)
    skipped = {}
    if (~finite).any():
        skipped["non-finite vector"] = int((~finite).sum())
    if (finite & (norms == 0)).any():
        skipped["zero vector"] = int((finite & (norms == 0)).sum())
    for i in np.flatnonzero(~ok)[:20]:
        log.warning("skipped row %d: %s", i, "non-finite vector" if not finite[i] else "zero vector")
    if not ok.any():
        raise CorpusError(f"no usable vectors in {source}")
    return v[ok] / norms[ok, None], ok, skipped


def _import_embeddings(cfg: BuildConfig) -> BuildSummary:
    """Precomputed vectors: validated, L2-normalised, stored in fp16; nothing is re-embedded.
    Into a finished index, the rows are diffed against it instead (saefe.ingest.update)."""
    t0 = time.time()
    vecs, meta = read_precomputed(cfg.embeddings, cfg.metadata)
    model_id = canonical_model_id(cfg.model)
    out = Path(cfg.out)
    done = read_manifest(out)
    if done and done.get("complete"):
        from saefe.ingest.update import update_from_embeddings

        return update_from_embeddings(cfg, vecs, meta, done)
    v, ok, skipped = clean_vectors(vecs, cfg.embeddings)
    meta = meta[ok].reset_index(drop=True)
    info = EncoderInfo(model_id=model_id, embedding_dim=int(v.shape[1]))
    write_store(out, v, meta, info, {"source_kind": "embeddings", "corpus_root": str(Path(cfg.embeddings).resolve().parent),
                                     "source": str(Path(cfg.embeddings).resolve()),
                                     "skipped": skipped, "duplicates": 0, "complete": False})
    vi = build_saved_index(out, cfg.index, progress=cfg.progress)
    m = read_manifest(out)
    m.update(index_type=vi.kind, index_params=vi.params, complete=True)
    write_manifest(out, m)
    return summary_of(out, m, 0, time.time() - t0)
