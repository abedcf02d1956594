#!/usr/bin/env python
"""faiss on the GPU at 10M x 1152: IVF-PQ build (train + add) and search, recall@10 against exact.

Vectors are clustered synthetic ones (a topic centre per ~50 vectors in a rank-256 subspace plus
noise, like benchmarks/bench_index.py) generated on the GPU with torch in chunks; exact ground
truth is a torch fp16 matmul over all of them. Needs a faiss build with GPUs (faiss-gpu-cu12);
prints why not and exits 0 otherwise.

    python benchmarks/bench_faiss_gpu.py --n 10000000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--dim", type=int, default=1152)
    ap.add_argument("--nlist", type=int, default=16384)
    ap.add_argument("--pq-m", type=int, default=96, help="bytes per vector; GPU IVF-PQ needs d/m in 1..4,6,8,10,12,16,20,24,28,32,...")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--json")
    args = ap.parse_args()
    try:
        import faiss
    except ImportError as e:
        print(f"faiss is not importable here ({e}); skipping")
        return 0
    ngpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if not ngpu:
        print(f"faiss {faiss.__version__} sees no GPU (a CPU-only wheel); skipping")
        return 0
    import torch

    card = torch.cuda.get_device_name(0)
    n, d = args.n, args.dim
    g = torch.Generator(device="cuda").manual_seed(0)
    rank, topics = 256, max(1, n // 50)
    basis = torch.randn(rank, d, device="cuda", generator=g) / d**0.5
    mean = torch.randn(d, device="cuda", generator=g)
    mean /= mean.norm()
    centres = torch.randn(topics, rank, device="cuda", generator=g)

    def make(m: int) -> torch.Tensor:
        t = torch.randint(0, topics, (m,), device="cuda", generator=g)
        x = (centres[t] + 0.8 * torch.randn(m, rank, device="cuda", generator=g)) @ basis
        x = x / x.norm(dim=1, keepdim=True)
        x = 0.5 * mean + x + 0.35 * torch.randn(m, d, device="cuda", generator=g) / d**0.5
        return (x / x.norm(dim=1, keepdim=True)).half()

    t0 = time.time()
    base = torch.empty(n, d, device="cuda", dtype=torch.float16)
    for lo in range(0, n, 1_000_000):
        base[lo : lo + 1_000_000] = make(min(1_000_000, n - lo))
    q = make(args.queries).float()
    torch.cuda.synchronize()
    gen_s = time.time() - t0
    t0 = time.time()
    truth = torch.cat([torch.topk(q[i : i + 100].half() @ base.T, 10, dim=1).indices for i in range(0, len(q), 100)]).cpu().numpy()
    exact_s = time.time() - t0
    res = faiss.StandardGpuResources()
    cfg = faiss.GpuIndexIVFPQConfig()
    cfg.useFloat16LookupTables = True
    index = faiss.GpuIndexIVFPQ(res, d, args.nlist, args.pq_m, 8, faiss.METRIC_INNER_PRODUCT, cfg)
    t0 = time.time()
    sample = base[torch.randperm(n, device="cuda", generator=g)[: min(n, 40 * args.nlist)]].float().cpu().numpy()
    index.train(sample)
    train_s = time.time() - t0
    t0 = time.time()
    for lo in range(0, n, 500_000):
        index.add(base[lo : lo + 500_000].float().cpu().numpy())
    add_s = time.time() - t0
    qn = q.cpu().numpy()
    rows = []
    for nprobe in (16, 64, 256):
        index.nprobe = nprobe
        _, ids = index.search(qn[:10], 100)  # warm-up
        lat = []
        for i in range(len(qn)):
            t = time.perf_counter()
            _, ids1 = index.search(qn[i : i + 1], 100)
            lat.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        _, cand = index.search(qn, 100)
        batch_qps = len(qn) / (time.perf_counter() - t)
        # exact re-rank of the 100 PQ candidates on the GPU, as the on-disk index does on the CPU
        c = torch.from_numpy(cand).cuda().clamp_min(0)
        s = torch.einsum("qd,qkd->qk", q.half(), base[c])
        top = torch.gather(c, 1, torch.topk(s, 10, dim=1).indices).cpu().numpy()
        rec_pq = np.mean([len(set(a[:10]) & set(b)) / 10 for a, b in zip(cand, truth)])
        rec_rr = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top, truth)])
        rows.append({"nprobe": nprobe, "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                     "batch_qps": batch_qps, "recall10_pq": float(rec_pq), "recall10_rerank100": float(rec_rr)})
        print(rows[-1], flush=True)
    out = {"card": card, "faiss": faiss.__version__, "n": n, "dim": d, "nlist": args.nlist, "pq_m": args.pq_m,
           "gen_s": gen_s, "exact_truth_s": exact_s, "train_s": train_s, "add_s": add_s, "search": rows}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    print("\n| card | N | index | train s | add s | nprobe | p50 ms | p99 ms | batched q/s | recall@10 PQ | recall@10 re-ranked |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {card} | {n:,} | IVF{args.nlist},PQ{args.pq_m} (GPU) | {train_s:.0f} | {add_s:.0f} | {r['nprobe']} | "
              f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['batch_qps']:.0f} | {r['recall10_pq']:.3f} | {r['recall10_rerank100']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
