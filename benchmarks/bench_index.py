"""Index benchmark: build time, memory, single-query latency and recall@10 for each index type.

Two synthetic 1152-d generators, L2-normalised:
- ``clustered`` (default): the structure of real image embeddings (a shared mean direction,
  clustered topics in a low-rank subspace, isotropic noise);
- ``hard``: each vector a sparse mix of 24 of 8192 random directions plus noise: a high intrinsic
  dimension, where graph and cluster indexes lose their edge over a scan.
Exact (flat) search is the baseline for recall and latency, measured in the same run. ``auto``
prints the choice it recorded (kept candidate or exact fallback, with its own measurements).

    python benchmarks/bench_index.py                      # 100k and 1M, all types
    python benchmarks/bench_index.py --sizes 100000 --types flat ivf
    python benchmarks/bench_index.py --data hard --sizes 120000 --types flat flat-fp16 auto
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from saefe.ingest.index import IndexConfig, VectorIndex, _exact_search, recall_at_k  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def synthetic(n: int, d: int = 1152, seed: int = 0, topic_size: int = 50, rank: int = 256) -> np.ndarray:
    """fp16 (n, d): mean direction + topic centre + within-topic low-rank spread + noise.

    The number of topics grows with n (about ``topic_size`` images each), as a larger crawl holds
    more subjects rather than more copies of the same ones; a fixed topic count would make
    neighbours ever easier for IVF to find as n grows."""
    rng = np.random.default_rng(seed)
    n_topics = max(1, n // topic_size)
    basis = rng.normal(size=(rank, d)).astype(np.float32) / math.sqrt(d)
    mean = rng.normal(size=d).astype(np.float32)
    mean /= np.linalg.norm(mean)
    centres = rng.normal(size=(n_topics, rank)).astype(np.float32)
    out = np.empty((n, d), np.float16)
    for lo in range(0, n, 100_000):
        m = min(100_000, n - lo)
        topic = rng.integers(0, n_topics, m)
        lat = centres[topic] + 0.8 * rng.standard_normal((m, rank), dtype=np.float32)
        x = lat @ basis
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x = 0.5 * mean + x + 0.35 * rng.standard_normal((m, d), dtype=np.float32) / math.sqrt(d)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[lo : lo + m] = x
    return out


def hard(n: int, d: int = 1152, seed: int = 0, n_dirs: int = 8192, n_active: int = 24, noise: float = 0.1) -> np.ndarray:
    """fp16 (n, d): each row a positive mix of ``n_active`` of ``n_dirs`` random unit directions
    (drawn with replacement: a repeat just adds weight) plus isotropic noise."""
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((n_dirs, d), dtype=np.float32)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    out = np.empty((n, d), np.float16)
    for lo in range(0, n, 10_000):
        m = min(10_000, n - lo)
        idx = rng.integers(0, n_dirs, (m, n_active))
        w = rng.exponential(1.0, (m, n_active)).astype(np.float32)
        x = np.zeros((m, d), np.float32)
        for j in range(n_active):
            x += w[:, j, None] * dirs[idx[:, j]]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x += noise * rng.standard_normal((m, d), dtype=np.float32) / math.sqrt(d)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[lo : lo + m] = x
    return out


def latency_ms(vi: VectorIndex, q: np.ndarray, k: int = 10) -> tuple[float, float]:
    ts = []
    for row in q:
        t = time.perf_counter()
        vi.search(row[None, :], k)
        ts.append((time.perf_counter() - t) * 1000)
    return float(np.percentile(ts, 50)), float(np.percentile(ts, 99))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--types", nargs="+", default=["flat", "ivf", "ivf-sq8", "hnsw"])
    ap.add_argument("--dim", type=int, default=1152)
    ap.add_argument("--queries", type=int, default=300, help="single queries timed (flat: at most 30)")
    ap.add_argument("--recall-queries", type=int, default=500)
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--data", choices=["clustered", "hard"], default="clustered")
    args = ap.parse_args()
    import faiss

    print(f"faiss {faiss.__version__}, threads {faiss.omp_get_max_threads()}, cpu cores {os.cpu_count()}")
    rows = []
    for n in args.sizes:
        t = time.time()
        gen = hard if args.data == "hard" else synthetic
        both = gen(n + max(args.queries, args.recall_queries), args.dim)  # queries: same distribution
        base, qs = both[:n], both[n:].astype(np.float32)
        del both
        print(f"\nN={n:,} ({args.data}): data generated in {time.time() - t:.0f}s", flush=True)
        rq = qs[: args.recall_queries]
        t = time.time()
        _, truth = _exact_search(base, rq, 10)
        print(f"  ground truth (exact, {len(rq)} queries) in {time.time() - t:.0f}s", flush=True)
        for kind in args.types:
            gc.collect()
            r0 = rss_mb()
            t = time.time()
            vi = VectorIndex.build(base, IndexConfig(kind=kind, target_recall=args.target_recall, use_gpu=False))
            build_s = time.time() - t
            mem = rss_mb() - r0
            _, got = vi.search(rq, 10)
            rec = recall_at_k(got, truth)
            nq = min(args.queries, 30) if kind.startswith("flat") or vi.kind.startswith("flat") else args.queries
            p50, p99 = latency_ms(vi, qs[-nq:])
            params = {k: v for k, v in vi.params.items() if k not in ("kind", "choice", "measured")}
            if kind == "auto":
                params = {"chose": vi.kind, **params}
                print(f"  auto: {vi.params.get('choice')}", flush=True)
            rows.append((n, kind, build_s, mem, p50, p99, rec, params))
            print(f"  {kind:8s} build {build_s:7.1f}s  mem {mem:8.0f} MB  p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  "
                  f"recall@10 {rec:.3f}  {params}", flush=True)
            del vi
        del base
    flat = {r[0]: r for r in rows if r[1] == "flat"}
    print("\n| N | index | build s | memory MB | p50 ms | p99 ms | recall@10 | p50 speed-up vs flat | params |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, kind, b, m, p50, p99, rec, params in rows:
        su = f"{flat[n][4] / p50:.1f}x" if n in flat else "-"
        print(f"| {n:,} | {kind} | {b:.1f} | {m:.0f} | {p50:.2f} | {p99:.2f} | {rec:.3f} | {su} | {params} |")


if __name__ == "__main__":
    main()
