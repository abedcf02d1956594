"""FAISS inner-product index over the store (vectors are L2-normalised, so IP = cosine).

``auto`` picks exact search for small corpora. Above ``flat_max`` it tries an approximate index
(HNSW on the CPU, the only type that met p50 < 10 ms at recall@10 >= 0.95 on 1M x 1152-d
clustered vectors with 2 cores in benchmarks/bench_index.py; IVF when faiss has GPUs), tunes it,
measures it against exact search on held-out queries and falls back to an exact scan when it is
not both accurate and clearly faster (saefe.ingest.autoindex). Kinds and quantisation also follow
a memory budget (``max_memory``). The IVF probe count / HNSW efSearch is tuned at build time to
reach a recall target, then saved with the index together with the measurements.

Exact kinds: ``flat`` (fp32, BLAS for batches), ``flat-fp16`` (the stored fp16 vectors as they
are: still exact for this store, half the memory, faster single queries), ``flat-sq8`` (8-bit
scan: a quarter of the memory, near-exact).
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from saefe.errors import IncompatibleError, SaefeError
from saefe.manifest import read_json, write_json_atomic

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
PARAMS_FILE = "index.json"
KINDS = ("auto", "flat", "flat-fp16", "flat-sq8", "ivf", "ivf-sq8", "hnsw", "ivfpq-ondisk")
EXACT_KINDS = ("flat", "flat-fp16", "flat-sq8")
ONDISK_KINDS = ("ivfpq-ondisk",)  # built into, and searched from, files in the index dir


@dataclass
class IndexConfig:
    kind: str = "auto"
    flat_max: int = 50_000  # exact search below this many vectors
    nlist: int = 0  # IVF lists; 0 = about sqrt(N) (cheap k-means on a 2-core machine)
    nprobe: int = 0  # 0 = tuned at build time to reach target_recall
    target_recall: float = 0.95
    hnsw_m: int = 32
    ef_construction: int = 40
    ef_search: int = 0  # 0 = tuned at build time to reach target_recall
    use_gpu: bool = True
    max_memory: int = 0  # bytes the index may take in RAM (0: no budget); picks kind and quantisation
    min_speedup: float = 1.5  # auto keeps an approximate index only if this much faster than exact
    measure_queries: int = 200  # held-out queries for the build-time recall/latency measurement
    ondisk: dict[str, Any] = field(default_factory=dict)  # ivfpq-ondisk: OnDiskParams fields


def _faiss():
    import faiss

    return faiss


def resolve_kind(cfg: IndexConfig, n: int) -> str:
    if cfg.kind not in KINDS:
        raise SaefeError(f"unknown index type {cfg.kind!r}; choose one of {', '.join(KINDS)}")
    if cfg.kind != "auto":
        return cfg.kind
    if n <= cfg.flat_max:
        return "flat"
    faiss = _faiss()
    has_gpu = cfg.use_gpu and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    return "ivf" if has_gpu else "hnsw"


def _batches(vectors: np.ndarray, size: int = 65536):
    for i in range(0, len(vectors), size):
        yield i, np.ascontiguousarray(vectors[i : i + size], dtype=np.float32)


def check_queries(queries: np.ndarray, k: int, dim: int, ntotal: int) -> tuple[np.ndarray, int]:
    """(n, dim) float32 queries and k clipped to the index size; a wrong dimension or a
    non-finite value is a one-line error (shared by every index kind)."""
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != dim:
        raise IncompatibleError(f"query has dimension {q.shape[-1]}, the index has {dim}")
    if not np.isfinite(q).all():
        raise SaefeError("query vector contains NaN or infinity")
    return q, max(1, min(int(k), ntotal))


class VectorIndex:
    def __init__(self, index: Any, kind: str, dim: int, params: dict[str, Any]):
        self.index = index
        self.kind = kind
        self.dim = dim
        self.params = params

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def build(cls, vectors: np.ndarray, cfg: IndexConfig | None = None, progress: bool = False) -> "VectorIndex":
        cfg = cfg or IndexConfig()
        n, _ = vectors.shape
        if cfg.kind == "auto" and (n > cfg.flat_max or cfg.max_memory):
            from saefe.ingest.autoindex import build_auto

            return build_auto(cls, vectors, cfg, progress)
        vi = cls.build_kind(vectors, resolve_kind(cfg, n), cfg, progress)
        if vi.kind not in EXACT_KINDS:
            from saefe.ingest.autoindex import record_measurement

            record_measurement(vi, vectors, cfg)
        elif cfg.kind == "auto":
            vi.params["choice"] = f"{vi.kind}: exact search ({n} vectors <= flat_max {cfg.flat_max})"
        return vi

    @classmethod
    def build_kind(cls, vectors: np.ndarray, kind: str, cfg: IndexConfig, progress: bool = False,
                   tune_limit_ms: float | None = None) -> "VectorIndex":
        """Build and (approximate kinds) tune one kind of index over ``vectors``."""
        faiss = _faiss()
        n, d = vectors.shape
        if kind in ONDISK_KINDS:
            raise SaefeError(f"index type {kind} is built into an index dir: use build_saved_index")
        metric = faiss.METRIC_INNER_PRODUCT
        params: dict[str, Any] = {"kind": kind}
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind in ("flat-fp16", "flat-sq8"):
            qt = faiss.ScalarQuantizer.QT_fp16 if kind == "flat-fp16" else faiss.ScalarQuantizer.QT_8bit
            index = faiss.IndexScalarQuantizer(d, qt, metric)
            if kind == "flat-sq8":
                rng = np.random.default_rng(0)
                sample = np.sort(rng.choice(n, min(n, 65536), replace=False))
                index.train(np.ascontiguousarray(vectors[sample], dtype=np.float32))
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, metric)
            index.hnsw.efConstruction = cfg.ef_construction
            params.update(m=cfg.hnsw_m, ef_construction=cfg.ef_construction)
        else:
            nlist = cfg.nlist or max(1, min(int(math.sqrt(n)), n // 39 or 1))
            codec = "SQ8" if kind == "ivf-sq8" else "Flat"
            index = faiss.index_factory(d, f"IVF{nlist},{codec}", metric)
            index.cp.niter = 10  # k-means converges enough for search; 25 (faiss default) costs 2.5x
            rng = np.random.default_rng(0)
            ntrain = min(n, 64 * nlist)
            sample = np.sort(rng.choice(n, ntrain, replace=False))
            index.train(np.ascontiguousarray(vectors[sample], dtype=np.float32))
            params.update(nlist=nlist)
        it = _batches(vectors)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=math.ceil(n / 65536), desc=f"index ({kind})", unit="batch")
        for _, b in it:
            index.add(b)
        vi = cls(index, kind, d, params)
        if kind in ("ivf", "ivf-sq8"):
            vi.set_nprobe(cfg.nprobe or vi.tune(vectors, cfg.target_recall, limit_ms=tune_limit_ms))
        elif kind == "hnsw":
            vi.set_ef_search(cfg.ef_search or vi.tune(vectors, cfg.target_recall, limit_ms=tune_limit_ms))
        return vi

    def set_ef_search(self, ef: int) -> None:
        self.index.hnsw.efSearch = int(ef)
        self.params["ef_search"] = int(ef)

    def set_nprobe(self, nprobe: int) -> None:
        _faiss().extract_index_ivf(self.index).nprobe = int(nprobe)
        self.params["nprobe"] = int(nprobe)

    def tune(self, vectors: np.ndarray, target: float, nq: int = 200, k: int = 10, limit_ms: float | None = None) -> int:
        """Smallest power of two (IVF nprobe, or HNSW efSearch from 16) whose recall@k against
        exact search reaches ``target``. Queries come from the base (``sample_queries``): no
        held-out data needed. ``limit_ms``: stop early once a single query takes longer (the index
        cannot win from there)."""
        q = sample_queries(vectors, nq, seed=1)
        _, truth = _exact_search(vectors, q, k)
        if self.kind == "hnsw":
            value, limit, apply = 16, 4096, self.set_ef_search
        else:
            ivf = _faiss().extract_index_ivf(self.index)
            value, limit, apply = 1, ivf.nlist, self.set_nprobe
        while value < limit:
            apply(value)
            _, got = self.index.search(q, k)
            if recall_at_k(got, truth) >= target:
                break
            if limit_ms is not None and single_query_ms(self, q[:20]) > limit_ms:
                self.params["tuning_stopped"] = f"{value}: slower than {limit_ms:.1f} ms before reaching recall {target}"
                break
            value *= 2
        return min(value, limit)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q, k = check_queries(queries, k, self.dim, self.ntotal)
        scores, ids = self.index.search(np.ascontiguousarray(q), k)
        return scores, ids

    # -- persistence -----------------------------------------------------------------------
    def save(self, dir: str | os.PathLike) -> None:
        faiss = _faiss()
        d = Path(dir)
        idx = self.index
        if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(idx).__name__:
            idx = faiss.index_gpu_to_cpu(idx)
        tmp = d / (INDEX_FILE + ".tmp")
        faiss.write_index(idx, str(tmp))
        os.replace(tmp, d / INDEX_FILE)
        write_json_atomic(d / PARAMS_FILE, {"dim": self.dim, **self.params})

    @classmethod
    def load(cls, dir: str | os.PathLike, use_gpu: bool = True) -> "VectorIndex":
        from saefe.ingest.store import resolve_data_dir

        faiss = _faiss()
        d = resolve_data_dir(dir)  # an index dir (its current generation) or a generation dir
        if not (d / INDEX_FILE).exists():
            raise SaefeError(f"no FAISS index at {d}; build it with `saefe build` (or python scripts/build_index.py)")
        params = read_json(d / PARAMS_FILE) if (d / PARAMS_FILE).exists() else {"kind": "flat"}
        if params.get("kind") in ONDISK_KINDS:
            from saefe.ingest.index_ondisk import OnDiskIndex

            return OnDiskIndex.load(d)
        index = faiss.read_index(str(d / INDEX_FILE))
        vi = cls(index, params.get("kind", "flat"), int(index.d), params)
        if "nprobe" in params:
            vi.set_nprobe(params["nprobe"])
        if "ef_search" in params and hasattr(index, "hnsw"):
            index.hnsw.efSearch = int(params["ef_search"])
        if use_gpu:
            vi.to_gpu()
        return vi

    def to_gpu(self) -> None:
        faiss = _faiss()
        # HNSW and flat scalar-quantiser scans have no GPU version: they stay on the CPU
        if self.kind not in ("flat", "ivf", "ivf-sq8") or not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
            return
        res = faiss.StandardGpuResources()
        self.index = faiss.index_cpu_to_gpu(res, 0, self.index)
        self._gpu_res = res  # keep alive
        log.info("FAISS index moved to GPU")


def build_saved_index(dir: str | os.PathLike, cfg: IndexConfig, progress: bool = False,
                      vectors_file: str = "vectors.npy", map_shards=None) -> VectorIndex:
    """Build the index over the store's ``vectors.npy`` and save it beside it: in RAM then saved
    for the in-memory kinds, shard by shard into the dir for the on-disk ones (``map_shards``:
    who fills the shards, e.g. Ray tasks; default this process)."""
    d = Path(dir)
    vectors = np.load(d / vectors_file, mmap_mode="r", allow_pickle=False)
    from saefe.ingest.autoindex import wants_ondisk

    past_ram = wants_ondisk(cfg, *vectors.shape)
    kind = "ivfpq-ondisk" if past_ram else resolve_kind(cfg, len(vectors))
    if kind in ONDISK_KINDS:
        from saefe.ingest.index_ondisk import OnDiskParams, build_ondisk

        vi = build_ondisk(d, cfg, OnDiskParams(**cfg.ondisk), vectors_file, progress=progress, map_shards=map_shards)
        if past_ram:
            vi.params["choice"] = (f"{kind}: no in-RAM index over {len(vectors)} vectors fits --max-index-memory "
                                   f"{cfg.max_memory / 2**20:,.0f} MB; its lists stay on disk")
        return vi
    vi = VectorIndex.build(vectors, cfg, progress=progress)
    vi.save(d)
    for stale in d.glob("index-*.ivfdata"):  # a previous on-disk index's lists
        stale.unlink(missing_ok=True)
    return vi


def _exact_search(vectors: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k streamed over the (possibly memory-mapped fp16) base, in 64k-row blocks."""
    faiss = _faiss()
    heap = faiss.ResultHeap(len(q), k, keep_max=True)  # faiss merges the blocks' top-k
    for off, b in _batches(vectors):
        s = q @ b.T
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]  # each block's candidates only
        heap.add_result(D=np.ascontiguousarray(np.take_along_axis(s, part, 1), dtype=np.float32),
                        I=np.ascontiguousarray(part + off, dtype=np.int64))
    heap.finalize()
    d, i = heap.D, heap.I
    d[i < 0] = -np.inf  # fewer than k rows: padding as before
    return d, i


