"""Feature-mode search over memory-mapped SAE codes (schema 2 .npy arrays) at corpus scale.

Synthetic top-k codes for N images (skewed feature frequencies, like a real SAE's), merged out
of core by the same ``codes_store.merge_chunks`` encode-sae uses, then searched from a fresh
process with ``FeatureRanker`` over ``open_arrays`` (memory-mapped): resident memory after
opening and after the queries (anonymous vs file-backed pages), and latency of 10-feature mixes.

    python benchmarks/bench_feature_codes.py --n 10000000 --k 32
    python benchmarks/bench_feature_codes.py --n 200000 --k 32 --out /tmp/codes   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from procstat import rss_detail as rss  # noqa: E402


def chunk_loader(c: int, rows: int, k: int, h: int, seed: int):
    """Deterministic codes of one chunk: distinct ascending-gap feature ids per row, a Zipf-like
    base feature (a few features fire often, most rarely), positive activations."""
    def load():
        rng = np.random.default_rng([seed, c])
        base = (h * rng.random(rows) ** 3).astype(np.int64)  # skew toward low ids
        gaps = 1 + rng.geometric(min(1.0, 4.0 * k / h), size=(rows, k))
        gaps[:, 0] -= 1
        gaps = np.minimum(gaps, max(1, (h - 1) // k))  # k distinct ids within one turn of the ring
        ids = (base[:, None] + np.cumsum(gaps, 1)) % h
        perm = np.random.default_rng(seed).permutation(h)  # spread hot ids over the id space
        vals = rng.exponential(1.0, (rows, k)).astype(np.float32) + 1e-3
        return vals, perm[ids].astype(np.int32)
    return load


def build(out: Path, n: int, k: int, h: int, chunk: int, seed: int) -> dict:
    from tqdm import tqdm

    from saefe.sae.codes_store import merge_chunks

    out.mkdir(parents=True, exist_ok=True)
    loaders = [chunk_loader(c, min(chunk, n - lo), k, h, seed) for c, lo in enumerate(range(0, n, chunk))]
    t = time.time()
    nnz = merge_chunks(loaders, n, h, out, progress=tqdm(total=n, desc="merge (pass 2)", unit="img"))
    info = {"n": n, "k": k, "d_hidden": h, "nnz": nnz, "merge_s": round(time.time() - t, 1),
            "disk_gb": round(sum(p.stat().st_size for p in out.glob("*.npy")) / 1e9, 2)}
    (out / "bench.json").write_text(json.dumps(info))
    return info


def query(out: Path, n_queries: int, seed: int) -> dict:
    """Run in a fresh process: open the arrays memory-mapped, rank mixes, report RSS and latency."""
    from saefe.sae.codes_store import open_arrays
    from saefe.search.feature_rank import FeatureRanker

    info = json.loads((out / "bench.json").read_text())
    r0 = rss()
    t = time.perf_counter()
    csr, csc = open_arrays(out, (info["n"], info["d_hidden"]))
    ranker = FeatureRanker(csc, info["n"])
    open_ms = (time.perf_counter() - t) * 1000
    r1 = rss()
    indptr = np.asarray(csc.indptr)
    freq = np.diff(indptr)
    alive = np.flatnonzero(freq)
    rng = np.random.default_rng(seed)
    res = {"open_ms": round(open_ms, 2), "rss_open": {k: round(r1[k] - r0[k], 1) for k in r1}}
    for label, p in (("uniform", None), ("by frequency", freq[alive] / freq[alive].sum())):
        ts, posts = [], []
        for _ in range(n_queries):
            ids = rng.choice(alive, 10, replace=False, p=p)
            w = rng.uniform(-1, 2, 10)
            t = time.perf_counter()
            ranker.rank(ids, w, 20)
            ts.append((time.perf_counter() - t) * 1000)
            posts.append(int(freq[ids].sum()))
        res[label] = {"p50_ms": round(float(np.percentile(ts, 50)), 2), "p99_ms": round(float(np.percentile(ts, 99)), 2),
                      "first_ms": round(ts[0], 2), "median_postings": int(np.median(posts))}
    r2 = rss()
    res["rss_after"] = {k: round(r2[k] - r0[k], 1) for k in r2}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--d-hidden", type=int, default=262_144)
    ap.add_argument("--chunk", type=int, default=500_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/saefe_bench_codes")
    ap.add_argument("--query-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    if args.query_only:
        print(json.dumps(query(out, args.queries, args.seed)))
        return
    meta = out / "bench.json"
    if meta.exists() and json.loads(meta.read_text())[ "n"] == args.n and json.loads(meta.read_text())["k"] == args.k:
        info = json.loads(meta.read_text())
    else:
        info = build(out, args.n, args.k, args.d_hidden, args.chunk, args.seed)
    print(f"codes: {info}", flush=True)
    proc = subprocess.run([sys.executable, __file__, "--out", str(out), "--queries", str(args.queries), "--seed", str(args.seed),
                           "--query-only"], capture_output=True, text=True, check=True)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(res, indent=1))
    print("\n| N | k | d_hidden | nnz | disk GB | merge s | open ms | mix | postings (median) | p50 ms | p99 ms | "
          "RSS anon MB | RSS file MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label in ("uniform", "by frequency"):
        r = res[label]
        print(f"| {info['n']:,} | {info['k']} | {info['d_hidden']:,} | {info['nnz']:,} | {info['disk_gb']} | {info['merge_s']} | "
              f"{res['open_ms']} | 10 features, {label} | {r['median_postings']:,} | {r['p50_ms']} | {r['p99_ms']} | "
              f"{res['rss_after'].get('RssAnon', float('nan')):.0f} | {res['rss_after'].get('RssFile', float('nan')):.0f} |")


if __name__ == "__main__":
    main()
