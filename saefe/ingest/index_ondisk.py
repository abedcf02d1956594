"""IVF-PQ (with OPQ) index whose inverted lists live on disk, for corpora past RAM.

The clip-retrieval / autofaiss recipe: train the coarse quantizer, OPQ rotation and PQ codebooks
on a sample; fill copies of the empty trained index shard by shard (each shard a file, so the
fill resumes and can run on many workers); merge the shards' inverted lists into one
``.ivfdata`` file with faiss' ``merge_ondisk``; search it memory-mapped. PQ distances only
choose candidates: the top ``rerank`` candidates are re-scored exactly from the store's fp16
``vectors.npy`` (also memory-mapped), so the returned scores are true cosines.

Files in the index dir: ``index.faiss`` (quantizer, OPQ, PQ, list offsets: a few MB),
``index-<nonce>.ivfdata`` (codes + ids: ~(pq_m + 8) bytes per vector), ``index.json`` (kind,
params). A new ivfdata name per build makes the switch to a rebuilt index atomic (the small
``index.faiss`` is renamed into place last).
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from saefe.errors import IncompatibleError, SaefeError
from saefe.ingest.index import (INDEX_FILE, PARAMS_FILE, IndexConfig, VectorIndex, _exact_search, check_queries,
                                recall_at_k)
from saefe.manifest import read_json, write_json_atomic

log = logging.getLogger(__name__)

KIND = "ivfpq-ondisk"
SHARDS_DIR = "index_shards"
OPQ_MIN_TRAIN = 8192


@dataclass
class OnDiskParams:
    """Shape of the index; every 0 means "derived from N" (see ``resolve``)."""

    nlist: int = 0  # coarse lists; 0 = power of two near 4*sqrt(N)
    pq_m: int = 64  # bytes per vector in the lists (PQ sub-quantizers of 8 bits)
    opq_dim: int = 256  # OPQ output dimension (rotation + reduction); 0 = no reduction
    train_size: int = 0  # sample for training; 0 = 32 * nlist, between 50k and 300k
    shard_size: int = 1_000_000  # vectors per fill shard (resume / parallel unit)
    nprobe: int = 0  # 0 = tuned at build time to reach the target recall
    rerank: int = 0  # candidates re-scored exactly; 0 = tuned with nprobe (from 4*k)

    nbits: int = 8  # bits per PQ code (fewer only for tiny corpora: PQ needs 2^nbits points)

    def resolve(self, n: int, d: int) -> "OnDiskParams":
        nlist = self.nlist or int(2 ** round(math.log2(max(1.0, 4 * math.sqrt(n)))))
        nlist = max(1, min(nlist, n // 39 or 1, 1 << 18))
        train = min(self.train_size or min(max(32 * nlist, 50_000), 300_000), n)
        # OPQ trains a PQ of 256 centroids per sub-space: below a few thousand vectors it cannot
        opq = (self.opq_dim if 0 < self.opq_dim < d else d) if train >= OPQ_MIN_TRAIN else 0
        m = self.pq_m
        while (opq or d) % m:  # PQ needs m | dim
            m -= 1
        nbits = max(1, min(self.nbits, int(math.log2(max(2, train))) - 1))
        return OnDiskParams(nlist, m, opq, train, self.shard_size, self.nprobe, self.rerank, nbits)

    def factory(self, d: int) -> str:
        pre = "" if not self.opq_dim else (f"OPQ{self.pq_m}_{self.opq_dim}," if self.opq_dim < d else f"OPQ{self.pq_m},")
        # past a few thousand lists, assigning N vectors to flat centroids dominates the fill:
        # an HNSW over the centroids (as autofaiss does) makes it ~20x cheaper
        quantizer = "_HNSW32" if self.nlist >= 4096 else ""
        pq = f"PQ{self.pq_m}" + (f"x{self.nbits}" if self.nbits != 8 else "")
        return f"{pre}IVF{self.nlist}{quantizer},{pq}"


def estimate_memory(n: int, d: int, params: dict[str, Any] | None = None) -> int:
    """Resident bytes of a loaded index (the lists stay on disk, paged in by the OS on demand):
    coarse centroids, OPQ matrix, PQ codebooks, per-list offsets, plus the search buffers."""
    p = OnDiskParams(**{k: v for k, v in (params or {}).items() if k in OnDiskParams.__dataclass_fields__}).resolve(max(n, 1), d)
    dim = p.opq_dim or d
    centroids = p.nlist * dim * 4 + (p.nlist * 32 * 8 if p.nlist >= 4096 else 0)  # + HNSW links
    opq = d * p.opq_dim * 4
    codebooks = p.pq_m * (1 << p.nbits) * (dim // p.pq_m) * 4
    lists = p.nlist * 32  # OnDiskInvertedLists' per-list (offset, size, capacity) + vector headers
    return int(centroids + opq + codebooks + lists + (32 << 20))


def estimate_disk(n: int, d: int, params: dict[str, Any] | None = None) -> int:
    """Bytes of the ``.ivfdata`` file (PQ codes + int64 ids), beside the store's fp16 vectors."""
    p = OnDiskParams(**{k: v for k, v in (params or {}).items() if k in OnDiskParams.__dataclass_fields__}).resolve(max(n, 1), d)
    return int(n * (math.ceil(p.pq_m * p.nbits / 8) + 8))


