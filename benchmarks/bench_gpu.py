#!/usr/bin/env python
"""GPU figures for docs/SCALING.md (run on a CUDA machine; names the card in every table).

1. SO400M@384 (SigLIP architecture, random weights, fp16): images/s through the vision tower alone
   (pixels already on the GPU) against the whole build (`saefe build --images`: read, hash,
   decode, pre-process, embed, store, index) on synthetic JPEGs of photo-like size.
2. Exact inner-product search on the GPU over N fp16 vectors (torch matmul + top-k), as the
   baseline an approximate GPU index has to beat.

    python benchmarks/bench_gpu.py --images 4000 --search-n 10000000 --out /tmp/gpu

Each part runs on its own and prints its table even when another part fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def so400m_config(layers: int = 27):
    from transformers import SiglipConfig

    common = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=layers, num_attention_heads=16)
    return SiglipConfig(
        text_config=dict(common, vocab_size=32000, max_position_embeddings=64, pad_token_id=1, eos_token_id=1,
                         bos_token_id=1),
        vision_config=dict(common, image_size=384, patch_size=14),
    )


def make_checkpoint(d: Path, layers: int = 27) -> Path:
    """A full-size SO400M@384 SigLIP with random weights, saved like a hub checkpoint (no tokenizer:
    image-only work never loads the text side)."""
    import torch
    from transformers import SiglipImageProcessor, SiglipModel

    if (d / "config.json").exists():
        return d
    torch.manual_seed(0)
    model = SiglipModel(so400m_config(layers)).half()
    model.save_pretrained(d, safe_serialization=True)
    SiglipImageProcessor(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(d)
    return d


def _write_jpegs(args: tuple[Path, int, int]) -> int:
    from PIL import Image

    out, lo, hi = args
    for i in range(lo, hi):
        rng = np.random.default_rng(i)
        h, w = int(rng.integers(480, 900)), int(rng.integers(480, 1200))
        base = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
        noise = rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
        img = Image.fromarray(np.clip(np.asarray(img, np.int16) + noise - 20, 0, 255).astype(np.uint8))
        img.save(out / f"{i:06d}.jpg", quality=90)
    return hi - lo


def make_images(d: Path, n: int) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    have = len(list(d.glob("*.jpg")))
    if have >= n:
        return d
    step = 250
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 4) as pool:
        list(pool.map(_write_jpegs, [(d, lo, min(n, lo + step)) for lo in range(0, n, step)]))
    return d


def card() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"


def model_alone(ckpt: Path, batch: int, iters: int) -> dict:
    """The vision tower on pixels already on the GPU, in both memory layouts: channels-last (what
    the encoder feeds it: encoder.model_layout) and contiguous NCHW (the tower's naive input)."""
    import torch
    from transformers import SiglipVisionModel

    t0 = time.time()
    vm = SiglipVisionModel.from_pretrained(ckpt, dtype=torch.float16).cuda().eval()
    load_s = time.time() - t0
    res = {"batch": batch, "vision_load_s": load_s}
    for key, fmt in (("images_per_s", torch.channels_last), ("images_per_s_nchw", torch.contiguous_format)):
        px = torch.randn(batch, 3, 384, 384, device="cuda", dtype=torch.float16).contiguous(memory_format=fmt)
        with torch.inference_mode():
            for _ in range(3):
                vm(pixel_values=px)
            torch.cuda.synchronize()
            t0 = time.time()
            for _ in range(iters):
                vm(pixel_values=px).pooler_output.float().cpu()
            torch.cuda.synchronize()
        res[key] = batch * iters / (time.time() - t0)
    res["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def end_to_end(ckpt: Path, images: Path, out: Path, extra: list[str], device: str = "cuda") -> dict:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "saefe.cli.main", "build", "--images", str(images), "--model", str(ckpt),
           "--out", str(out), "--device", device, "--no-progress", "--force", *extra]
    t0 = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.time() - t0
    print(p.stdout[-3000:], p.stderr[-3000:], sep="\n", flush=True)
    n = len(list(images.glob("*.jpg")))
    m = re.search(r"embedded this run: (\d+) in ([\d.]+)s", p.stdout)  # the whole build, model load included
    embed = {"embedded": int(m.group(1)), "build_s": float(m.group(2))} if m else {}
    r = re.search(r"\(([\d.]+) img/s while embedding\)", p.stdout)  # from the loaded model to the last chunk
    if r:
        embed["embedding_images_per_s"] = float(r.group(1))
    return {"images": n, "wall_s": dt, "images_per_s": n / dt, "rc": p.returncode, **embed}


def gpu_search(n: int, d: int, queries: int, k: int) -> dict:
    import torch

    chunk = 1_000_000
    x = torch.empty(n, d, device="cuda", dtype=torch.float16)
    g = torch.Generator(device="cuda").manual_seed(0)
    for lo in range(0, n, chunk):
        v = torch.randn(min(chunk, n - lo), d, device="cuda", generator=g, dtype=torch.float16)
        x[lo:lo + len(v)] = v / v.norm(dim=1, keepdim=True)
    q = x[:queries].clone()
    torch.cuda.synchronize()
    lat = []
    for i in range(queries):
        t0 = time.time()
        s, ids = torch.topk(x @ q[i], k)
        ids.cpu()
        lat.append(time.time() - t0)
    t0 = time.time()
    for lo in range(0, queries, 64):
        torch.topk(q[lo:lo + 64] @ x.T, k, dim=1).indices.cpu()
    torch.cuda.synchronize()
    batch_qps = queries / (time.time() - t0)
    lat_ms = np.array(lat[5:]) * 1000
    return {"n": n, "dim": d, "p50_ms": float(np.percentile(lat_ms, 50)), "p99_ms": float(np.percentile(lat_ms, 99)),
            "batched_qps": batch_qps, "vectors_gib": n * d * 2 / 2**30}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/saefe-gpu")
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--search-n", type=int, default=10_000_000)
    ap.add_argument("--parts", default="model,e2e,search")
    ap.add_argument("--layers", type=int, default=27, help="vision/text depth (27 = SO400M; fewer for a smoke test)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--e2e-workers", default="0",
                    help="comma list of --loader-workers to run the thread-loader build with (0: one per core)")
    ap.add_argument("--e2e-processes", default="", help="comma list of --loader-processes to run the build with too")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"card": card()}
    parts = args.parts.split(",")
    ckpt = None
    try:
        t0 = time.time()
        ckpt = make_checkpoint(out / f"so400m-{args.layers}l", args.layers)
        results["checkpoint_s"] = time.time() - t0
    except Exception as e:  # noqa: BLE001 - report and go on
        results["checkpoint_error"] = repr(e)
    if "model" in parts and ckpt:
        try:
            results["model_alone"] = model_alone(ckpt, args.batch, args.iters)
        except Exception as e:  # noqa: BLE001
            results["model_alone"] = {"error": repr(e)}
        print(json.dumps(results, indent=1), flush=True)
    if "e2e" in parts and ckpt:
        try:
            t0 = time.time()
            imgs = make_images(out / "jpegs", args.images)
            results["jpeg_gen_s"] = time.time() - t0
            for w in args.e2e_workers.split(","):
                key = "end_to_end" if w == "0" else f"end_to_end_workers_{w}"
                results[key] = end_to_end(ckpt, imgs, out / "index", ["--loader-processes", "0", "--loader-workers", w],
                                          args.device)
            for w in [x for x in args.e2e_processes.split(",") if x]:
                results[f"end_to_end_procs_{w}"] = end_to_end(ckpt, imgs, out / "index", ["--loader-processes", w],
                                                               args.device)
        except Exception as e:  # noqa: BLE001
            results["end_to_end"] = {"error": repr(e)}
        print(json.dumps(results, indent=1), flush=True)
    if "search" in parts:
        try:
            results["exact_search"] = gpu_search(args.search_n, 1152, 200, 10)
        except Exception as e:  # noqa: BLE001
            results["exact_search"] = {"error": repr(e)}
    print(json.dumps(results, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print("\n| card | part | figure |\n|---|---|---|")
    ma, e2e, se = results.get("model_alone", {}), results.get("end_to_end", {}), results.get("exact_search", {})
    if "images_per_s" in ma:
        print(f"| {results['card']} | SO400M@384 fp16 vision tower alone (batch {ma['batch']}, channels-last pixels) | {ma['images_per_s']:.0f} img/s |")
        if "images_per_s_nchw" in ma:
            print(f"| {results['card']} | the same, contiguous NCHW pixels | {ma['images_per_s_nchw']:.0f} img/s |")
    if "images_per_s" in e2e:
        print(f"| {results['card']} | saefe build end to end, loader threads ({e2e['images']} JPEGs) | {e2e['images_per_s']:.0f} img/s (rc {e2e['rc']}) |")
    for key, val in results.items():
        if key.startswith("end_to_end_workers_") and "images_per_s" in val:
            print(f"| {results['card']} | saefe build, --loader-workers {key.rsplit('_', 1)[1]} | {val['images_per_s']:.0f} img/s wall, "
                  f"{val.get('embedding_images_per_s', float('nan')):.0f} while embedding |")
        if key.startswith("end_to_end_procs_") and "images_per_s" in val:
            print(f"| {results['card']} | saefe build, --loader-processes {key.rsplit('_', 1)[1]} | {val['images_per_s']:.0f} img/s "
                  f"wall, {val.get('embedding_images_per_s', float('nan')):.0f} while embedding |")
    if "embedding_images_per_s" in e2e:
        print(f"| {results['card']} | saefe build (loader threads), while embedding | {e2e['embedding_images_per_s']:.0f} img/s |")
    if "p50_ms" in se:
        print(f"| {results['card']} | exact search {se['n']:,} x 1152 fp16, 1 query | p50 {se['p50_ms']:.1f} ms, p99 {se['p99_ms']:.1f} ms |")
        print(f"| {results['card']} | exact search, batches of 64 queries | {se['batched_qps']:.0f} queries/s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
