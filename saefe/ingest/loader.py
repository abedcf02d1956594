"""Read, hash, decode and pre-process corpus items in parallel, ahead of the model.

On a GPU the model is rarely the limit: SO400M@384 takes ~610 images/s on an H100, while one
Python thread running the image processor manages ~60 (measured: benchmarks/bench_gpu.py). So
every item goes through the whole CPU path (read -> sha256 -> decode -> processor) in a thread
pool sized to the machine's cores; PIL's decoder and resampler, hashlib and numpy release the GIL,
so threads scale without the pickling cost of processes. JPEGs are decoded at a reduced DCT scale
(PIL's ``draft``) that still covers the model's input size, which makes phone-sized photos several
times cheaper to decode; the original size is kept for the metadata.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from saefe.ingest.corpus import ImageCorpus, ItemChanged
from saefe.ingest.images import BadImage, decode_image

# (item index, image or None, metadata, skip reason or None)
Item = tuple[int, Any, dict[str, Any], "str | None"]
# metadata key an update's plan sets on an item it already has a vector for: the old row to copy
REUSE = "_reuse"


def default_workers() -> int:
    """Threads for the CPU side of a build: the cores there are (at most 32), at least 2."""
    return max(2, min(32, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2))


def load_item(corpus: ImageCorpus, i: int, draft_to: tuple[int, int] | None = None, plan=None) -> Item:
    """Read + hash + decode one item. A failure is a skip reason, never an exception.

    ``plan`` (an update's saefe.ingest.update.ReusePlan) answers the items the index already has:
    unchanged by size + mtime (not even read), or by content hash (not decoded); it marks them
    with ``meta[REUSE]`` = the old row whose vector they keep."""
    if plan is not None:
        known = plan.before_read(i)
        if known is not None:
            return known
    try:
        data, meta = corpus.read(i)
    except OSError as e:
        reason = "changed while being read" if isinstance(e, ItemChanged) else \
            f"unreadable ({e.strerror or type(e).__name__})"
        kept = plan.on_read_error(i, reason) if plan is not None else None
        return kept or (i, None, {"key": corpus.key(i)}, reason)
    meta = dict(meta)
    meta["sha256"] = hashlib.sha256(data).hexdigest()
    if plan is not None:
        known = plan.after_hash(i, meta)
        if known is not None:
            return known
    try:
        img = decode_image(data, draft_to=draft_to)
    except BadImage as e:
        return i, None, meta, str(e)
    meta["width"], meta["height"] = img.info.get("original_size", img.size)
    return i, img, meta, None


def load_pixels(corpus: ImageCorpus, i: int, preprocess: Callable[[Sequence[Any]], Any] | None,
                draft_to: tuple[int, int] | None = None, plan=None) -> tuple[Item, Any]:
    """:func:`load_item` plus the item's (1, 3, H, W) pixels (None without a processor or an
    image); an image the processor cannot take becomes a skip."""
    item = load_item(corpus, i, draft_to, plan)
    if item[1] is None or preprocess is None:
        return item, None
    try:
        return item, preprocess([item[1]])
    except Exception as e:  # noqa: BLE001 - an image the processor cannot take is a skip
        return (item[0], None, item[2], f"unprocessable image ({type(e).__name__})"), None


@dataclass
class ChunkLoader:
    """Loads ranges of a corpus: items in order, plus the pre-processed pixels of the good ones.

    ``preprocess`` maps a list of images to a (n, 3, H, W) tensor (the encoder's processor); it
    runs per image inside the pool, and the rows are concatenated in item order.
    """

    corpus: ImageCorpus
    preprocess: Callable[[Sequence[Any]], Any] | None = None
    draft_to: tuple[int, int] | None = None
    workers: int = 0
    plan: Any = None  # an update's ReusePlan (see load_item)

    def __post_init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=self.workers or default_workers(), thread_name_prefix="saefe-load")

    def _one(self, i: int) -> tuple[Item, Any]:
        return load_pixels(self.corpus, i, self.preprocess, self.draft_to, self.plan)

    def load(self, lo: int, hi: int) -> tuple[list[Item], Any]:
        """Items ``lo..hi-1`` and the pixels of those that decoded (None without a processor)."""
        results = list(self.pool.map(self._one, range(lo, hi)))
        items = [r[0] for r in results]
        rows = [r[1] for r in results if r[1] is not None]
        if self.preprocess is None or not rows:
            return items, None
        import torch

        return items, torch.cat(rows)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "ChunkLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
