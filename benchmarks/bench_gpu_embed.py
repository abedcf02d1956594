#!/usr/bin/env python
"""Where the single-process build's GPU time goes: the encoder's own embedding step, then a
profiled build.

1. ``SiglipEncoder.embed_pixels`` on 1,024 resized uint8 images already in RAM (what the loader
   hands the model), at batch 64 and 256, with the pixels laid out as the loaders make them
   (channels-last views from the thread loader, contiguous NCHW from the process loader), against
   the vision tower alone on pixels already on the GPU. The gap between the two is the encoder's
   per-batch overhead (host->device copy, normalisation, pooling, the copy back).
2. ``saefe build`` end to end in this process under cProfile (the main thread: what it waits on,
   what it computes), printed as the top functions by own time and by cumulative time.

    python benchmarks/bench_gpu_embed.py --model /tmp/gpu_check/so400m-27l --images /tmp/gpu_check/jpegs
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def embed_step(model: str, device: str, n: int, batches: list[int], reps: int) -> list[dict]:
    """images/s of embed_pixels per (batch size, pixel layout), and the tower alone per batch size."""
    import torch

    from saefe.ingest.encoder import SiglipEncoder

    enc = SiglipEncoder.from_pretrained(model, device=device)
    h, w = enc.info.image_size
    g = torch.Generator().manual_seed(0)
    nhwc = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g)
    layouts = {"channels-last view (thread loader)": nhwc.permute(0, 3, 1, 2),
               "contiguous NCHW (process loader)": nhwc.permute(0, 3, 1, 2).contiguous()}
    rows = []
    for b in batches:
        enc.batch_size = b
        px = enc.pixel_plan.finish(layouts["contiguous NCHW (process loader)"][:b].to(device), enc.dtype)
        with torch.inference_mode():
            enc.image_features(px)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(reps * max(1, n // b)):
                enc.image_features(px).float().cpu()
            _sync(device)
        rows.append({"step": "vision tower alone (pixels on the device)", "batch": b,
                     "images_per_s": reps * max(1, n // b) * b / (time.perf_counter() - t0)})
        for name, src in layouts.items():
            enc.embed_pixels(src[:b])  # warm-up at this shape
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                enc.embed_pixels(src)
            _sync(device)
            rows.append({"step": f"embed_pixels, {name}", "batch": b,
                         "images_per_s": reps * n / (time.perf_counter() - t0)})
    return rows


def profiled_build(model: str, images: str, out: str, device: str, processes: int, top: int) -> dict:
    from saefe.ingest.build import BuildConfig, build_index

    cfg = BuildConfig(images=images, out=out, model=model, device=device, force=True, progress=False,
                      loader_processes=processes)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    s = build_index(cfg)
    prof.disable()
    wall = time.perf_counter() - t0
    text = {}
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(top)
        text[key] = buf.getvalue()
    return {"loader_processes": processes, "images": s.embedded_now, "wall_s": wall,
            "embed_s": s.embed_seconds, "images_per_s_embedding": s.embedded_now / max(1e-9, s.embed_seconds),
            "profile": text}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--images", help="a folder of images for the profiled build (leave out to skip it)")
    ap.add_argument("--out", default="/tmp/saefe-gpu-embed")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--processes", default="14", help="comma list of --loader-processes for the profiled builds (0: threads)")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--json")
    args = ap.parse_args()
    import torch

    card = torch.cuda.get_device_name(0) if args.device.startswith("cuda") and torch.cuda.is_available() else "CPU"
    res: dict = {"card": card, "embed": embed_step(args.model, args.device, args.n,
                                                  [int(b) for b in args.batches.split(",")], args.reps)}
    print("| card | step | batch | images/s |\n|---|---|---|---|")
    for r in res["embed"]:
        print(f"| {card} | {r['step']} | {r['batch']} | {r['images_per_s']:.0f} |", flush=True)
    if args.images:
        res["builds"] = []
        for p in [int(x) for x in args.processes.split(",") if x]:
            b = profiled_build(args.model, args.images, f"{args.out}/index-{p}", args.device, p, args.top)
            res["builds"].append(b)
            print(f"\n== profiled build, loader_processes={p}: {b['images_per_s_embedding']:.0f} img/s while embedding "
                  f"({b['images']} in {b['embed_s']:.1f} s; wall {b['wall_s']:.1f} s)")
            print(b["profile"]["tottime"][:6000])
            print(b["profile"]["cumulative"][:6000], flush=True)
        print("\n| card | build | images/s while embedding |\n|---|---|---|")
        for b in res["builds"]:
            print(f"| {card} | loader_processes={b['loader_processes']} (under cProfile) | {b['images_per_s_embedding']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
