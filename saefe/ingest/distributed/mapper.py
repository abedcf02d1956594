"""The two Ray Data stages of the build, as callable classes for ``Dataset.map_batches``.

``DecodePreprocess`` (CPU actors): one shard row in, one row per item out: the item's global
index, metadata (JSON), skip reason, and pre-processed pixels. Reading, hashing and safe
decoding are build._load_item and images.decode_image, as in the single-process build.
``Embed`` (one actor per GPU with ``num_gpus=1``, CPU actors otherwise): pixels -> L2-normalised
fp16 vectors with the same SiglipEncoder; the pixels column is dropped.

``fault`` (tests only) makes one shard fail: ``raise`` (a bug or a shard the workers cannot
handle: the build stops and reports it) or ``exit`` (the worker process dies once, as a killed
or pre-empted node would; Ray restarts the actor and retries the shard).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from saefe.ingest.distributed.reader import CorpusSpec, open_shard


class InjectedFault(RuntimeError):
    """Raised by the ``fault`` hook; never in a real build."""


def _local_only() -> bool:
    return os.environ.get("SAEFE_ALLOW_DOWNLOAD") != "1"


class DecodePreprocess:
    def __init__(self, spec: CorpusSpec, model: str, pixel_dtype: str = "float32", fault: dict | None = None,
                 threads: int = 2):
        from transformers import AutoImageProcessor

        from saefe.ingest.models import resolve_model

        self.spec = spec
        self.processor = AutoImageProcessor.from_pretrained(resolve_model(model)[0], local_files_only=_local_only())
        self.dtype = np.dtype(pixel_dtype)
        self.fault = fault
        self.pool = ThreadPoolExecutor(max_workers=threads)  # file reads and PIL decodes release the GIL

    def _maybe_fail(self, shard: int) -> None:
        f = self.fault
        if not f or shard not in np.atleast_1d(f["shard"]).tolist():
            return
        if f["mode"] == "raise":
            raise InjectedFault(f"injected failure in shard {shard}")
        marker = Path(f["marker"])
        if f["mode"] == "exit" and not marker.exists():
            marker.write_text("died once")
            os._exit(1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from saefe.ingest.build import _load_item

        cols: dict[str, list] = {"shard": [], "item": [], "meta": [], "reason": [], "ok": [], "error": []}
        pixels = []
        for r in range(len(batch["shard"])):
            row = {k: batch[k][r] for k in ("shard", "lo", "hi", "refs")}
            shard, lo = int(row["shard"]), int(row["lo"])
            try:  # a shard that fails here is reported by the driver; the other shards go on
                self._maybe_fail(shard)
                view = open_shard(self.spec, row)
                items = list(self.pool.map(lambda j: _load_item(view, j), range(len(view))))
                good = [img for _, img, _, reason in items if reason is None]
                px = self.processor(images=good, return_tensors="pt")["pixel_values"].numpy() if good else None
            except Exception as e:
                items, error = [(-1, None, {}, "failed")], f"{type(e).__name__}: {e}"
            else:
                error = ""
            g = 0
            for j, img, meta, reason in items:
                cols["shard"].append(shard)
                cols["item"].append(lo + j if j >= 0 else -1)
                cols["meta"].append(json.dumps(meta))
                cols["reason"].append(reason or "")
                cols["ok"].append(reason is None)
                cols["error"].append(error)
                if reason is None:
                    pixels.append(px[g].astype(self.dtype, copy=False))
                    g += 1
                else:
                    pixels.append(None)
        shape = next((p.shape for p in pixels if p is not None), (3, 1, 1))
        out = np.zeros((len(pixels), *shape), self.dtype)
        for i, p in enumerate(pixels):
            if p is not None:
                out[i] = p
        return {
            "shard": np.asarray(cols["shard"], np.int64),
            "item": np.asarray(cols["item"], np.int64),
            "meta": np.asarray(cols["meta"], dtype=object),
            "reason": np.asarray(cols["reason"], dtype=object),
            "ok": np.asarray(cols["ok"], bool),
            "error": np.asarray(cols["error"], dtype=object),
            "pixels": out,
        }


class Embed:
    def __init__(self, model: str, device: str | None = None, batch_size: int = 64, threads: int = 0):
        import torch

        from saefe.ingest.encoder import SiglipEncoder

        if threads:
            torch.set_num_threads(threads)
        self.encoder = SiglipEncoder.from_pretrained(model, device=device, batch_size=batch_size)
        self.dim = self.encoder.info.embedding_dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        ok = np.asarray(batch["ok"], bool)
        vecs = np.zeros((len(ok), self.dim), np.float16)
        out = {k: v for k, v in batch.items() if k != "pixels"}
        if ok.any():
            px = batch["pixels"]
            # blocks whose pixel shapes differ (a shard with no decodable image) arrive ragged
            px = np.stack([px[i] for i in np.flatnonzero(ok)]) if px.dtype == object else px[ok]
            try:
                vecs[ok] = self.encoder.embed_pixels(torch.from_numpy(np.ascontiguousarray(px))).astype(np.float16)
            except Exception as e:  # e.g. out of GPU memory: these rows' shards are reported, not lost
                out["error"] = np.where(ok, f"{type(e).__name__}: {e}", out["error"]).astype(object)
        out["vector"] = vecs
        return out


class DecodeEmbed:
    """Both stages in one actor, for clusters without GPUs: no pixels cross the object store
    and each worker loads the model once (one actor per CPU, shards in parallel)."""

    def __init__(self, spec: CorpusSpec, model: str, fault: dict | None = None, batch_size: int = 64, threads: int = 1):
        self.decode = DecodePreprocess(spec, model, "float32", fault, threads=2)
        self.embed = Embed(model, "cpu", batch_size, threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.embed(self.decode(batch))
