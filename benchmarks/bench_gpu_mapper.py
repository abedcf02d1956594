#!/usr/bin/env python
"""Throughput of the Ray build's stage layout: decode actors on the CPUs -> one model actor.

Runs the Ray pipeline's own stage classes (saefe.ingest.distributed.mapper: DecodePreprocess,
Embed) over a folder of JPEGs. With Ray importable it runs them under Ray Data exactly as
``saefe build --ray local`` does; without Ray (the GPU machines here have no Ray wheel small
enough to carry) it runs the same classes under torch's DataLoader: N worker processes each
decode + pre-process a shard, pixels come back through shared memory, the main process embeds
on the GPU. Either way it prints images/s end to end and the card's name.

    python benchmarks/bench_gpu_mapper.py --images /tmp/gpu/jpegs --model /tmp/gpu/so400m-27l
    python benchmarks/bench_gpu_mapper.py --images DIR --model demo --device cpu --workers 1   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _obj(v) -> np.ndarray:
    """A one-row object column holding a list (as Ray Data hands list columns over)."""
    a = np.empty(1, dtype=object)
    a[0] = v
    return a


class _ShardSet:
    """torch Dataset: item s = shard s decoded and pre-processed by one DecodePreprocess."""

    def __init__(self, spec, rows, model: str, dtype: str):
        self.spec, self.rows, self.model, self.dtype = spec, rows, model, dtype
        self.stage = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, s: int):
        import torch

        from saefe.ingest.distributed.mapper import DecodePreprocess

        if self.stage is None:  # once per worker process, like a Ray actor's constructor
            self.stage = DecodePreprocess(self.spec, self.model, self.dtype)
        r = self.rows[s]
        out = self.stage({"shard": np.array([r["shard"]]), "items": _obj(r["items"]), "idx": _obj(r["idx"]),
                          "refs": _obj(r["refs"])})
        out["pixels"] = torch.from_numpy(out["pixels"])  # travels through shared memory
        return out


def run_dataloader(spec, rows, model: str, device: str, workers: int, batch: int, dtype: str) -> dict:
    import torch

    from saefe.ingest.distributed.mapper import Embed

    t0 = time.time()
    embed = Embed(model, device=device, batch_size=batch)
    load_s = time.time() - t0
    loader = torch.utils.data.DataLoader(_ShardSet(spec, rows, model, dtype), batch_size=None, shuffle=False,
                                         num_workers=workers, prefetch_factor=4 if workers else None,
                                         persistent_workers=False)
    n, first, t0 = 0, None, time.time()
    for out in loader:
        out["pixels"] = out["pixels"].numpy()
        v = embed(out)["vector"]
        n += len(v)
        if first is None:
            first = (time.time(), n)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.time() - t0
    steady = (n - first[1]) / max(1e-9, time.time() - first[0]) if first else 0.0
    return {"runner": f"DataLoader, {workers} decode workers", "images": n, "wall_s": dt, "images_per_s": n / dt,
            "steady_images_per_s": steady, "model_load_s": load_s}


def run_ray(images: Path, model: str, out: Path, batch: int) -> dict:
    from saefe.ingest.build import BuildConfig
    from saefe.ingest.distributed.distributor import RayConfig
    from saefe.ingest.distributed.runner import build_with_ray

    t0 = time.time()
    s = build_with_ray(BuildConfig(images=str(images), out=str(out), model=model, chunk_size=batch, force=True, progress=False),
                       RayConfig("local", embed_batch_size=batch))
    dt = time.time() - t0
    return {"runner": "Ray Data (saefe build --ray local)", "images": s.count, "wall_s": dt, "images_per_s": s.count / dt,
            "embed_images_per_s": s.embedded_now / max(1e-9, s.seconds)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--shard", type=int, default=128, help="images per decode task")
    ap.add_argument("--batch", type=int, default=256, help="images per model call")
    ap.add_argument("--runner", choices=("auto", "ray", "dataloader"), default="auto")
    ap.add_argument("--out", default="/tmp/saefe-gpu-mapper")
    ap.add_argument("--json")
    args = ap.parse_args()
    import torch

    from saefe.ingest.corpus import FolderCorpus
    from saefe.ingest.distributed.reader import CorpusSpec, shard_rows

    card = torch.cuda.get_device_name(0) if args.device.startswith("cuda") and torch.cuda.is_available() else "CPU"
    corpus = FolderCorpus.scan(args.images)
    rows = shard_rows(corpus, args.shard, list(range((len(corpus) + args.shard - 1) // args.shard)))
    runner = args.runner
    if runner == "auto":
        try:
            import ray  # noqa: F401

            runner = "ray"
        except ImportError:
            runner = "dataloader"
    dtype = "float16" if args.device.startswith("cuda") else "float32"
    if runner == "ray":
        res = run_ray(Path(args.images), args.model, Path(args.out), args.batch)
    else:
        res = run_dataloader(CorpusSpec.of(corpus), rows, args.model, args.device, args.workers, args.batch, dtype)
    res["card"] = card
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    print("\n| card | loader | images | images/s end to end | steady images/s |\n|---|---|---|---|---|")
    print(f"| {card} | {res['runner']} | {res['images']} | {res['images_per_s']:.0f} | "
          f"{res.get('steady_images_per_s', res.get('embed_images_per_s', float('nan'))):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