def _faiss():
    import faiss

    return faiss


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def train_empty(vectors: np.ndarray, p: OnDiskParams, seed: int = 0):
    """The trained, empty index (OPQ + coarse quantizer + PQ) from a uniform sample."""
    faiss = _faiss()
    n, d = vectors.shape
    index = faiss.index_factory(d, p.factory(d), faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter = 10  # as in index.py: enough for search, 2.5x cheaper than faiss' 25
    if p.opq_dim:
        opq = faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0))
        # faiss' OPQ defaults (50 rounds, 40 PQ iterations first, 65k points) take ~10 min on 2
        # cores; candidates are re-ranked exactly, so a lighter rotation is enough
        opq.niter, opq.niter_pq_0, opq.max_train_points = 10, 10, min(16384, p.train_size)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, p.train_size, replace=False))
    x = np.empty((len(sample), d), np.float32)
    for lo in range(0, len(sample), 65536):  # sorted gather from the memmap, in blocks
        x[lo : lo + 65536] = vectors[sample[lo : lo + 65536]]
    index.train(x)
    return index


def fill_shard(trained_file: str, vectors_file: str, lo: int, hi: int, out_file: str) -> int:
    """Add rows [lo, hi) of the fp16 store to a copy of the trained index; write it atomically.

    A plain function of file names so a Ray task (or any process) can run it."""
    faiss = _faiss()
    if os.path.exists(out_file):
        return 0
    index = faiss.read_index(trained_file)
    vectors = np.load(vectors_file, mmap_mode="r", allow_pickle=False)
    for s in range(lo, hi, 65536):
        e = min(hi, s + 65536)
        index.add_with_ids(_f32(vectors[s:e]), np.arange(s, e, dtype=np.int64))
    tmp = out_file + ".tmp"
    faiss.write_index(index, tmp)
    os.replace(tmp, out_file)
    return hi - lo