def sample_queries(vectors: np.ndarray, nq: int, seed: int) -> np.ndarray:
    """Unit queries drawn from the base: half perturbed base vectors, half blends of two base
    vectors (a steered or text query lies between images more than on one)."""
    rng = np.random.default_rng(seed)
    n, d = vectors.shape
    a = np.asarray(vectors[np.sort(rng.choice(n, nq, replace=nq > n))], dtype=np.float32)
    b = np.asarray(vectors[np.sort(rng.choice(n, nq, replace=nq > n))], dtype=np.float32)
    half = nq // 2
    q = np.empty((nq, d), np.float32)
    q[:half] = a[:half] + rng.normal(0, 0.5 / math.sqrt(d), (half, d)).astype(np.float32)
    q[half:] = a[half:] + b[half:][rng.permutation(nq - half)]
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    return q


def single_query_ms(vi: "VectorIndex", q: np.ndarray, k: int = 10) -> float:
    """Median wall time of one-query searches (the app's and the servers' pattern)."""
    import time

    q = np.asarray(q, dtype=np.float32)
    for row in q[:2]:  # warm-up: thread pool start, first page faults
        vi.index.search(row[None, :], k)
    ts = []
    for row in q:
        t = time.perf_counter()
        vi.index.search(row[None, :], k)
        ts.append((time.perf_counter() - t) * 1000)
    return float(np.median(ts))


