"""Every image's SAE codes as a sparse matrix beside the index: ``saefe encode-sae``.

    INDEX/codes/<sae-name>/csc_*.npy, csr_*.npy   the N x d_hidden codes in both layouts as
                                                  plain arrays (see codes_store.py): column j =
                                                  feature j's postings, row i = image i's codes
    INDEX/codes/<sae-name>/codes.json             schema version, the SAE (name, config, sha256
                                                  of its weights), the index manifest, counts;
                                                  written last (commit marker)

Encoding runs in chunks; each chunk is committed as ``chunks/NNNNNN.npz`` (numeric arrays only,
written to a temp name then renamed), so an interrupted run resumes from its committed chunks.
With ``ray`` the chunks are encoded as parallel Ray tasks (one per GPU, or per CPU). The chunks
are then merged out of core into the arrays. ``open_codes`` memory-maps them (feature search
reads only its features' postings); ``load_codes`` returns scipy matrices in RAM. Codes written
by older versions (schema 1: ``codes_csr.npz`` / ``codes_csc.npz``) are still read.
``load_codes`` refuses codes that another SAE made (weights hash).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saefe.errors import CorpusError, IncompatibleError, SaefeError
from saefe.manifest import EncoderInfo, file_sha256, read_json, write_json_atomic
from saefe.sae.codes_store import SCHEMA_VERSION, open_arrays
from saefe.sae.model import CONFIG_NAME, WEIGHTS_NAME, TopKSAE

log = logging.getLogger(__name__)

CODES_DIR = "codes"
CODES_JSON = "codes.json"
CSR_NAME = "codes_csr.npz"  # schema 1 (read only)
CSC_NAME = "codes_csc.npz"
FORMAT = "saefe-sae-codes-2"

_hash_cache: dict[tuple[str, int, int], str] = {}


def weights_hash(sae_dir: str | os.PathLike) -> str:
    """sha256 of the SAE's model.safetensors (memoised per path, size and mtime)."""
    p = Path(sae_dir) / WEIGHTS_NAME
    if not p.exists():
        raise SaefeError(f"no SAE weights at {p}")
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _hash_cache:
        _hash_cache[key] = file_sha256(p)
    return _hash_cache[key]


def sae_name(sae_dir: str | os.PathLike) -> str:
    return Path(sae_dir).resolve().name


def codes_dir(index_dir: str | os.PathLike, name: str) -> Path:
    from saefe.ingest.store import resolve_data_dir

    return resolve_data_dir(index_dir) / CODES_DIR / name


def _is_sae_dir(p: str | os.PathLike) -> bool:
    q = Path(p)
    return q.is_dir() and (q / CONFIG_NAME).exists() and (q / WEIGHTS_NAME).exists()


def _pick_device(device: str) -> torch.device:
    if device in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise SaefeError(f"device {device!r} requested but CUDA is not available on this machine")
    return torch.device(device)


def _save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.stem + ".tmp.npz")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _encode_rows(sae: TopKSAE, vectors: np.ndarray, lo: int, hi: int, batch_size: int, dev, where: str, bar=None):
    """Top-k (values float32, indices int32) of rows [lo, hi) of the fp16 store."""
    k = sae.config.top_k
    vals = np.empty((hi - lo, k), dtype=np.float32)
    idxs = np.empty((hi - lo, k), dtype=np.int32)
    for s in range(lo, hi, batch_size):
        e = min(hi, s + batch_size)
        block = np.asarray(vectors[s:e], dtype=np.float32)
        if not np.isfinite(block).all():
            bad = s + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            raise CorpusError(f"index at {where} has non-finite values (NaN/inf) at row {bad}; rebuild the index")
        v, i = sae.encode(torch.from_numpy(block).to(dev))
        vals[s - lo : e - lo] = v.float().cpu().numpy()
        idxs[s - lo : e - lo] = i.cpu().numpy()
        if bar is not None:
            bar.update(e - s)
    return vals, idxs


_worker_sae: dict[tuple[str, str], TopKSAE] = {}


@torch.no_grad()
def encode_chunk_file(index_dir: str, sae_dir: str, device: str, lo: int, hi: int, batch_size: int, path: str) -> int:
    """One chunk, by file names only, so a Ray task (or any process) can run it; the SAE is
    loaded once per worker process."""
    if os.path.exists(path):
        return 0
    dev = _pick_device(device)
    key = (str(sae_dir), str(dev))
    if key not in _worker_sae:
        _worker_sae[key] = TopKSAE.from_pretrained(sae_dir, device=dev)
    vectors = np.load(Path(index_dir) / "vectors.npy", mmap_mode="r", allow_pickle=False)
    vals, idxs = _encode_rows(_worker_sae[key], vectors, lo, hi, batch_size, dev, str(index_dir))
    _save_npz_atomic(Path(path), values=vals, indices=idxs)
    return hi - lo


