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
    python benchmarks/bench_index.py --sizes 5000000 --types ivfpq-ondisk --workdir /data/bench   # past RAM

``ivfpq-ondisk`` never holds the corpus in RAM: vectors are generated in chunks into an fp16
``vectors.npy`` under ``--workdir`` (reused when present), exact ground truth streams over it,
and the index is loaded and queried in a fresh process so its memory is its own (anonymous =
the process' RAM; file-backed = page cache of the lists and re-ranked vectors, reclaimable).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from saefe.ingest.index import IndexConfig, VectorIndex, _exact_search, recall_at_k  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from procstat import rss_detail, rss_mb  # noqa: E402


def _clustered_blocks(total: int, d: int, seed: int, topic_size: int, rank: int, block: int = 100_000):
    """(lo, float32 block) over ``total`` unit rows: mean direction + topic centre + within-topic
    low-rank spread + noise; the number of topics grows with ``total``."""
    rng = np.random.default_rng(seed)
    n_topics = max(1, total // topic_size)
    basis = rng.normal(size=(rank, d)).astype(np.float32) / math.sqrt(d)
    mean = rng.normal(size=d).astype(np.float32)
    mean /= np.linalg.norm(mean)
    centres = rng.normal(size=(n_topics, rank)).astype(np.float32)
    for lo in range(0, total, block):
        m = min(block, total - lo)
        topic = rng.integers(0, n_topics, m)
        lat = centres[topic] + 0.8 * rng.standard_normal((m, rank), dtype=np.float32)
        x = lat @ basis
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x = 0.5 * mean + x + 0.35 * rng.standard_normal((m, d), dtype=np.float32) / math.sqrt(d)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield lo, x


def synthetic(n: int, d: int = 1152, seed: int = 0, topic_size: int = 50, rank: int = 256) -> np.ndarray:
    """fp16 (n, d) clustered vectors (:func:`_clustered_blocks`).

    The number of topics grows with n (about ``topic_size`` images each), as a larger crawl holds
    more subjects rather than more copies of the same ones; a fixed topic count would make
    neighbours ever easier for IVF to find as n grows."""
    out = np.empty((n, d), np.float16)
    for lo, x in _clustered_blocks(n, d, seed, topic_size, rank):
        out[lo : lo + len(x)] = x
    return out


def synthetic_to_file(path: Path, n: int, n_queries: int, d: int = 1152, seed: int = 0, topic_size: int = 50,
                      rank: int = 256) -> np.ndarray:
    """``synthetic`` (same distribution and seed handling) written in chunks to an fp16 .npy
    memmap of n rows; returns the n_queries extra rows (same distribution) as float32."""
    tmp = path.with_name(path.name + ".tmp")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, d))
    queries = np.empty((n_queries, d), np.float32)
    for a, x in _clustered_blocks(n + n_queries, d, seed, topic_size, rank):
        b = a + len(x)
        if a < n:
            out[a : min(b, n)] = x[: min(b, n) - a]
        if b > n:
            queries[max(a, n) - n : b - n] = x[max(a, n) - a :]
    out.flush()
    del out
    os.replace(tmp, path)
    return queries


def ondisk_query(workdir: Path, n_queries: int) -> dict:
    """Fresh process: load the on-disk index, time single queries, recall against the truth file."""
    from saefe.ingest.index import VectorIndex

    q = np.load(workdir / "queries.npy")
    truth = np.load(workdir / "truth.npy")
    r0 = rss_detail()
    t = time.perf_counter()
    vi = VectorIndex.load(workdir, use_gpu=False)
    load_ms = (time.perf_counter() - t) * 1000
    r1 = rss_detail()
    _, got = vi.search(q[: len(truth)], 10)
    rec = recall_at_k(got, truth)
    p50, p99 = latency_ms(vi, q[-n_queries:])
    r2 = rss_detail()
    return {"load_ms": load_ms, "recall": rec, "p50": p50, "p99": p99, "params": {k: v for k, v in vi.params.items()
            if k in ("factory", "nprobe", "rerank", "nlist", "pq_m", "opq_dim")},
            "rss_loaded": {k: r1[k] - r0[k] for k in r1}, "rss_after": {k: r2[k] - r0[k] for k in r2}}


