#!/usr/bin/env python
"""The build's CPU side alone (no model): read + sha256 + decode (JPEG draft) + resize to the
model's input, with the thread loader against the process loader (``--loader-processes``).

This is what feeds the GPU: SO400M@384 embeds ~460 images/s on an H100, so the loader has to
deliver that many from the CPUs. Synthetic photo-sized JPEGs (0.2-1 MP, as benchmarks/bench_gpu.py
writes them), SigLIP's 384x384 bicubic resize to uint8 (ingest/pixels.py), chunks of 1024.

    python benchmarks/bench_loader.py --images 2000 --threads 1,2,4 --processes 1,2

Prints images/s per setting and the ratio to the thread loader at its default (one thread per
core), on this machine's CPUs (named in the header).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def plan_384():
    from PIL import Image

    from saefe.ingest.pixels import PixelPlan

    return PixelPlan(384, 384, int(Image.BICUBIC), 1 / 255, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def run(corpus, spans, kind: str, n: int) -> float:
    from saefe.ingest.loader import ChunkLoader
    from saefe.ingest.loader_procs import ProcessChunkLoader

    plan = plan_384()
    t0 = time.perf_counter()
    loader = (ChunkLoader(corpus, plan.resize, (384, 384), n) if kind == "threads"
              else ProcessChunkLoader(corpus, plan.resize, (384, 384), n, spans))
    got = 0
    with loader:
        for lo, hi in spans:
            items, px = loader.load(lo, hi)
            got += 0 if px is None else len(px)
    return got / (time.perf_counter() - t0)


def main(argv=None) -> int:
    from bench_gpu import make_images

    from saefe.ingest.corpus import FolderCorpus
    from saefe.ingest.loader import default_workers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--threads", default="1,2,4")
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--work", default="/tmp/saefe_bench_loader")
    args = ap.parse_args(argv)
    d = make_images(Path(args.work) / "jpegs", args.images)
    corpus = FolderCorpus.scan(d)
    n = min(len(corpus), args.images)
    spans = [(a, min(n, a + 1024)) for a in range(0, n, 1024)]
    cpu = platform.processor() or platform.machine()
    print(f"{n} JPEGs (0.2-1 MP) -> 384x384 uint8; {os.cpu_count()} CPUs ({cpu}); default threads: {default_workers()}")
    run(corpus, spans[:1], "threads", 2)  # warm the page cache
    rows = []
    threads = sorted({*(int(x) for x in args.threads.split(",") if x), default_workers()})  # the baseline always runs
    for kind, counts in (("threads", threads), ("processes", [int(x) for x in args.processes.split(",") if x])):
        for c in counts:
            rows.append((kind, c, run(corpus, spans, kind, c)))
    base = next(r for k, c, r in rows if k == "threads" and c == default_workers())
    print(f"{'loader':<10} {'workers':>7} {'images/s':>9} {'vs threads x' + str(default_workers()):>14}")
    for kind, c, r in rows:
        print(f"{kind:<10} {c:>7} {r:>9.1f} {r / base:>14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
