"""SAE speed: training and encoding samples/s for three top-k implementations, same run.

    sparse  (ours)  no-grad dense pre-activations -> top-(k+1) (seed's strict rule) -> the k
                    values recomputed from k encoder rows; embedding_bag decode. Backward
                    touches k rows per input, never a dense (batch, d_hidden) gradient.
    dense           torch.topk + scatter into a dense (batch, d_hidden) code, dense decoder
                    matmul, autograd through all of it.
    seed            the original: ReLU, kthvalue + where over the dense activations, dense decode.

    python benchmarks/bench_sae_speed.py                      # small size on CPU (< ~2 min)
    python benchmarks/bench_sae_speed.py --reference --device cuda   # d_emb 1152, d_hidden 262144, k 128

Each measurement is bounded by --seconds (after one warm-up step), so a run takes about
3 impls x 2 phases x --seconds plus set-up.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saefe.sae.model import SAEConfig, TopKSAE  # noqa: E402
from saefe.sae.train import FORWARDS  # noqa: E402


def encode_sparse(m: TopKSAE, x):
    return m.encode(x)


def encode_dense(m: TopKSAE, x):
    h = F.relu(m.pre_activations(x))
    v, i = torch.topk(h, m.config.top_k, dim=-1, sorted=False)
    return torch.zeros_like(h).scatter(-1, i, v)


def encode_seed(m: TopKSAE, x):
    return m.dense_codes(x)


ENCODERS = {"sparse": encode_sparse, "dense": encode_dense, "seed": encode_seed}


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, dev, seconds: float, max_iters: int) -> tuple[float, int]:
    fn()  # warm-up (allocator, kernels)
    _sync(dev)
    t0 = time.perf_counter()
    n = 0
    while n < max_iters and (time.perf_counter() - t0) < seconds:
        fn()
        n += 1
    _sync(dev)
    return (time.perf_counter() - t0) / max(n, 1), n


def bench(d_emb, d_hidden, k, batch, enc_batch, dev, seconds, max_iters, impls):
    rows = []
    torch.manual_seed(0)
    model = TopKSAE(SAEConfig(d_emb, d_hidden, k, up_proj_bias=True, pre_bias=True)).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = F.normalize(torch.randn(batch, d_emb, device=dev), dim=-1)
    xe = F.normalize(torch.randn(enc_batch, d_emb, device=dev), dim=-1)
    for name in impls:
        row = {"impl": name}
        fwd = FORWARDS[name]

        def step():
            x_hat, *_ = fwd(model, x)
            loss = ((x - x_hat) ** 2).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for phase, fn, n_in in (("train", step, batch), ("encode", lambda: ENCODERS[name](model, xe), enc_batch)):
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                if phase == "encode":
                    with torch.no_grad():
                        sec, n = _timed(fn, dev, seconds, max_iters)
                else:
                    sec, n = _timed(fn, dev, seconds, max_iters)
                row[f"{phase}_sps"] = n_in / sec
                row[f"{phase}_ms"] = sec * 1000
                row[f"{phase}_iters"] = n
                if dev.type == "cuda":
                    row[f"{phase}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            except torch.OutOfMemoryError:
                row[f"{phase}_sps"] = float("nan")
                row[f"{phase}_note"] = "OOM"
            gc.collect()
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", action="store_true", help="d_emb 1152, d_hidden 262144, k 128 (GPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--d-emb", type=int, default=256)
    p.add_argument("--d-hidden", type=int, default=8192)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=None, help="training batch (default 512 CPU, 4096 reference)")
    p.add_argument("--encode-batch", type=int, default=None)
    p.add_argument("--seconds", type=float, default=None, help="time per measurement (default 8 CPU, 12 GPU)")
    p.add_argument("--max-iters", type=int, default=200)
    p.add_argument("--impls", nargs="+", default=["sparse", "dense", "seed"], choices=list(FORWARDS))
    a = p.parse_args(argv)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if a.reference:
        a.d_emb, a.d_hidden, a.k = 1152, 262144, 128
    batch = a.batch or (4096 if a.reference else 512)
    enc_batch = a.encode_batch or batch
    seconds = a.seconds or (12.0 if dev.type == "cuda" else 8.0)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device {name}; d_emb {a.d_emb}, d_hidden {a.d_hidden}, k {a.k}; train batch {batch}, encode batch {enc_batch}; "
          f"<= {seconds:.0f}s or {a.max_iters} iters per cell; torch {torch.__version__}")
    t0 = time.time()
    rows = bench(a.d_emb, a.d_hidden, a.k, batch, enc_batch, dev, seconds, a.max_iters, a.impls)
    base = {r["impl"]: r for r in rows}
    gpu = dev.type == "cuda"
    head = f"| impl | train samples/s | train ms/step | encode samples/s | encode ms/batch |{' train peak GiB | encode peak GiB |' if gpu else ''} train x vs seed | encode x vs seed |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        def f(key, fmt="{:,.0f}"):
            v = r.get(key)
            return r.get(key.replace("_sps", "_note").replace("_ms", "_note"), "-") if v is None or v != v else fmt.format(v)

        s = base.get("seed", {})
        rel_t = r.get("train_sps", float("nan")) / s.get("train_sps", float("nan")) if s else float("nan")
        rel_e = r.get("encode_sps", float("nan")) / s.get("encode_sps", float("nan")) if s else float("nan")
        mem = f" {f('train_peak_gib', '{:.1f}')} | {f('encode_peak_gib', '{:.1f}')} |" if gpu else ""
        print(f"| {r['impl']} | {f('train_sps')} | {f('train_ms', '{:.1f}')} | {f('encode_sps')} | {f('encode_ms', '{:.1f}')} |{mem} {rel_t:.2f} | {rel_e:.2f} |")
    print(f"total {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