def bench_ondisk(n: int, args) -> tuple:
    """Build (resumable: a killed run resumes its shards) and measure an ivfpq-ondisk index."""
    from saefe.ingest.index import IndexConfig, build_saved_index
    from saefe.ingest.index_sizing import estimate_memory

    wd = Path(args.workdir) / f"n{n}"
    wd.mkdir(parents=True, exist_ok=True)
    nq = max(args.queries, args.recall_queries)
    if not (wd / "vectors.npy").exists():
        t = time.time()
        np.save(wd / "queries.npy", synthetic_to_file(wd / "vectors.npy", n, nq, args.dim))
        print(f"  data generated in {time.time() - t:.0f}s ({n * args.dim * 2 / 1e9:.1f} GB fp16)", flush=True)
    base = np.load(wd / "vectors.npy", mmap_mode="r")
    if not (wd / "truth.npy").exists():
        t = time.time()
        _, truth = _exact_search(base, np.load(wd / "queries.npy")[: args.recall_queries], 10)
        np.save(wd / "truth.npy", truth)
        print(f"  ground truth (exact, {args.recall_queries} queries) in {time.time() - t:.0f}s", flush=True)
    ondisk = {k: v for k, v in (("nprobe", args.nprobe), ("rerank", args.rerank), ("nlist", args.nlist)) if v}
    r0 = rss_detail()
    t = time.time()
    if args.rebuild or not (wd / "index.json").exists() or json.loads((wd / "index.json").read_text()).get("kind") != "ivfpq-ondisk":
        build_saved_index(wd, IndexConfig(kind="ivfpq-ondisk", target_recall=args.target_recall, use_gpu=False, ondisk=ondisk),
                          progress=True)
    build_s = time.time() - t
    peak = rss_detail()["VmRSS"] - r0["VmRSS"]
    proc = subprocess.run([sys.executable, __file__, "--ondisk-query", str(wd), "--queries", str(args.queries)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    info = json.loads((wd / "index.json").read_text())
    est = estimate_memory("ivfpq-ondisk", n, args.dim, info)
    mem = res["rss_after"]["RssAnon"]
    print(f"  ivfpq-ondisk build {build_s:.0f}s {info.get('build_seconds')}  RSS anon {mem:.0f} MB (estimate {est / 2**20:.0f} MB), "
          f"file-backed {res['rss_after']['RssFile']:.0f} MB  p50 {res['p50']:.2f} ms  p99 {res['p99']:.2f} ms  "
          f"recall@10 {res['recall']:.3f}  {res['params']}", flush=True)
    disk = sum(p.stat().st_size for p in wd.glob("index*")) / 2**20
    return (n, "ivfpq-ondisk", build_s, mem, res["p50"], res["p99"], res["recall"],
            {**res["params"], "file_MB": round(res["rss_after"]["RssFile"]), "lists_MB_on_disk": round(disk),
             "build_peak_MB": round(peak)})


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
    ap.add_argument("--workdir", default="/tmp/saefe_bench_index", help="ivfpq-ondisk: where vectors and index go")
    ap.add_argument("--nprobe", type=int, default=0, help="ivfpq-ondisk: fixed probes (0: tuned)")
    ap.add_argument("--rerank", type=int, default=0, help="ivfpq-ondisk: fixed re-rank depth (0: tuned)")
    ap.add_argument("--nlist", type=int, default=0, help="ivfpq-ondisk: lists (0: derived from N)")
    ap.add_argument("--rebuild", action="store_true", help="ivfpq-ondisk: rebuild even if an index is there")
    ap.add_argument("--ondisk-query", help=argparse.SUPPRESS)
    ap.add_argument("--data", choices=["clustered", "hard"], default="clustered")
    args = ap.parse_args()
    if args.ondisk_query:
        print(json.dumps(ondisk_query(Path(args.ondisk_query), args.queries)))
        return
    import faiss

    print(f"faiss {faiss.__version__}, threads {faiss.omp_get_max_threads()}, cpu cores {os.cpu_count()}")
    rows = []
    for n in args.sizes:
        if "ivfpq-ondisk" in args.types:
            rows.append(bench_ondisk(n, args))
        mem_types = [t for t in args.types if t != "ivfpq-ondisk"]
        if not mem_types:
            continue
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
        for kind in mem_types:
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