def _encode_on_ray(ray_address: str, jobs: list[tuple], bar) -> None:
    """Chunks as Ray tasks: one per GPU when the cluster has GPUs, else one per CPU."""
    from saefe.ingest.distributed.distributor import RayConfig, failure, session

    with session(RayConfig(address=ray_address)) as cluster:
        import ray

        task = ray.remote(encode_chunk_file).options(num_gpus=1 if cluster.gpus else 0, num_cpus=1, max_retries=3)
        pending = {task.remote(*j): j for j in jobs}
        done = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            j = pending.pop(ready[0])
            try:
                ray.get(ready[0])
            except Exception as e:
                inner = e
                while getattr(inner, "cause", None) is not None or inner.__cause__ is not None:
                    inner = getattr(inner, "cause", None) or inner.__cause__
                if isinstance(inner, SaefeError):
                    raise inner from None
                raise failure(e, done, len(jobs), j[3] // max(1, j[4] - j[3])) from None
            done += 1
            bar.update(j[4] - j[3])


@torch.no_grad()
def encode_corpus(
    index_dir: str | os.PathLike,
    sae_dir: str | os.PathLike,
    chunk_size: int = 65536,
    device: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    stop_after_chunks: int | None = None,
    ray: str | None = None,
) -> Path:
    """Encode every vector of the index with the SAE; returns the codes dir.

    ``ray`` (an address: local, auto, ray://...) encodes the missing chunks as parallel Ray tasks.
    ``stop_after_chunks`` (tests, manual interruption) commits that many new chunks and stops
    without merging; a later call resumes."""
    from tqdm.auto import tqdm

    from saefe.ingest.store import EmbeddingStore
    from saefe.sae.codes_store import merge_chunks, remove_arrays

    store = EmbeddingStore.open(index_dir)
    dev = _pick_device(device)
    sae = TopKSAE.from_pretrained(sae_dir, device=dev)
    n, dim = len(store), store.dim
    sae.check_input(store.encoder_info, dim, f"the index at {store.dir}")
    H, k = sae.config.d_hidden, sae.config.top_k
    name = sae_name(sae_dir)
    digest = weights_hash(sae_dir)
    out = codes_dir(index_dir, name)
    index_part = {
        "dir": str(Path(index_dir).resolve()),
        "count": n,
        "dim": dim,
        "encoder": store.encoder_info.to_dict(),
    }
    sae_cfg = read_json(Path(sae_dir) / CONFIG_NAME)
    key = {"format": FORMAT, "weights_sha256": digest, "count": n, "dim": dim, "chunk_size": int(chunk_size), "encoder": index_part["encoder"]}

    if (out / CODES_JSON).exists() and not overwrite:
        done = read_json(out / CODES_JSON)
        if done.get("complete") and done.get("sae", {}).get("weights_sha256") == digest and done.get("index", {}).get("count") == n:
            log.info("codes in %s are up to date", out)
            return out
    chunks = out / "chunks"
    if chunks.exists():
        old = read_json(chunks / "key.json") if (chunks / "key.json").exists() else None
        if old != key or overwrite:
            shutil.rmtree(chunks)
    chunks.mkdir(parents=True, exist_ok=True)
    write_json_atomic(chunks / "key.json", key)
    (out / CODES_JSON).unlink(missing_ok=True)
    for stale in (CSR_NAME, CSC_NAME):
        (out / stale).unlink(missing_ok=True)
    remove_arrays(out)

    n_chunks = (n + chunk_size - 1) // chunk_size
    if batch_size is None:  # cap the dense (batch, d_hidden) pre-activations at ~0.5 GB (CPU) / 2 GB (GPU)
        budget = (2 << 30) if dev.type == "cuda" else (512 << 20)
        batch_size = max(1, min(chunk_size, budget // (4 * H)))
    t0 = time.time()
    bar = tqdm(total=n, disable=not progress, desc=f"encode-sae {name}", unit="img", dynamic_ncols=True)
    spans = [(c, c * chunk_size, min(n, (c + 1) * chunk_size)) for c in range(n_chunks)]
    todo = [(c, lo, hi) for c, lo, hi in spans if not (chunks / f"{c:06d}.npz").exists()]
    bar.update(n - sum(hi - lo for _, lo, hi in todo))
    if stop_after_chunks is not None:
        todo = todo[:stop_after_chunks]
    if ray and todo:
        jobs = [(str(store.data), str(Path(sae_dir).resolve()), device, lo, hi, batch_size, str(chunks / f"{c:06d}.npz"))
                for c, lo, hi in todo]
        _encode_on_ray(ray, jobs, bar)
    else:
        for c, lo, hi in todo:
            vals, idxs = _encode_rows(sae, store.vectors, lo, hi, batch_size, dev, str(store.dir), bar)
            _save_npz_atomic(chunks / f"{c:06d}.npz", values=vals, indices=idxs)
    bar.close()
    if stop_after_chunks is not None and any(not (chunks / f"{c:06d}.npz").exists() for c, _, _ in spans):
        return out

    def loader(c: int, lo: int, hi: int):
        def load():
            with np.load(chunks / f"{c:06d}.npz", allow_pickle=False) as z:
                v, i = z["values"], z["indices"]
            if v.shape != (hi - lo, k) or i.shape != (hi - lo, k):
                raise SaefeError(f"chunk {c} in {chunks} is malformed; delete {chunks} and re-run")
            return v, i
        return load

    nnz = merge_chunks([loader(*sp) for sp in spans], n, H, out)
    meta = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "layout": "npy",
        "complete": True,
        "sae": {
            "name": name,
            "dir": str(Path(sae_dir).resolve()),
            "config": sae_cfg.get("sae"),
            "encoder": sae_cfg.get("encoder"),
            "weights_sha256": digest,
        },
        "index": index_part,
        "shape": [n, H],
        "nnz": int(nnz),
        "mean_l0": float(nnz / max(n, 1)),
        "dtype": "float32",
        "seconds": round(time.time() - t0, 2),
    }
    write_json_atomic(out / CODES_JSON, meta)
    shutil.rmtree(chunks, ignore_errors=True)
    return out


def open_codes(index_dir: str | os.PathLike, sae_name_or_dir: str | os.PathLike) -> tuple[Any, Any]:
    """(csr, csc) codes for an SAE given by dir (hash-checked) or by name, memory-mapped
    (codes_store.SparseArrays): opening costs no RAM; a search reads only what it touches.
    Codes from older versions (schema 1, .npz) are read into RAM as scipy matrices."""
    import scipy.sparse as sp

    if _is_sae_dir(sae_name_or_dir):
        name, digest = sae_name(sae_name_or_dir), weights_hash(sae_name_or_dir)
    else:
        name, digest = Path(str(sae_name_or_dir)).name, None
    out = codes_dir(index_dir, name)
    if not (out / CODES_JSON).exists():
        raise SaefeError(f"no SAE codes for {name!r} in {Path(index_dir)}; run `saefe encode-sae --index {index_dir} --sae weights/{name}`")
    meta = read_json(out / CODES_JSON)
    if not meta.get("complete"):
        raise SaefeError(f"SAE codes in {out} are incomplete; re-run `saefe encode-sae`")
    if int(meta.get("schema_version", 1)) > SCHEMA_VERSION:
        raise SaefeError(f"SAE codes in {out} have schema {meta['schema_version']}, newer than this saefe reads")
    if digest is not None and meta["sae"]["weights_sha256"] != digest:
        raise IncompatibleError(
            f"codes in {out} were made by an SAE with weights sha256 {meta['sae']['weights_sha256'][:12]}… but the SAE "
            f"at {sae_name_or_dir} has {digest[:12]}…; re-run `saefe encode-sae --index {index_dir} --sae {sae_name_or_dir}`"
        )
    mpath = out.parent.parent / "manifest.json"  # the manifest of the generation the codes belong to
    if mpath.exists():
        man = read_json(mpath)
        if int(man.get("count", -1)) != int(meta["index"]["count"]):
            raise IncompatibleError(
                f"codes in {out} cover {meta['index']['count']} images but the index has {man.get('count')}; re-run `saefe encode-sae`"
            )
        EncoderInfo.from_dict(man["encoder"]).check_compatible(EncoderInfo.from_dict(meta["index"]["encoder"]), "the index", f"the codes in {out}")
    shape = tuple(int(x) for x in meta["shape"])
    if int(meta.get("schema_version", 1)) >= 2:
        return open_arrays(out, shape)  # type: ignore[arg-type]
    if not (out / CSR_NAME).exists() or not (out / CSC_NAME).exists():
        raise SaefeError(f"SAE codes in {out} are from an older saefe and incomplete; re-run `saefe encode-sae --overwrite`")
    csr = sp.load_npz(out / CSR_NAME).tocsr()
    csc = sp.load_npz(out / CSC_NAME).tocsc()
    if csr.shape != shape or csc.shape != shape:
        raise SaefeError(f"codes in {out} have shape {csr.shape}/{csc.shape}, codes.json says {meta['shape']}; re-run encode-sae")
    return csr, csc


def load_codes(index_dir: str | os.PathLike, sae_name_or_dir: str | os.PathLike) -> tuple[Any, Any]:
    """(csr, csc) as scipy matrices in RAM (for label profiles and analyses that compute on
    the whole matrix); see ``open_codes`` for the memory-mapped arrays searches use."""
    csr, csc = open_codes(index_dir, sae_name_or_dir)
    csr = csr.to_scipy() if hasattr(csr, "to_scipy") else csr
    csc = csc.to_scipy() if hasattr(csc, "to_scipy") else csc
    return csr.tocsr(), csc.tocsc()
