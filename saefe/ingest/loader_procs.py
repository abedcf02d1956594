"""The build's CPU side in worker processes (``saefe build --loader-processes N``), for GPU builds
where the thread loader is the limit.

Why. The thread loader (:mod:`saefe.ingest.loader`) scales while PIL, hashlib and numpy hold no
GIL, but the per-item Python around them (reading, metadata, the resize call, torch glue) does
not. Processes have a GIL each. torch's DataLoader runs them (a well-kept pool with ordered
prefetch, worker shutdown and shared-memory tensors for the pixels): every worker reads, hashes,
decodes (JPEG draft) and resizes whole batches of one chunk to uint8, and the main process only
runs the model. On a 16-core H100 host SO400M@384 embedded 442-478 images/s with 14 processes,
356-442 with 16 threads (docs/SCALING.md): processes leave the main process' GIL to the model.

The workers return each item's metadata and skip reason exactly as :func:`loader.load_item` makes
them, and a ``True`` in place of the decoded image (the images stay in the workers; only their
pixels travel), so ``build.triage`` and the commit path are the thread loader's. Updates (an
index that reuses old vectors) keep the thread loader: their reuse plan lives in this process.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from saefe.errors import SaefeError
from saefe.ingest.corpus import ImageCorpus
from saefe.ingest.loader import Item, load_pixels

log = logging.getLogger(__name__)

BATCH = 16  # items per worker task: amortises the IPC, small enough to keep every worker busy


class _Items:
    """torch map-style dataset: item i -> (its Item with ``True`` for the image, uint8 pixels or None)."""

    def __init__(self, corpus: ImageCorpus, preprocess: Callable[[Sequence[Any]], Any], draft_to):
        self.corpus, self.preprocess, self.draft_to = corpus, preprocess, draft_to

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, i: int):
        (idx, img, meta, reason), px = load_pixels(self.corpus, int(i), self.preprocess, self.draft_to)
        return (idx, None if img is None else True, meta, reason), (None if px is None else px[0])


def _collate(batch: list) -> tuple[list[Item], Any]:
    """Items, and their pixels as one (n, 3, H, W) tensor in the channels-last memory the resize
    made (stacked as HWC rows: a plain copy, where stacking the CHW views transposes every image;
    the encoder wants channels-last anyway, see encoder.model_layout)."""
    import torch

    items = [b[0] for b in batch]
    px = [b[1] for b in batch if b[1] is not None]
    return items, (torch.stack([p.permute(1, 2, 0) for p in px]).permute(0, 3, 1, 2) if px else None)


def _death(e: BaseException) -> SaefeError | None:
    """The one-line error for torch's report of a dead worker process; None for anything else."""
    if not isinstance(e, RuntimeError) or "DataLoader worker" not in str(e):
        return None
    return SaefeError(f"a loader worker process died ({str(e).splitlines()[0][:160]}); the chunks committed "
                      "before it are kept: run the same command again to resume (with fewer --loader-processes "
                      "if memory ran out)")


@contextmanager
def worker_deaths() -> Iterator[None]:
    """Around the loop that uses a ProcessChunkLoader: torch reports a dead worker from its
    SIGCHLD handler, i.e. in whatever the main thread is doing (waiting for a chunk, embedding);
    this turns that report into the one-line error."""
    try:
        yield
    except RuntimeError as e:
        err = _death(e)
        if err is None:
            raise
        raise err from None


class ProcessChunkLoader:
    """``load(lo, hi)`` like :class:`loader.ChunkLoader`, for the chunk ranges given up front (in
    the order they will be asked for); ``processes`` DataLoader workers decode ahead."""

    def __init__(self, corpus: ImageCorpus, preprocess: Callable[[Sequence[Any]], Any], draft_to,
                 processes: int, spans: Sequence[tuple[int, int]], batch: int = BATCH, prefetch: int = 4):
        from torch.utils.data import DataLoader

        batches = [list(range(s, min(b, s + batch))) for a, b in spans for s in range(a, b, batch)]
        self._loader = DataLoader(_Items(corpus, preprocess, draft_to), batch_sampler=batches,
                                  num_workers=processes, collate_fn=_collate, prefetch_factor=prefetch)
        self._it: Iterator | None = iter(self._loader)  # the workers start here, before any thread
        self._pending: list[tuple[list[Item], Any]] = []

    def load(self, lo: int, hi: int) -> tuple[list[Item], Any]:
        import torch

        items: list[Item] = []
        rows = []
        while len(items) < hi - lo:
            try:
                got, px = next(self._it)
            except StopIteration:
                raise RuntimeError(f"loader out of step: no batch left for items {lo}..{hi - 1}") from None
            except RuntimeError as e:  # torch: "DataLoader worker (pid N) exited unexpectedly ..."
                raise _death(e) or e from None
            if got and not lo <= got[0][0] < hi:
                raise RuntimeError(f"loader out of step: item {got[0][0]} while loading {lo}..{hi - 1}")
            items += got
            if px is not None:
                rows.append(px)
        return items, (torch.cat(rows) if rows else None)

    def close(self) -> None:
        self._it = None  # the DataLoader iterator shuts its workers down when it goes
        self._loader = None

    def __enter__(self) -> "ProcessChunkLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
