"""Driver side of the Ray build: item rows back into shards, staged on disk, committed in order.

Rows stream in from the workers in any order. A shard whose items have all arrived is *staged*
(``chunks/staged/NNNNNN.npy`` fp16 vectors of its decoded items, ``.parquet`` item index + metadata
JSON + skip reason, then the ``.json`` done-marker; each written atomically), so a finished shard
is never redone, whatever happens to the run later. Staged shards are then *committed* in corpus
order: duplicates are decided against the hashes of everything before (build.triage, as the
single-process build decides them) and written with the same ``ChunkWriter.commit``. A shard that
was half-received when a run stopped is simply absent: the next run redoes it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from saefe.errors import IncompatibleError
from saefe.ingest.store import CHUNKS, ChunkWriter, _save_npy_atomic, _save_parquet_atomic
from saefe.manifest import read_json, write_json_atomic

log = logging.getLogger(__name__)

STAGE_DIR = "staged"  # inside the build's chunks/ dir: removed, forced and keyed with it
Item = tuple[int, dict[str, Any], "str | None", "np.ndarray | None"]  # index, meta, skip reason, vector


class ShardStage:
    """Finished shards of Ray runs that wait for every earlier shard to be committed."""

    def __init__(self, out: str | os.PathLike, build_key: dict[str, Any]):
        self.dir = Path(out) / CHUNKS / STAGE_DIR
        keyfile = self.dir / "build.json"
        if keyfile.exists() and read_json(keyfile) != build_key:  # left by a build with other settings
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(keyfile, build_key)

    def _p(self, cid: int, ext: str) -> Path:
        return self.dir / f"{cid:06d}.{ext}"

    def done(self) -> set[int]:
        return {int(p.stem) for p in self.dir.glob("[0-9]*.json")}

    def write(self, cid: int, items: list[Item], dim: int) -> None:
        vecs = [v for _, _, r, v in items if v is not None]
        _save_npy_atomic(self._p(cid, "npy"), np.stack(vecs).astype(np.float16) if vecs else np.zeros((0, dim), np.float16))
        _save_parquet_atomic(self._p(cid, "parquet"), pd.DataFrame({
            "item": [i for i, *_ in items],
            "meta": [json.dumps(m) for _, m, _, _ in items],
            "reason": [r or "" for _, _, r, _ in items],
            "has_vector": [v is not None for *_, v in items],
        }))
        write_json_atomic(self._p(cid, "json"), {"items": len(items), "vectors": len(vecs)})

    def read(self, cid: int) -> list[Item]:
        df = pd.read_parquet(self._p(cid, "parquet"))
        vecs = np.load(self._p(cid, "npy"), allow_pickle=False)
        out, g = [], 0
        for i, m, r, h in zip(df["item"], df["meta"], df["reason"], df["has_vector"]):
            out.append((int(i), json.loads(m), r or None, vecs[g] if h else None))
            g += int(h)
        return out

    def remove(self, cid: int) -> None:
        for ext in ("json", "npy", "parquet"):  # marker first: a half-removed shard is not "done"
            self._p(cid, ext).unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class _Pending:
    lo: int
    hi: int
    rows: dict[int, tuple[dict[str, Any], str | None, np.ndarray | None]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.rows) == self.hi - self.lo


class ShardAssembler:
    """Collects rows into shards (``add``), stages complete ones, commits the staged prefix."""

    def __init__(self, writer: ChunkWriter, stage: ShardStage, todo: list[int], rows: list[dict[str, Any]],
                 seen: set[str], dim: int, progress=None):
        self.writer, self.stage, self.seen, self.dim, self.progress = writer, stage, seen, dim, progress
        self.order = sorted(todo)  # every shard not yet committed: in Ray now, or staged earlier
        self.pending: dict[int, _Pending] = {}
        for r in rows:  # a shard's tasks together cover its item range
            cid, lo, hi = int(r["shard"]), int(r["lo"]), int(r["hi"])
            p = self.pending.setdefault(cid, _Pending(lo, hi))
            p.lo, p.hi = min(p.lo, lo), max(p.hi, hi)
        self.ran = set(self.pending)
        self.failed: dict[int, str] = {}
        self.next = 0
        self.committed: list[int] = []
        self.embedded = 0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        vecs = batch["vector"]
        if len(vecs) and vecs.shape[1] != self.dim:
            raise IncompatibleError(f"encoder returned dimension {vecs.shape[1]}, expected {self.dim}")
        errors = batch.get("error")
        touched = set()
        for r in range(len(batch["item"])):
            cid = int(batch["shard"][r])
            if errors is not None and errors[r]:
                self.failed.setdefault(cid, str(errors[r]))
                self.pending.pop(cid, None)
                continue
            p = self.pending.get(cid)
            if p is None:  # a shard already failed (or not of this run)
                continue
            p.rows[int(batch["item"][r])] = (json.loads(batch["meta"][r]), batch["reason"][r] or None,
                                             vecs[r] if batch["ok"][r] else None)
            touched.add(cid)
        for cid in touched:
            p = self.pending.get(cid)
            if p is not None and p.complete:
                self.stage.write(cid, [(i, *p.rows[i]) for i in range(p.lo, p.hi)], self.dim)
                del self.pending[cid]
        self.promote()

    def promote(self) -> None:
        """Commit staged shards while the next one in corpus order is staged."""
        from saefe.ingest.build import triage

        staged = self.stage.done()
        while self.next < len(self.order) and self.order[self.next] in staged:
            cid = self.order[self.next]
            items = self.stage.read(cid)
            accepted, skipped, _ = triage([(i, v, m, r) for i, m, r, v in items], self.seen)
            kept = [v for _, v, _, _ in accepted]
            vectors = np.stack(kept) if kept else np.zeros((0, self.dim), np.float16)
            self.writer.commit(cid, vectors, pd.DataFrame([m for _, _, m, _ in accepted]), skipped)
            self.stage.remove(cid)
            self.committed.append(cid)
            self.embedded += len(kept) if cid in self.ran else 0
            self.next += 1
            if self.progress is not None:
                self.progress.update(len(items))

    @property
    def remaining(self) -> list[int]:
        return self.order[self.next :]
