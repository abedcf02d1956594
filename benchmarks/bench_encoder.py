"""Encoder cost: images/s (model alone and end to end), load time and peak memory.

``--arch tiny`` (default): the built-in tiny SigLIP, model alone vs PIL images through the processor.

``--arch so400m``: google/siglip-so400m-patch14-384's full architecture (27 + 27 layers, width
1152, 384 px, the real 32000-row text embedding) with random weights, written once as a real
checkpoint directory (config.json, model.safetensors, spiece.model, ...; see
tests/fixtures/checkpoints.py; nothing is downloaded) and then, each in a fresh process so peak
memory is its own:

- ``vision only``   SiglipEncoder.from_pretrained: what build / encode / saliency load now;
- ``+ text tower``  the same after its first text query (text tower and tokenizer on demand);
- ``full model``    AutoModel + AutoTokenizer, what the encoder loaded before (the baseline);

and images/s through the vision tower (pre-processed pixels) and end to end (a ``build_index``
of a folder of JPEGs: decode, hash, processor, model, store, index), a few batches each.

    python benchmarks/bench_encoder.py
    python benchmarks/bench_encoder.py --arch so400m               # a few minutes on 2 CPU cores
    python benchmarks/bench_encoder.py --arch so400m --device cuda --batch 64
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # tests/fixtures/checkpoints.py writes the checkpoint
sys.path.insert(0, str(REPO / "benchmarks"))

from procstat import peak_rss_mb, rss_mb  # noqa: E402


def touch(modules) -> None:
    """Read every weight once: safetensors are memory-mapped, so RSS right after from_pretrained
    counts only what loading touched; after this it counts the whole resident model."""
    import torch

    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.float().sum()


def random_images(n: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)) for _ in range(n)]


# --------------------------------------------------------------------------------------------
# Workers: one measurement each, in a fresh process, JSON on the last stdout line
# --------------------------------------------------------------------------------------------
def worker(mode: str, ckpt: str, device: str, batch: int, batches: int, workdir: str) -> dict:
    import torch

    import saefe.ingest.towers  # noqa: F401 - imports (torch, transformers) are not load time

    import transformers  # noqa: F401

    base = rss_mb()
    out: dict = {"mode": mode, "base_rss_mb": base}
    t = time.perf_counter()
    if mode == "full":
        from transformers import AutoModel, AutoTokenizer

        from saefe.ingest.towers import transformers_notices

        with transformers_notices():
            model = AutoModel.from_pretrained(ckpt).to(device).eval()
            AutoTokenizer.from_pretrained(ckpt)
        out["load_s"] = time.perf_counter() - t
        modules = [model]
    else:
        from saefe.ingest.encoder import SiglipEncoder

        enc = SiglipEncoder.from_pretrained(ckpt, device=device, batch_size=batch)
        out["load_s"] = time.perf_counter() - t
        modules = [enc.model]
        if mode == "text":
            t = time.perf_counter()
            enc.embed_texts(["a photo of a happy child"])
            out["text_load_s"] = time.perf_counter() - t
            modules.append(enc.text_model)
    out["params_m"] = sum(p.numel() for m in modules for p in m.parameters()) / 1e6
    t = time.perf_counter()
    touch(modules)
    out["touch_s"] = time.perf_counter() - t
    out["rss_loaded_mb"] = rss_mb()
    out["peak_rss_mb"] = peak_rss_mb()
    if mode == "vision" and batches > 0:
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        px = enc.preprocess_cpu(random_images(batch))
        enc.embed_pixels(px[:1])  # warm-up
        sync()
        t, c = time.perf_counter(), time.process_time()
        for _ in range(batches):
            enc.embed_pixels(px)
        sync()
        out["model_img_s"] = batches * batch / (time.perf_counter() - t)
        out["model_cpu_s_per_img"] = (time.process_time() - c) / (batches * batch)
        out["peak_rss_embedding_mb"] = peak_rss_mb()
        out.update(end_to_end(ckpt, device, batch, batches, workdir))
    return out


def end_to_end(ckpt: str, device: str, batch: int, batches: int, workdir: str) -> dict:
    """A real build of ``batch * batches`` JPEGs through build_index (model load excluded)."""
    import logging

    from saefe.ingest.build import BuildConfig, build_index

    logging.basicConfig(level=logging.INFO, format="  %(message)s")
    folder = Path(workdir) / "jpegs"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    n = batch * batches
    for i, img in enumerate(random_images(n, seed=1)):
        img.save(folder / f"img_{i:04d}.jpg", quality=90)
    out_dir = Path(workdir) / "index"
    c = time.process_time()
    s = build_index(BuildConfig(images=str(folder), out=str(out_dir), model=ckpt, device=device, chunk_size=n,
                                force=True, progress=False))
    return {"e2e_img_s": s.embedded_now / s.embed_seconds, "e2e_images": s.embedded_now,
            "e2e_cpu_s_per_img": (time.process_time() - c) / s.embedded_now}


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------
def ensure_so400m(workdir: Path) -> Path:
    """The full-depth random checkpoint, written once (3.5 GB of fp32 safetensors)."""
    from fixtures.checkpoints import Arch, make_checkpoint

    d = workdir / "siglip-so400m-patch14-384-random"
    if not (d / "model.safetensors").exists():
        t = time.perf_counter()
        print(f"writing the full-depth random checkpoint to {d} ...", flush=True)
        make_checkpoint(d, "siglip", Arch(layers=27, text_vocab=32000))
        print(f"  written in {time.perf_counter() - t:.0f}s", flush=True)
    return d


def spawn(mode: str, ckpt: Path, device: str, batch: int, batches: int, workdir: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--ckpt", str(ckpt), "--device", device,
           "--batch", str(batch), "--batches", str(batches), "--workdir", str(workdir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"worker {mode} failed:\n{p.stderr[-3000:]}")
    for line in p.stderr.splitlines():
        if "embedding" in line and "images/s" in line:
            print(line.rstrip())  # the build's own cost estimate
    return json.loads(p.stdout.strip().splitlines()[-1])


def bench_so400m(args) -> None:
    import torch

    workdir = Path(args.workdir or Path(tempfile.gettempdir()) / "saefe-bench-encoder")
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = ensure_so400m(workdir)
    size_gb = (ckpt / "model.safetensors").stat().st_size / 1e9
    with open(ckpt / "model.safetensors", "rb") as f:  # warm the page cache: every load below reads it warm
        while f.read(1 << 26):
            pass
    print(f"# SO400M@384 random weights, {size_gb:.2f} GB safetensors; torch {torch.__version__}, "
          f"device {args.device}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} threads, "
          f"batch {args.batch} x {args.batches}")
    rows = [spawn(m, ckpt, args.device, args.batch, args.batches if m == "vision" else 0, workdir)
            for m in ("vision", "text", "full")]
    v = rows[0]
    print("\n| what is loaded | params (M) | from_pretrained s | + weights resident s | RSS (MB) | peak RSS (MB) |")
    print("|---|---|---|---|---|---|")
    names = {"vision": "vision tower (build, encode, saliency)", "text": "vision, then text tower on first query",
             "full": "full model + tokenizer (before)"}
    for r in rows:
        load = f"{r['load_s']:.1f}" + (f" + {r['text_load_s']:.1f}" if "text_load_s" in r else "")
        print(f"| {names[r['mode']]} | {r['params_m']:.0f} | {load} | {r['touch_s']:.1f} | {r['rss_loaded_mb']:.0f} "
              f"| {r['peak_rss_mb']:.0f} |")
    print(f"(safetensors are memory-mapped: from_pretrained returns before the weights are read; RSS is after "
          f"reading them all once. torch + transformers imported, nothing loaded: {rows[0]['base_rss_mb']:.0f} MB)")
    print("\n| path | images | images/s (wall) | CPU s per image | wall s per 1M images |")
    print("|---|---|---|---|---|")
    print(f"| vision tower on pre-processed pixels | {args.batch * args.batches} | {v['model_img_s']:.3f} | "
          f"{v['model_cpu_s_per_img']:.1f} | {1e6 / v['model_img_s']:.3g} |")
    print(f"| end to end: build_index of JPEGs | {v['e2e_images']} | {v['e2e_img_s']:.3f} | "
          f"{v['e2e_cpu_s_per_img']:.1f} | {1e6 / v['e2e_img_s']:.3g} |")
    print(f"\npeak RSS while embedding batches of {args.batch}: {v['peak_rss_embedding_mb']:.0f} MB; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (wall figures shrink on a busy machine, "
          "CPU seconds per image much less)")
    import logging

    from saefe.ingest.cost import CostEstimate

    logging.getLogger("saefe.ingest.build").setLevel(logging.ERROR)  # printed below instead
    est = CostEstimate(images=1_000_000, device=args.device)
    est.observe(args.batch, args.batch / v["model_img_s"])
    print(f"what a 1M-image build here says after its first batch:\n  {est.message}")


def bench_tiny(args) -> None:
    import torch

    from saefe.ingest.encoder import SiglipEncoder

    enc = SiglipEncoder.from_pretrained("demo", device=args.device, batch_size=64)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    imgs = random_images(64)
    px = enc.preprocess_cpu(imgs)
    enc.embed_pixels(px)
    sync()
    reps = max(1, args.n // 64)
    t = time.perf_counter()
    for _ in range(reps):
        enc.embed_pixels(px)
    sync()
    model = reps * 64 / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(max(1, reps // 2)):
        enc.embed_images(imgs)
    e2e = max(1, reps // 2) * 64 / (time.perf_counter() - t)
    print(f"# tiny SigLIP (64 px, d=128), device {args.device}, {torch.get_num_threads()} threads")
    print("\n| model | batch | model img/s | end-to-end img/s |\n|---|---|---|---|")
    print(f"| tiny SigLIP | 64 | {model:.0f} | {e2e:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=("tiny", "so400m"), default="tiny")
    ap.add_argument("--so400m", action="store_true", help=argparse.SUPPRESS)  # old spelling of --arch so400m
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch", type=int, default=4, help="so400m: images per batch")
    ap.add_argument("--batches", type=int, default=1, help="so400m: timed batches (after a one-image warm-up)")
    ap.add_argument("--n", type=int, default=1024, help="tiny: images per measurement")
    ap.add_argument("--workdir", help="so400m: where the checkpoint is written once (default: a temp dir)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from saefe.ingest.encoder import pick_device

    args.device = pick_device(args.device)
    if args.worker:
        print(json.dumps(worker(args.worker, args.ckpt, args.device, args.batch, args.batches, args.workdir)))
        return
    if args.so400m:
        args.arch = "so400m"
    (bench_so400m if args.arch == "so400m" else bench_tiny)(args)


if __name__ == "__main__":
    main()
