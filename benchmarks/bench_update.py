#!/usr/bin/env python
"""Incremental build benchmark: a folder of N demo images, then +A / -R / C changed, built again.

Prints what the update embedded against a full rebuild (``--force``) of the same folder, with the
time of each step: the update must embed A + C images, not N + A - R.

    python benchmarks/bench_update.py                      # 1,000 images, +80 / -30 / 1 changed
    python benchmarks/bench_update.py --n 5000 --add 400 --remove 100 --change 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--add", type=int, default=80)
    ap.add_argument("--remove", type=int, default=30)
    ap.add_argument("--change", type=int, default=1)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--work", help="work dir (default: a temp dir, deleted afterwards)")
    args = ap.parse_args(argv)
    from PIL import Image, ImageOps

    from saefe.demo.corpus import DemoConfig, generate_demo
    from saefe.ingest.build import BuildConfig, build_index

    work = Path(args.work or tempfile.mkdtemp(prefix="saefe-bench-update-"))
    try:
        t = time.time()
        corpus = generate_demo(work / "gen", DemoConfig(n=args.n + args.add, seed=7), progress=False)
        files = sorted(p for p in corpus.images_dir.rglob("*") if p.is_file())
        folder, later = work / "images", work / "later"
        for i, p in enumerate(files):  # the first n now, the last `add` later
            dst = (folder if i < args.n else later) / p.relative_to(corpus.images_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dst)
        print(f"generated {len(files)} demo images in {time.time() - t:.0f}s (cpu cores: {os.cpu_count()})")
        cfg = BuildConfig(images=str(folder), out=str(work / "index"), model=args.model, progress=False)
        rows = []

        def run(name, c):
            t0 = time.time()
            s = build_index(c)
            rows.append((name, s.embedded_now, s.count, s.update, time.time() - t0))

        run(f"first build ({args.n})", cfg)
        for p in sorted(later.rglob("*")):
            if p.is_file():
                dst = folder / p.relative_to(later)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(p, dst)
        present = sorted(p for p in folder.rglob("*") if p.is_file())
        for p in present[: args.remove]:
            p.unlink()
        for p in present[args.remove: args.remove + args.change]:
            with Image.open(p) as im:
                ImageOps.mirror(im.convert("RGB")).save(p)
        run(f"update (+{args.add} / -{args.remove} / {args.change} changed)", cfg)
        run("same command again", cfg)
        run("full rebuild (--force)", BuildConfig(**{**cfg.__dict__, "force": True}))
        print("\n| step | embedded | images in index | added / changed / removed / unchanged | seconds |")
        print("|---|---|---|---|---|")
        for name, emb, count, upd, secs in rows:
            u = " / ".join(str(upd.get(k, 0)) for k in ("added", "changed", "removed", "unchanged")) if upd else "-"
            print(f"| {name} | {emb} | {count} | {u} | {secs:.1f} |")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
