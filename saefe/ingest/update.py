"""Incremental builds: the same ``saefe build`` on a finished index embeds only what is new.

The plan (``make_plan``) compares the corpus with the index's current generation:

- folder items are known by path; one whose size and mtime equal the stored ones is unchanged
  and is not even read. Others are read and hashed (sha256): same bytes as a stored row -> that
  row's vector is reused (a touched or renamed file costs no embedding); else embedded.
- dataset items are read and hashed; their identity is their content.
- items skipped last time for bad bytes or as duplicates, with the same size and mtime, are
  skipped again without reading.

The new generation is built in the order *old rows still present (old order), then new items*,
so ids stay stable when nothing was removed (and the FAISS index is then extended, not rebuilt);
removals compact the ids and ``remap.npy`` (old id -> new id, -1 = removed) says how. Vectors,
metadata, index, SAE codes and per-image labels are all written into ``gen-NNNNNN/``, then the
top-level manifest is switched to it in one rename (saefe.ingest.store). An interrupted update
resumes from its committed chunks like a first build; the old generation serves meanwhile.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from saefe.errors import CorpusError, IncompatibleError
from saefe.ingest.build import (SKIPPED, BuildConfig, BuildSummary, _build_key, build_generation, clean_vectors,
                                generation_manifest, summary_of)
from saefe.ingest.loader import REUSE, Item
from saefe.ingest.corpus import FolderCorpus, ImageCorpus, IndexedView
from saefe.ingest.models import canonical_model_id
from saefe.ingest.store import METADATA, EmbeddingStore, _plain, read_manifest, write_manifest, write_store
from saefe.manifest import EncoderInfo, read_json

log = logging.getLogger(__name__)

GEN_PREFIX = "gen-"
REMAP = "remap.npy"
INTERNAL = ("_old_row", "_embedded")  # _embedded: written by chunks of older versions, still dropped on resume
UPDATE_KEYS = ("added", "changed", "removed", "unchanged")
NO_RETRY = ("unreadable", "changed while being read", "kept the previous version")


@dataclass
class ReusePlan:
    """What the old generation can answer for each position of the new build's order."""

    old: EmbeddingStore
    old_rows: np.ndarray  # per position: old row of the same identity (path), or -1
    stats: list  # per position: (size, mtime_ns) or None
    skip_again: dict[int, dict[str, Any]]  # position -> last build's skip record (same size+mtime)
    sha_rows: dict[str, int]  # content -> old row holding it
    by_path: bool
    removed: int
    digest: str

    @property
    def dim(self) -> int:
        return self.old.dim

    def _stat(self, r: int) -> tuple[int, int] | None:
        md = self.old.metadata
        if "file_size" not in md.columns or "mtime_ns" not in md.columns:
            return None
        s, m = md["file_size"].iat[r], md["mtime_ns"].iat[r]
        return None if pd.isna(s) or pd.isna(m) else (int(s), int(m))

    def _old_stats(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(size, mtime_ns, known) per old row, as ``_stat`` reads them (NaN/missing: not known)."""
        s, m = self.old.metadata["file_size"], self.old.metadata["mtime_ns"]
        known = ~(s.isna().to_numpy() | m.isna().to_numpy())
        return s.to_numpy(dtype=np.int64, na_value=0), m.to_numpy(dtype=np.int64, na_value=0), known

    def _skips_again(self, i: int) -> bool:
        """Whether ``before_read`` answers position i from last build's skip record."""
        rec = self.skip_again.get(i)
        st = self.stats[i]
        if rec is None or st is None or st != (rec["file_size"], rec["mtime_ns"]):
            return False
        return rec["reason"] != "duplicate" or rec.get("sha256") in self.sha_rows  # a duplicate while its twin is kept

    @cached_property
    def answered(self) -> np.ndarray:
        """Per position: True where ``before_read`` answers the item without reading it (its
        old row with the same size + mtime, or last build's skip again). Computed once, in
        numpy: the per-item passes (nothing_to_do, estimated_embeds, the Ray rows) only count it."""
        n = len(self.old_rows)
        ans = np.zeros(n, bool)
        pos = np.flatnonzero(self.old_rows >= 0)
        pos = pos[np.fromiter((self.stats[i] is not None for i in pos), bool, len(pos))]
        if len(pos) and "file_size" in self.old.metadata.columns and "mtime_ns" in self.old.metadata.columns:
            rows = self.old_rows[pos]
            try:
                size, mtime, known = self._old_stats()
            except (TypeError, ValueError, OverflowError):  # a column numpy cannot read as int64: row by row
                ans[pos] = [self.stats[i] == self._stat(int(r)) for i, r in zip(pos, rows)]
            else:
                st = np.array([self.stats[i] for i in pos], dtype=np.int64).reshape(len(pos), 2)
                ans[pos] = known[rows] & (size[rows] == st[:, 0]) & (mtime[rows] == st[:, 1])
        for i in self.skip_again:
            ans[i] = ans[i] or self._skips_again(i)
        return ans

    def old_meta(self, r: int) -> dict[str, Any]:
        rec = self.old.metadata.iloc[int(r)].to_dict()
        return {k: _plain(v) for k, v in rec.items() if k not in INTERNAL}

    def vector(self, r: int) -> np.ndarray:
        return np.asarray(self.old.vectors[int(r)], dtype=np.float32)

    def before_read(self, i: int) -> Item | None:
        if not self.answered[i]:  # to be read (most of a first-time or dataset corpus): no pandas work
            return None
        r = int(self.old_rows[i])
        st = self.stats[i]
        if r >= 0 and st is not None and st == self._stat(r):
            return i, None, {**self.old_meta(r), REUSE: r}, None
        if self._skips_again(i):  # same size + mtime as when last build skipped it
            rec = self.skip_again[i]
            meta = {"path": rec["item"], "file_size": st[0], "mtime_ns": st[1]}
            if rec["reason"] != "duplicate":
                return i, None, meta, rec["reason"]
            meta["sha256"] = rec["sha256"]  # a duplicate: still one, as its twin is kept
            r = self.sha_rows[rec["sha256"]]
            meta.update(width=self.old_meta(r).get("width"), height=self.old_meta(r).get("height"))
            return i, None, {**meta, REUSE: r}, None
        return None

    def may_embed(self) -> bool:
        """Whether some item may need the encoder (then it is loaded up front, with its
        pre-processing in the loader threads); False when every item is answered from the index."""
        return self.estimated_embeds() > 0

    def estimated_embeds(self) -> int:
        """Items the plan cannot answer without reading them (at most what gets embedded)."""
        if not self.by_path:
            return len(self.old_rows)
        return int(len(self.answered) - np.count_nonzero(self.answered))

    def on_read_error(self, i: int, reason: str) -> Item | None:
        """A stored item that cannot be read now keeps its old row (and old size/mtime, so the
        next update tries again) instead of disappearing from the index."""
        r = int(self.old_rows[i])
        if r < 0:
            return None
        log.warning("%s: %s; keeping the indexed version", self.old.metadata["path"].iat[r], reason)
        meta = self.old_meta(r)
        meta["_kept_stale"] = f"kept the previous version ({reason})"
        meta[REUSE] = r
        return i, None, meta, None

    def after_hash(self, i: int, meta: dict[str, Any]) -> Item | None:
        r = self.sha_rows.get(meta["sha256"])
        if r is None:
            return None
        old = self.old_meta(r)
        meta["width"], meta["height"] = old.get("width"), old.get("height")
        meta[REUSE] = r
        return i, None, meta, None

    def identity_row(self, i: int, meta: dict[str, Any]) -> int:
        if self.by_path:
            return int(self.old_rows[i])
        return int(self.sha_rows.get(meta.get("sha256"), -1))

    def nothing_to_do(self) -> bool:
        if self.removed or not self.by_path:
            return False
        # every item answered without reading: kept rows, bad files and duplicates as they were
        return bool(self.answered.all())


def _read_skips(data: Path) -> dict[str, dict[str, Any]]:
    p = data / SKIPPED
    if not p.exists():
        return {}
    df = pd.read_parquet(p)
    out = {}
    for rec in df.to_dict("records"):
        if pd.isna(rec.get("file_size")) or pd.isna(rec.get("mtime_ns")) or str(rec["reason"]).startswith(NO_RETRY):
            continue
        rec["file_size"], rec["mtime_ns"] = int(rec["file_size"]), int(rec["mtime_ns"])
        out[str(rec["item"])] = rec
    return out


def make_plan(old: EmbeddingStore, corpus: ImageCorpus) -> tuple[ReusePlan, ImageCorpus]:
    md = old.metadata
    sha_rows = {s: r for r, s in enumerate(md["sha256"].tolist())} if "sha256" in md.columns else {}
    h = hashlib.sha256()
    if isinstance(corpus, FolderCorpus) and "path" in md.columns:
        old_paths = md["path"].astype(str).tolist()
        path_row = {p: r for r, p in enumerate(old_paths)}
        present = {p: ci for ci, p in enumerate(corpus.paths)}
        order = [present[p] for p in old_paths if p in present]
        order += [ci for ci, p in enumerate(corpus.paths) if p not in path_row]
        view = IndexedView(corpus, order)  # old rows first (old order), then new items
        stats = [corpus.stat(ci) for ci in order]
        old_rows = np.array([path_row.get(corpus.paths[ci], -1) for ci in order], dtype=np.int64)
        skips = _read_skips(old.data)
        skip_again = {i: skips[corpus.paths[ci]] for i, ci in enumerate(order)
                      if old_rows[i] < 0 and corpus.paths[ci] in skips}
        for ci, st in zip(order, stats):
            h.update(f"{corpus.paths[ci]}\0{st}\n".encode())
        removed = len(old_paths) - int((old_rows >= 0).sum())
        plan = ReusePlan(old, old_rows, stats, skip_again, sha_rows, True, removed, h.hexdigest())
        return plan, view
    # datasets: every item is read; identity = content
    h.update(f"{corpus.source}\0{len(corpus)}\0{len(old)}".encode())
    plan = ReusePlan(old, np.full(len(corpus), -1, np.int64), [None] * len(corpus), {}, sha_rows, False, 0, h.hexdigest())
    return plan, corpus


def _check_same_source(out: Path, done: dict, kind: str, source: str, model: str, force: bool) -> None:
    key = done.get("build_key") or {}
    old_kind = key.get("source_kind", done.get("source_kind"))
    old_src = key.get("source", done.get("source"))
    if not force and (old_kind != kind or old_src != source):
        raise IncompatibleError(
            f"{out} already holds an index built from {old_src!r} with {done['encoder']['model_id']!r}; "
            "pass --force to replace it or choose another --out")
    old_model = EncoderInfo.from_dict(done["encoder"])
    if not force and old_model.canonical_id != EncoderInfo(model, old_model.embedding_dim).canonical_id:
        raise IncompatibleError(
            f"the index at {out} was made with encoder {old_model.model_id!r} but this run uses {model!r}; "
            "pass the same --model to update it, or --force to rebuild it with the new one (the index is unchanged)")


def update_index(cfg: BuildConfig, corpus: ImageCorpus, done: dict[str, Any], chunk_embedder=None) -> BuildSummary:
    """Bring the finished index at ``cfg.out`` up to date with ``corpus`` (or rebuild it with
    ``cfg.force``) as a new generation; see the module docstring."""
    t0 = time.time()
    out = Path(cfg.out)
    _check_same_source(out, done, corpus.kind, corpus.source, canonical_model_id(cfg.model), cfg.force)
    if getattr(corpus, "errors", None):
        raise CorpusError(f"cannot read {corpus.errors[0]} (and {len(corpus.errors) - 1} more) under {corpus.source}; "
                          f"the index at {out} was left as it was: fix the access rights and run the build again")
    with update_lock(out):
        return _update_locked(cfg, corpus, done, out, t0, chunk_embedder)


def _update_locked(cfg: BuildConfig, corpus: ImageCorpus, done: dict[str, Any], out: Path, t0: float,
                   chunk_embedder=None) -> BuildSummary:
    old = EmbeddingStore.open(out)
    plan, view = (None, corpus) if cfg.force else make_plan(old, corpus)
    if plan is not None and plan.nothing_to_do():
        return summary_of(out, done, 0, time.time() - t0, already=True,
                          update={"added": 0, "changed": 0, "removed": 0, "unchanged": len(old)})
    key = {**_build_key(cfg, view), "update_of": old.generation, "plan": plan.digest if plan else "force"}
    gen_dir = _fresh_generation_dir(out, old.generation + 1, key)
    gm = read_manifest(gen_dir)
    embedded = 0
    if not (gm and gm.get("complete")):
        gen = build_generation(cfg, gen_dir, view, key, plan, known_info=None if cfg.force else old.encoder_info,
                               chunk_embedder=chunk_embedder)
        embedded = gen.embedded
        md = pd.read_parquet(gen_dir / METADATA)
        if plan is not None:
            old_rows = md["_old_row"].to_numpy(dtype=np.int64)
        else:
            old_rows = np.full(len(md), -1, np.int64)
        md = md.drop(columns=[c for c in INTERNAL if c in md.columns])
        md.to_parquet(gen_dir / METADATA, index=False)
        counts = _counts(old, md, old_rows, embedded)
        if plan is not None and not (counts["added"] or counts["changed"] or counts["removed"]) and _same_rows(old, md):
            shutil.rmtree(gen_dir, ignore_errors=True)  # e.g. a dataset re-read with nothing new
            s = summary_of(out, done, 0, time.time() - t0, already=True, update=counts)
            s.skipped = dict(Counter(x["reason"] for x in gen.skips if x["reason"] != "duplicate"))
            return s
        base = generation_manifest(gen, view, gen_dir, _placeholder_index())
        return finish_generation(cfg, out, old, gen_dir, base, old_rows, counts, t0, embed_seconds=gen.embed_seconds)
    return finish_generation(cfg, out, old, gen_dir, gm, None, gm.get("update", {}), t0, resumed=True)


@contextmanager
def update_lock(out: Path):
    """One update of an index at a time (a second one gets a clear error, not a mixed generation)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(out / ".update.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise CorpusError(f"another build is updating {out} right now; run this one when it has finished") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fresh_generation_dir(out: Path, g: int, key: dict[str, Any]) -> Path:
    """``gen-g`` for this update; a leftover made for another plan (the corpus changed since an
    interrupted update) is started over."""
    gen_dir = out / f"{GEN_PREFIX}{g:06d}"
    if gen_dir.exists():
        gm = read_manifest(gen_dir)
        bk = gen_dir / "chunks" / "build.json"
        stale = (gm is not None and gm.get("build_key") != key) or (bk.exists() and read_json(bk) != key)
        if stale:
            log.info("discarding the unfinished update in %s (made for another state of the corpus)", gen_dir)
            shutil.rmtree(gen_dir)
    return gen_dir


class _placeholder_index:
    kind, params = "pending", {}


def _counts(old: EmbeddingStore, md: pd.DataFrame, old_rows: np.ndarray, embedded: int) -> dict[str, int]:
    have = old_rows >= 0
    same = np.zeros(len(md), bool)
    if "sha256" in md.columns and "sha256" in old.metadata.columns and have.any():
        old_sha = old.metadata["sha256"].to_numpy()
        same[have] = md["sha256"].to_numpy()[have] == old_sha[old_rows[have]]
    return {"added": int((~have).sum()), "changed": int((have & ~same).sum()), "unchanged": int(same.sum()),
            "removed": int(len(old) - len(np.unique(old_rows[have]))), "embedded": int(embedded)}


def _same_rows(old: EmbeddingStore, md: pd.DataFrame) -> bool:
    om = old.metadata.drop(columns=[c for c in INTERNAL if c in old.metadata.columns])
    try:
        return om.reset_index(drop=True).equals(md.reset_index(drop=True)[om.columns]) and set(om.columns) == set(md.columns)
    except KeyError:
        return False


def finish_generation(cfg: BuildConfig, out: Path, old: EmbeddingStore, gen_dir: Path, manifest: dict[str, Any],
                      old_rows: np.ndarray | None, counts: dict[str, int], t0: float, resumed: bool = False,
                      embed_seconds: float = 0.0) -> BuildSummary:
    """Index, SAE codes and labels for the new generation, then the switch. Each step is redone
    or resumed when an interrupted update runs again. ``embed_seconds``: the embedding loop's
    time (the summary's images/s figure)."""
    from saefe.ingest.generation import carry_codes, index_for_generation, switch_generation

    g = old.generation + 1
    if not resumed:
        n_new = int(manifest["count"])
        remap = np.full(len(old), -1, np.int64)
        have = np.flatnonzero(old_rows >= 0)
        remap[old_rows[have]] = have
        np.save(gen_dir / REMAP, remap, allow_pickle=False)
        vi = index_for_generation(old, gen_dir, cfg.index, old_rows, n_new, cfg.progress)
        manifest.update(index_type=vi.kind, index_params=vi.params, generation=g,
                        update={**counts, "generation": g, "previous_count": len(old)})
        for k in ("default_sae",):
            if k in old.manifest:
                manifest[k] = str(Path("..") / old.manifest[k])
        write_manifest(gen_dir, manifest)  # the generation is complete: its chunks can go
        shutil.rmtree(gen_dir / "chunks", ignore_errors=True)
    new = EmbeddingStore.open(gen_dir)
    remap = np.load(gen_dir / REMAP, allow_pickle=False)
    inv = np.full(len(new), -1, np.int64)
    kept = np.flatnonzero(remap >= 0)
    inv[remap[kept]] = kept
    notes = carry_codes(old, new, cfg.progress)
    from saefe.labels.attributes import carry_attributes

    note = carry_attributes(old, new, inv)
    if note:
        notes["per-image labels"] = note
    top = switch_generation(out, gen_dir, manifest, g)
    rebuilt = bool(cfg.force)
    s = summary_of(out, top, int(counts.get("embedded", 0)) if not resumed else 0, time.time() - t0,
                   embed_seconds=embed_seconds, update=None if rebuilt else {**{k: int(v) for k, v in counts.items() if k in UPDATE_KEYS},
                                                "generation": g})
    if rebuilt:
        s.extras["rebuilt"] = f"every image re-embedded (--force) as generation {g}; the previous one served meanwhile"
    s.extras.update(notes)
    return s


def update_from_embeddings(cfg: BuildConfig, vecs: np.ndarray, meta: pd.DataFrame, done: dict[str, Any]) -> BuildSummary:
    """Precomputed vectors into a finished index: rows are matched by a key column (path, url,
    key or id when unique) or else by the vector itself; nothing is embedded either way."""
    t0 = time.time()
    out = Path(cfg.out)
    source = str(Path(cfg.embeddings).resolve())
    model = canonical_model_id(cfg.model)
    if "source" not in done and done.get("source_kind") == "embeddings":
        done = {**done, "source": source if done.get("corpus_root") == str(Path(source).parent) else done.get("corpus_root")}
    _check_same_source(out, done, "embeddings", source, model, cfg.force)
    old = EmbeddingStore.open(out)
    v, ok, skipped = clean_vectors(vecs, cfg.embeddings)
    if v.shape[1] != old.dim and not cfg.force:
        raise IncompatibleError(f"{cfg.embeddings} has dimension {v.shape[1]} but the index at {out} has {old.dim}; "
                                "pass --force to replace it")
    meta = meta[ok].reset_index(drop=True)
    v16 = v.astype(np.float16)
    col = next((c for c in ("path", "url", "key", "id") if c in meta.columns and c in old.metadata.columns
                and meta[c].is_unique and old.metadata[c].is_unique), None)
    new_keys = meta[col].astype(str).tolist() if col else [hashlib.sha1(r.tobytes()).hexdigest() for r in v16]
    old_keys = old.metadata[col].astype(str).tolist() if col else \
        [hashlib.sha1(np.asarray(r).tobytes()).hexdigest() for r in old.vectors]
    pos = {k: i for i, k in enumerate(new_keys)}
    old_pos = {k: r for r, k in enumerate(old_keys)}
    if cfg.force:
        order, old_rows = list(range(len(new_keys))), np.full(len(new_keys), -1, np.int64)
    else:
        order = [pos[k] for k in old_keys if k in pos] + [i for i, k in enumerate(new_keys) if k not in old_pos]
        old_rows = np.array([old_pos.get(new_keys[i], -1) for i in order], dtype=np.int64)
    v16, meta = v16[order], meta.iloc[order].reset_index(drop=True)
    have = old_rows >= 0
    same = np.zeros(len(order), bool)
    pos_have = np.flatnonzero(have)
    for lo in range(0, len(pos_have), 65536):  # blocks: a million rows never sit in RAM twice
        p = pos_have[lo: lo + 65536]
        rows = old_rows[p]
        order = np.argsort(rows)  # memmap reads in ascending row order
        block = np.empty((len(p), v16.shape[1]), np.float16)
        block[order] = np.asarray(old.vectors[rows[order]])
        same[p] = (block == v16[p]).all(axis=1)
    counts = {"added": int((~have).sum()), "changed": int((have & ~same).sum()), "unchanged": int(same.sum()),
              "removed": int(len(old) - have.sum()), "embedded": 0}
    if not cfg.force and counts["added"] == counts["changed"] == counts["removed"] == 0 and _same_rows(old, meta):
        return summary_of(out, done, 0, time.time() - t0, already=True, update=counts)
    with update_lock(out):
        return _embeddings_locked(cfg, out, old, v16, meta, model, source, skipped, old_rows, counts, t0)


def _embeddings_locked(cfg, out, old, v16, meta, model, source, skipped, old_rows, counts, t0) -> BuildSummary:
    g = old.generation + 1
    gen_dir = out / f"{GEN_PREFIX}{g:06d}"
    shutil.rmtree(gen_dir, ignore_errors=True)  # nothing to resume: no embedding happens here
    info = EncoderInfo(model_id=model, embedding_dim=int(v16.shape[1]))
    write_store(gen_dir, v16, meta, info, {"source_kind": "embeddings", "source": source,
                                           "corpus_root": str(Path(source).parent), "skipped": skipped,
                                           "duplicates": 0, "complete": False})
    base = {**read_manifest(gen_dir), "complete": True}
    return finish_generation(replace(cfg), out, old, gen_dir, base, old_rows, counts, t0)
