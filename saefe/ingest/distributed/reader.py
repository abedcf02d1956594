"""Corpus -> shards of item references: the rows the Ray pipeline starts from.

A shard is one chunk of the build (``chunk_size`` consecutive items of the corpus' fixed order),
the unit that is committed and resumed; it travels as one or more tasks (rows) of items. A row carries what a worker needs to read its items
without the whole corpus: a folder shard lists its relative paths (a worker must not rescan a
folder of millions of files); a dataset shard is a row range of a dataset each worker opens once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saefe.ingest.corpus import FolderCorpus, HFDatasetCorpus, ImageCorpus


@dataclass(frozen=True)
class CorpusSpec:
    """Enough to reopen the corpus' items on another machine (which must see the same paths)."""

    kind: str
    source: str
    split: str = "train"
    image_column: str | None = None
    builder: str | None = None

    @classmethod
    def of(cls, corpus: ImageCorpus, split: str = "train", builder: str | None = None) -> "CorpusSpec":
        col = getattr(corpus, "image_column", None)
        return cls(corpus.kind, corpus.source, split, col, builder)


def shard_rows(corpus: ImageCorpus, chunk_size: int, todo: list[int], task_size: int | None = None) -> list[dict[str, Any]]:
    """Rows for the shards (chunks) still to do, each cut into tasks of at most ``task_size``
    items so that a few large chunks still spread over every worker: ``shard`` (the chunk id),
    ``lo``, ``hi`` (this task's item range) and, for folders, the item paths."""
    n = len(corpus)
    step = max(1, task_size or chunk_size)
    rows = []
    for cid in todo:
        lo, hi = cid * chunk_size, min(n, (cid + 1) * chunk_size)
        for a in range(lo, hi, step):
            b = min(hi, a + step)
            refs = list(corpus.paths[a:b]) if isinstance(corpus, FolderCorpus) else []
            rows.append({"shard": int(cid), "lo": int(a), "hi": int(b), "refs": refs})
    return rows


class ShardView:
    """Items ``lo .. hi-1`` of a corpus as a corpus of their own (local index j = global lo + j),
    so the build's loader runs on it unchanged and yields the single-process metadata."""

    def __init__(self, base: ImageCorpus, lo: int, hi: int, global_keys: bool):
        self.base, self.lo, self.hi, self.global_keys = base, lo, hi, global_keys

    def __len__(self) -> int:
        return self.hi - self.lo

    def key(self, j: int) -> str:
        return self.base.key(self.lo + j if self.global_keys else j)

    def read(self, j: int):
        return self.base.read(self.lo + j if self.global_keys else j)


_opened: dict[CorpusSpec, ImageCorpus] = {}


def open_shard(spec: CorpusSpec, row: dict[str, Any]) -> ShardView:
    lo, hi = int(row["lo"]), int(row["hi"])
    if spec.kind == "folder":
        return ShardView(FolderCorpus(Path(spec.source), [str(p) for p in row["refs"]]), lo, hi, global_keys=False)
    if spec not in _opened:  # one open per worker process (memory-mapped Arrow)
        _opened[spec] = HFDatasetCorpus.load(spec.source, spec.split, spec.image_column, spec.builder)
    return ShardView(_opened[spec], lo, hi, global_keys=True)


def shard_dataset(rows: list[dict[str, Any]]):
    """A Ray Dataset of shard rows, one block per shard so shards spread over the workers."""
    import ray.data

    return ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