def build_ondisk(
    out: str | os.PathLike,
    cfg: IndexConfig,
    params: OnDiskParams | None = None,
    vectors_file: str = "vectors.npy",
    progress: bool = False,
    map_shards: Callable[[Callable, list[tuple]], list] | None = None,
) -> "OnDiskIndex":
    """Train, fill (resumably, in shards), merge on disk, tune; returns the loaded index.

    ``map_shards(fn, arg_tuples)`` runs the fills (default: in this process, one after another;
    faiss already uses every core for each). Shards done by an interrupted build are kept."""
    faiss = _faiss()
    from faiss.contrib.ondisk import merge_ondisk

    d_out = Path(out)
    vpath = d_out / vectors_file
    vectors = np.load(vpath, mmap_mode="r", allow_pickle=False)
    n, d = vectors.shape
    p = (params or OnDiskParams()).resolve(n, d)
    work = d_out / SHARDS_DIR
    work.mkdir(parents=True, exist_ok=True)
    key = {"n": n, "d": d, "factory": p.factory(d), "train_size": p.train_size, "shard_size": p.shard_size}
    kfile = work / "key.json"
    if kfile.exists() and read_json(kfile) != key:
        shutil.rmtree(work)
        work.mkdir(parents=True)
    write_json_atomic(kfile, key)
    t0 = time.time()
    trained = work / "trained.faiss"
    if not trained.exists():
        log.info("training %s on %d vectors", p.factory(d), p.train_size)
        index = train_empty(vectors, p)
        faiss.write_index(index, str(trained) + ".tmp")
        os.replace(str(trained) + ".tmp", trained)
    t_train = time.time() - t0
    jobs = [
        (str(trained), str(vpath), lo, min(n, lo + p.shard_size), str(work / f"shard_{i:05d}.faiss"))
        for i, lo in enumerate(range(0, n, p.shard_size))
    ]
    todo = [j for j in jobs if not os.path.exists(j[-1])]
    if map_shards is not None and len(todo) > 1:
        map_shards(fill_shard, todo)
    else:
        it = todo
        if progress:
            from tqdm import tqdm

            it = tqdm(todo, desc=f"index ({KIND}) shards", unit="shard")
        for j in it:
            fill_shard(*j)
    missing = [j[-1] for j in jobs if not os.path.exists(j[-1])]
    if missing:
        raise SaefeError(f"{len(missing)} index shards were not written (first: {missing[0]}); run the build again to resume")
    t_fill = time.time() - t0 - t_train
    index = faiss.read_index(str(trained))
    ivfdata = f"index-{secrets.token_hex(4)}.ivfdata"
    merge_ondisk(index, [j[-1] for j in jobs], str(d_out / ivfdata))
    tmp = d_out / (INDEX_FILE + ".tmp")
    faiss.write_index(index, str(tmp))
    del index
    old = read_json(d_out / PARAMS_FILE) if (d_out / PARAMS_FILE).exists() else {}
    os.replace(tmp, d_out / INDEX_FILE)
    if old.get("ivfdata") and old["ivfdata"] != ivfdata:
        (d_out / old["ivfdata"]).unlink(missing_ok=True)
    info = {
        "kind": KIND, "dim": d, "factory": p.factory(d), "nlist": p.nlist, "pq_m": p.pq_m, "opq_dim": p.opq_dim, "nbits": p.nbits,
        "ivfdata": ivfdata, "vectors": vectors_file, "train_size": p.train_size,
        "build_seconds": {"train": round(t_train, 1), "fill": round(t_fill, 1), "merge": round(time.time() - t0 - t_train - t_fill, 1)},
    }
    write_json_atomic(d_out / PARAMS_FILE, info)
    vi = OnDiskIndex.load(d_out)
    if p.nprobe and p.rerank:
        vi.set_search(p.nprobe, p.rerank)
    else:
        vi.set_search(*vi.tune(cfg.target_recall, nprobe=p.nprobe, rerank=p.rerank))
    write_json_atomic(d_out / PARAMS_FILE, {**info, "nprobe": vi.params["nprobe"], "rerank": vi.params["rerank"]})
    shutil.rmtree(work, ignore_errors=True)
    return vi


