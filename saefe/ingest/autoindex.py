"""``auto``: an approximate index only where it beats exact search; measured, then recorded.

1. Kinds from the memory budget (autofaiss-style estimates, ``index.memory_estimate``): the
   approximate candidate is HNSW (CPU) or IVF (GPU) in fp32, else IVF-SQ8; the exact fallback is
   flat-fp16 (the store's own fp16 vectors: exact), else flat-sq8. When nothing in RAM fits the
   budget, ``auto`` builds the on-disk IVF-PQ (``wants_ondisk``; index_ondisk.py), whose lists
   stay on disk.
2. The exact scan's single-query latency is timed on a sample of rows and scaled to N (a scan
   is linear in N), so it costs seconds, not a second copy of the corpus.
3. The candidate is built and tuned for the recall target; tuning stops early once a query gets
   slower than the exact scan divided by ``min_speedup`` (it cannot win from there).
4. Recall@10 and latency are measured on held-out queries (not those used for tuning: perturbed
   base vectors and blends of two base vectors, like a steered query). The candidate is kept if
   it reaches the target recall at least ``min_speedup`` times faster than exact; otherwise the
   exact scan is built. Both figures, the speed-up and the choice go into index.json
   (``measured``, ``choice``, ``fallback``, ``memory_bytes``) and the build summary.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import numpy as np

from saefe.errors import SaefeError
from saefe.ingest.index import (EXACT_KINDS, IndexConfig, _exact_search, _faiss, memory_estimate, recall_at_k,
                                sample_queries, single_query_ms)

log = logging.getLogger(__name__)

EXACT_SAMPLE = 65536  # rows timed to estimate the exact scan's latency
LATENCY_QUERIES = 60


def _ms(x: float) -> str:
    return f"{x:.3g} ms"


def _mb(b: int) -> str:
    return f"{b / 2**20:,.0f} MB"


def wants_ondisk(cfg: IndexConfig, n: int, d: int) -> bool:
    """``auto`` under a memory budget that no in-RAM kind fits, exact or approximate: True when the
    on-disk IVF-PQ's resident part (centroids, OPQ, codebooks; the lists are memory-mapped) fits."""
    from saefe.ingest.index_sizing import estimate_memory

    if cfg.kind != "auto" or not cfg.max_memory or n <= cfg.flat_max:
        return False
    try:
        plan_kinds(cfg, n, d, has_gpu=False)
        return False
    except SaefeError:
        return estimate_memory("ivfpq-ondisk", n, d, cfg.ondisk) <= cfg.max_memory


def plan_kinds(cfg: IndexConfig, n: int, d: int, has_gpu: bool) -> tuple[str | None, str, list[str]]:
    """(approximate candidate or None, exact fallback, notes) for n x d vectors under the budget."""
    budget = cfg.max_memory or None
    notes: list[str] = []

    def fits(kind: str) -> bool:
        return budget is None or memory_estimate(kind, n, d, cfg) <= budget

    exact_pref = ("flat", "flat-fp16", "flat-sq8") if n <= cfg.flat_max else ("flat-fp16", "flat-sq8")
    exact = next((k for k in exact_pref if fits(k)), None)
    candidate = None
    if n > cfg.flat_max:
        prefs = ["ivf" if has_gpu else "hnsw", "ivf-sq8"]
        candidate = next((k for k in prefs if fits(k)), None)
        if candidate != prefs[0] and budget:
            notes.append(f"budget {_mb(budget)} rules out {prefs[0]} ({_mb(memory_estimate(prefs[0], n, d, cfg))})")
    if exact is None and candidate is None:
        raise SaefeError(
            f"no index over {n} x {d} vectors fits --max-index-memory {_mb(budget)}: the smallest in-RAM kind, "
            f"flat-sq8, needs {_mb(memory_estimate('flat-sq8', n, d, cfg))}; raise the budget (`auto` builds "
            "ivfpq-ondisk below that when its resident part fits)")
    if exact is None:  # only the candidate fits: keep it whatever it measures
        notes.append("no exact scan fits the budget")
    return candidate, exact, notes


def held_out_queries(vectors: np.ndarray, nq: int) -> np.ndarray:
    """Queries drawn like the tuning ones (``sample_queries``) but with another seed: held out."""
    return sample_queries(vectors, nq, seed=2)


def exact_latency_ms(cls, vectors: np.ndarray, kind: str, cfg: IndexConfig, q: np.ndarray) -> float:
    """Single-query latency of the exact ``kind`` over all N rows, timed on a sample and scaled."""
    n = len(vectors)
    s = min(n, EXACT_SAMPLE)
    rows = np.sort(np.random.default_rng(3).choice(n, s, replace=False)) if s < n else np.arange(n)
    sample = cls.build_kind(np.asarray(vectors[rows]), kind, cfg)
    ms = single_query_ms(sample, q)
    del sample
    return ms * n / s


