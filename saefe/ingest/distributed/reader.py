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

from saefe.ingest.corpus import FolderCorpus, HFDatasetCorpus, ImageCorpus, IndexedView


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
        base = corpus.base if isinstance(corpus, IndexedView) else corpus  # an update's ordered view
        return cls(corpus.kind, corpus.source, split, getattr(base, "image_column", None), builder)


def _base_index(corpus: ImageCorpus, i: int) -> int:
    return int(corpus.idx[i]) if isinstance(corpus, IndexedView) else int(i)  # a view reads base item idx[i]


def shard_rows(corpus: ImageCorpus, chunk_size: int, todo: list[int], task_size: int | None = None,
               items_of: dict[int, list[int]] | None = None) -> list[dict[str, Any]]:
    """Rows for the shards (chunks) still to do, each cut into tasks of at most ``task_size``
    items so that a few large chunks still spread over every worker: ``shard`` (the chunk id),
    ``items`` (the corpus positions to read: the whole chunk, or ``items_of[shard]`` when an
    update's plan already answers the others), ``idx`` (their positions in the underlying
    dataset) and, for folders, ``refs`` (their paths: a worker must not rescan the folder)."""
    n = len(corpus)
    step = max(1, task_size or chunk_size)
    rows = []
    for cid in todo:
        items = items_of[cid] if items_of is not None else list(range(cid * chunk_size, min(n, (cid + 1) * chunk_size)))
        for a in range(0, len(items), step):
            part = [int(i) for i in items[a : a + step]]
            refs = [corpus.key(i) for i in part] if corpus.kind == "folder" else []
            rows.append({"shard": int(cid), "items": part, "idx": [_base_index(corpus, i) for i in part], "refs": refs})
    return rows


_opened: dict[CorpusSpec, ImageCorpus] = {}


def open_shard(spec: CorpusSpec, row: dict[str, Any]) -> IndexedView:
    """A task's items as a corpus of their own (local index j -> the j-th listed item), so the
    build's loader runs on it unchanged and yields the single-process metadata."""
    if spec.kind == "folder":
        refs = [str(p) for p in row["refs"]]
        return IndexedView(FolderCorpus(Path(spec.source), refs), list(range(len(refs))))
    if spec not in _opened:  # one open per worker process (memory-mapped Arrow)
        _opened[spec] = HFDatasetCorpus.load(spec.source, spec.split, spec.image_column, spec.builder)
    return IndexedView(_opened[spec], [int(i) for i in row["idx"]])


def shard_dataset(rows: list[dict[str, Any]]):
    """A Ray Dataset of shard rows, one block per shard so shards spread over the workers."""
    import ray.data

    return ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
