"""The two Ray Data stages of the build, as callable classes for ``Dataset.map_batches``.

``DecodePreprocess`` (CPU actors): one task row in, one row per item out: the item's global
index, metadata (JSON), skip reason, and pixels. Reading, hashing, safe decoding (JPEG draft to
the model's size) and pre-processing are the single-process build's ChunkLoader and PixelPlan:
uint8 resized pixels (4x less to ship than float) that Embed's encoder finishes on its device.
``Embed`` (one actor per GPU with ``num_gpus=1``, CPU actors otherwise): pixels -> L2-normalised
fp16 vectors with the same SiglipEncoder; the pixels column is dropped.

``fault`` (tests only) makes one shard fail: ``raise`` (a bug or a shard the workers cannot
handle: the build stops and reports it) or ``exit`` (the worker process dies once, as a killed
or pre-empted node would; Ray restarts the actor and retries the shard).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from saefe.ingest.distributed.reader import CorpusSpec, open_shard


class InjectedFault(RuntimeError):
    """Raised by the ``fault`` hook; never in a real build."""


def _local_only() -> bool:
    return os.environ.get("SAEFE_ALLOW_DOWNLOAD") != "1"


class DecodePreprocess:
    def __init__(self, spec: CorpusSpec, model: str, pixel_dtype: str = "float32", fault: dict | None = None,
                 threads: int = 2):
        from saefe.ingest import towers
        from saefe.ingest.encoder import cpu_preprocess, draft_size, info_from_config
        from saefe.ingest.models import resolve_model
        from saefe.ingest.pixels import PixelPlan

        path, model_id = resolve_model(model)
        with towers.transformers_notices():
            config, tspec = towers.load_config(path, model, _local_only())
            processor = towers.load_image_processor(tspec, path, model, _local_only())
        # the single-process build's pre-processing and draft size: the same pixels
        self.preprocess = cpu_preprocess(processor, PixelPlan.from_processor(processor))
        self.draft_to = draft_size(info_from_config(config, model_id))
        self.spec = spec
        self.dtype = np.dtype(pixel_dtype)
        self.fault = fault
        self.threads = threads

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
        from saefe.ingest.loader import ChunkLoader

        cols: dict[str, list] = {"shard": [], "item": [], "meta": [], "reason": [], "ok": [], "error": []}
        pixels = []
        for r in range(len(batch["shard"])):
            row = {k: batch[k][r] for k in ("shard", "items", "idx", "refs")}
            shard, listed = int(row["shard"]), [int(i) for i in row["items"]]
            try:  # a shard that fails here is reported by the driver; the other shards go on
                self._maybe_fail(shard)
                view = open_shard(self.spec, row)
                with ChunkLoader(view, self.preprocess, self.draft_to, self.threads) as loader:
                    items, px = loader.load(0, len(view))  # the single-process build's loader
                px = px.numpy() if px is not None else None
                if px is not None and px.dtype != np.uint8:  # uint8 = resized, finished on the device
                    px = px.astype(self.dtype, copy=False)
            except Exception as e:
                items, error = [(-1, None, {}, "failed")], f"{type(e).__name__}: {e}"
            else:
                error = ""
            g = 0
            for j, img, meta, reason in items:
                cols["shard"].append(shard)
                cols["item"].append(listed[j] if j >= 0 else -1)
                cols["meta"].append(json.dumps(meta))
                cols["reason"].append(reason or "")
                cols["ok"].append(reason is None)
                cols["error"].append(error)
                if reason is None:
                    pixels.append(px[g])
                    g += 1
                else:
                    pixels.append(None)
        first = next((p for p in pixels if p is not None), None)
        shape, dtype = (first.shape, first.dtype) if first is not None else ((3, 1, 1), np.uint8)
        out = np.zeros((len(pixels), *shape), dtype)
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