def _measure(vi, q: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    _, got = vi.search(q, truth.shape[1])
    return recall_at_k(got, truth), single_query_ms(vi, q[:LATENCY_QUERIES])


def build_auto(cls, vectors: np.ndarray, cfg: IndexConfig, progress: bool = False):
    """The ``auto`` kind; see the module docstring."""
    faiss = _faiss()
    n, d = vectors.shape
    has_gpu = cfg.use_gpu and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    candidate, exact, notes = plan_kinds(cfg, n, d, has_gpu)
    if candidate is None:  # a small corpus (or nothing approximate fits): exact
        vi = cls.build_kind(vectors, exact, cfg, progress)
        why = f"{n} vectors <= flat_max {cfg.flat_max}" if n <= cfg.flat_max else "no approximate index fits"
        return _finish(vi, n, d, cfg, f"{exact}: exact search ({why})", notes)
    nq = max(20, int(cfg.measure_queries))
    q = held_out_queries(vectors, nq)
    _, truth = _exact_search(vectors, q, 10)
    ex_ms = exact_latency_ms(cls, vectors, exact, cfg, q[:30]) if exact else None
    limit = ex_ms / cfg.min_speedup if (ex_ms and cfg.min_speedup > 0) else None
    vi = cls.build_kind(vectors, candidate, cfg, progress, tune_limit_ms=limit)
    rec, ms = _measure(vi, q, truth)
    speedup = (ex_ms / ms) if ex_ms else None
    measured: dict[str, Any] = {"candidate": candidate, "recall_at_10": round(rec, 4), "p50_ms": round(ms, 3),
                                "exact_kind": exact, "exact_p50_ms": round(ex_ms, 3) if ex_ms else None,
                                "speedup": round(speedup, 2) if speedup else None, "held_out_queries": nq,
                                "target_recall": cfg.target_recall, "min_speedup": cfg.min_speedup}
    fig = (f"recall@10 {rec:.3f} at {_ms(ms)}" + (f" vs exact {exact} {_ms(ex_ms)} ({speedup:.1f}x)" if ex_ms else "")
           + f" on {nq} held-out queries")
    if exact is None or (rec >= cfg.target_recall and speedup >= cfg.min_speedup):
        vi.params["measured"] = measured
        return _finish(vi, n, d, cfg, f"{candidate}: {fig}", notes)
    log.info("auto index: %s %s; falling back to exact %s", candidate, fig, exact)
    del vi
    gc.collect()
    ex = cls.build_kind(vectors, exact, cfg, progress)
    ex.params.update(measured=measured, fallback=True)
    short = "recall" if rec < cfg.target_recall else "speed-up"
    return _finish(ex, n, d, cfg, f"{exact} (exact scan): {candidate} reached {fig}, short of recall "
                   f"{cfg.target_recall} at >= {cfg.min_speedup}x ({short})", notes)


def _finish(vi, n: int, d: int, cfg: IndexConfig, choice: str, notes: list[str]):
    mem = memory_estimate(vi.kind, n, d, cfg)
    vi.params["memory_bytes"] = mem
    vi.params["choice"] = f"{choice}; index {_mb(mem)}" + (f" ({'; '.join(notes)})" if notes else "")
    if cfg.max_memory:
        vi.params["max_memory"] = int(cfg.max_memory)
    return vi


def record_measurement(vi, vectors: np.ndarray, cfg: IndexConfig) -> None:
    """An explicitly chosen approximate kind: measure it the same way and record the figures."""
    n, d = vectors.shape
    nq = max(20, int(cfg.measure_queries))
    q = held_out_queries(vectors, nq)
    _, truth = _exact_search(vectors, q, 10)
    exact = "flat-fp16"
    ex_ms = exact_latency_ms(type(vi), vectors, exact, cfg, q[:30])
    rec, ms = _measure(vi, q, truth)
    vi.params["measured"] = {"candidate": vi.kind, "recall_at_10": round(rec, 4), "p50_ms": round(ms, 3),
                             "exact_kind": exact, "exact_p50_ms": round(ex_ms, 3), "speedup": round(ex_ms / ms, 2),
                             "held_out_queries": nq}
    _finish(vi, n, d, cfg, f"{vi.kind} (chosen): recall@10 {rec:.3f} at {_ms(ms)} vs exact {_ms(ex_ms)} "
            f"({ex_ms / ms:.1f}x) on {nq} held-out queries", [])


__all__ = ["EXACT_KINDS", "build_auto", "plan_kinds", "record_measurement", "wants_ondisk"]
