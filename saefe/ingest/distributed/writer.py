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
    expect: set[int]
    rows: dict[int, tuple[dict[str, Any], str | None, np.ndarray | None]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.rows) == len(self.expect)


class ShardAssembler:
    """Collects rows into shards (``add``), stages complete ones, commits the staged prefix.

    ``spans``: every shard of this build not yet committed -> its item range. With an update's
    ``plan`` the workers only read the items the plan could not answer from the file's size and
    mtime; the rest, and the plan's content-hash and read-error answers, are resolved here at
    commit time, exactly as the loader resolves them in the single-process build."""

    def __init__(self, writer: ChunkWriter, stage: ShardStage, spans: dict[int, tuple[int, int]],
                 rows: list[dict[str, Any]], seen: set[str], dim: int, progress=None, plan=None):
        self.writer, self.stage, self.seen, self.dim, self.progress, self.plan = writer, stage, seen, dim, progress, plan
        self.spans = spans
        self.order = sorted(spans)  # every shard not yet committed: in Ray now, or staged earlier
        self.pending: dict[int, _Pending] = {}
        for r in rows:  # a shard's tasks together list the items the workers read
            self.pending.setdefault(int(r["shard"]), _Pending(set())).expect.update(int(i) for i in r["items"])
        self.ran = set(self.pending)
        staged = stage.done()
        for cid in self.order:  # nothing to read (the plan answers every item): staged empty
            if cid not in self.pending and cid not in staged:
                stage.write(cid, [], dim)
                self.ran.add(cid)
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
                self.stage.write(cid, [(i, *p.rows[i]) for i in sorted(p.rows)], self.dim)
                del self.pending[cid]
        self.promote()

    def _resolve(self, cid: int, read: list[Item]) -> list[tuple]:
        """The chunk's items in corpus order as the loader would give them: (index, vector or
        None, meta, reason), with the plan's answers (meta[REUSE] = old row) where it has one."""
        got = {i: (m, r, v) for i, m, r, v in read}
        lo, hi = self.spans[cid]
        out = []
        for i in range(lo, hi):
            if i not in got:  # answered by size + mtime, never read
                known = self.plan.before_read(i) if self.plan is not None else None
                if known is None:
                    raise IncompatibleError(f"shard {cid} misses item {i}; delete {self.stage.dir} and run again")
                out.append(known)
                continue
            meta, reason, vec = got[i]
            if self.plan is not None and "sha256" in meta:
                known = self.plan.after_hash(i, meta)
                if known is not None:
                    out.append(known)
                    continue
            elif self.plan is not None and reason is not None and "sha256" not in meta:  # unreadable now
                kept = self.plan.on_read_error(i, reason)
                if kept is not None:
                    out.append(kept)
                    continue
            out.append((i, vec, meta, reason))
        return out

    def promote(self) -> None:
        """Commit staged shards while the next one in corpus order is staged."""
        from saefe.ingest.build import triage

        staged = self.stage.done()
        while self.next < len(self.order) and self.order[self.next] in staged:
            cid = self.order[self.next]
            items = self._resolve(cid, self.stage.read(cid))
            accepted, skipped, _ = triage(items, self.seen)
            vectors = np.zeros((len(accepted), self.dim), np.float32)
            metas = []
            for row, (i, v, meta, reuse) in enumerate(accepted):
                vectors[row] = self.plan.vector(reuse) if reuse >= 0 else v
                if self.plan is not None:
                    meta["_old_row"] = self.plan.identity_row(i, meta)
                metas.append(meta)
            self.writer.commit(cid, vectors, pd.DataFrame(metas), skipped)
            self.stage.remove(cid)
            self.committed.append(cid)
            self.embedded += sum(a[3] < 0 for a in accepted) if cid in self.ran else 0
            self.next += 1
            if self.progress is not None:
                self.progress.update(len(items))

    @property
    def remaining(self) -> list[int]:
        return self.order[self.next :]