class OnDiskIndex(VectorIndex):
    """A VectorIndex whose ``search`` is PQ candidates + exact fp16 re-ranking."""

    def __init__(self, index: Any, dim: int, params: dict[str, Any], vectors: np.ndarray, dir: Path):
        super().__init__(index, KIND, dim, params)
        self.vectors = vectors
        self.dir = dir

    @classmethod
    def load(cls, dir: str | os.PathLike, use_gpu: bool = False) -> "OnDiskIndex":
        faiss = _faiss()
        d = Path(dir)
        params = read_json(d / PARAMS_FILE)
        if not (d / params.get("ivfdata", "")).is_file():
            raise SaefeError(f"the on-disk index in {d} misses its lists file {params.get('ivfdata')}; rebuild it")
        # OnDiskInvertedLists memory-map the .ivfdata themselves (read-only here); the small
        # index.faiss is read normally: IO_FLAG_MMAP on top of on-disk lists crashes faiss 1.15
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
        index = faiss.read_index(str(d / INDEX_FILE), flags)
        vectors = np.load(d / params.get("vectors", "vectors.npy"), mmap_mode="r", allow_pickle=False)
        if vectors.shape[0] != index.ntotal:
            raise IncompatibleError(f"the on-disk index in {d} holds {index.ntotal} vectors but the store {vectors.shape[0]}; rebuild it")
        vi = cls(index, int(index.d), params, vectors, d)
        ivf = faiss.extract_index_ivf(index)
        ivf.parallel_mode = 1  # one query at a time: spread its probed lists over the threads
        if "nprobe" in params:
            vi.set_search(int(params["nprobe"]), int(params["rerank"]))
        return vi

    def set_search(self, nprobe: int, rerank: int) -> None:
        faiss = _faiss()
        ivf = faiss.extract_index_ivf(self.index)
        ivf.nprobe = int(min(nprobe, ivf.nlist))
        quantizer = faiss.downcast_index(ivf.quantizer)
        if hasattr(quantizer, "hnsw"):  # an HNSW quantizer finds only ~efSearch good lists
            quantizer.hnsw.efSearch = max(64, 2 * ivf.nprobe)
        self.params["nprobe"] = int(ivf.nprobe)
        self.params["rerank"] = int(rerank)

    def set_nprobe(self, nprobe: int) -> None:
        self.set_search(nprobe, int(self.params.get("rerank", 100)))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q, k = check_queries(queries, k, self.dim, self.ntotal)
        r = max(k, int(self.params.get("rerank", 100)))
        _, cand = self.index.search(np.ascontiguousarray(q), r)
        scores = np.full((len(q), k), -np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        for j in range(len(q)):
            c = np.unique(cand[j][cand[j] >= 0])  # sorted: the memmap reads go forward
            if not len(c):
                continue
            s = np.asarray(self.vectors[c], dtype=np.float32) @ q[j]
            top = np.lexsort((c, -s))[:k]
            scores[j, : len(top)], ids[j, : len(top)] = s[top], c[top]
        return scores, ids

    def tune(self, target: float, nq: int = 200, k: int = 10, nprobe: int = 0, rerank: int = 0) -> tuple[int, int]:
        """Smallest (nprobe, rerank) on a doubling ladder whose recall@k after re-ranking reaches
        ``target`` against exact search (queries: perturbed stored vectors, as index.py tunes).
        Exact search streams the whole store once."""
        rng = np.random.default_rng(1)
        n = self.ntotal
        q = np.asarray(self.vectors[np.sort(rng.choice(n, min(nq, n), replace=False))], dtype=np.float32)
        q = q + rng.normal(0, 0.5 / math.sqrt(self.dim), q.shape).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        _, truth = _exact_search(self.vectors, q, k)
        nlist = _faiss().extract_index_ivf(self.index).nlist
        probes = [nprobe] if nprobe else [2**i for i in range(2, 20) if 2**i < nlist] + [nlist]
        reranks = [rerank] if rerank else [4 * k, 10 * k, 25 * k]
        best = (probes[-1], reranks[-1])
        for pr in probes:
            for rr in reranks:
                self.set_search(pr, rr)
                if recall_at_k(self.search(q, k)[1], truth) >= target:
                    return pr, rr
        return best

    def save(self, dir: str | os.PathLike) -> None:
        """Written by ``build_ondisk`` into its own dir; saving elsewhere would split the files."""
        if Path(dir).resolve() != self.dir.resolve():
            raise SaefeError("an on-disk index lives in the dir it was built in; rebuild it there")

    def to_gpu(self) -> None:  # the lists are on disk; a GPU copy would need them in GPU memory
        return None