def memory_estimate(kind: str, n: int, d: int, cfg: IndexConfig | None = None) -> int:
    """Bytes an index of ``kind`` over n x d vectors takes in RAM (autofaiss-style estimate).
    An on-disk kind (issue 14) reports only its resident part here."""
    cfg = cfg or IndexConfig()
    nlist = cfg.nlist or max(1, int(math.sqrt(max(n, 1))))
    per = {"flat": 4 * d, "flat-fp16": 2 * d, "flat-sq8": d, "hnsw": 4 * d + 8 * cfg.hnsw_m + 8,
           "ivf": 4 * d + 8, "ivf-sq8": d + 8}
    if kind not in per:
        raise SaefeError(f"no memory estimate for index type {kind!r}")
    extra = nlist * d * 4 if kind.startswith("ivf") else 0
    return int(n * per[kind] * (1.05 if kind == "hnsw" else 1.0) + extra)


def parse_bytes(text: str | int | None) -> int:
    """``4G``, ``512M``, ``1.5GB``, ``2GiB`` or a plain number of bytes; None / '' / 0 = no budget."""
    if text in (None, "", 0, "0"):
        return 0
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*", str(text).lower())
    if not m:
        raise SaefeError(f"cannot read memory size {text!r}; use e.g. 4G, 512M or a number of bytes")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def recall_at_k(got: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    hits = sum(len(set(g[:k]) & set(t)) for g, t in zip(got, truth))
    return hits / truth.size
