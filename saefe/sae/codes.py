"""Every image's SAE codes as a sparse matrix beside the index: ``saefe encode-sae``.

    INDEX/codes/<sae-name>/codes_csr.npz   N x d_hidden, row i = image i's top-k codes
    INDEX/codes/<sae-name>/codes_csc.npz   the same matrix in CSC: column j = feature j's postings
    INDEX/codes/<sae-name>/codes.json      the SAE (name, config, sha256 of its weights), the
                                           index manifest, counts; written last (commit marker)

Encoding runs in chunks; each chunk is committed as ``chunks/NNNNNN.npz`` (numeric arrays only,
written to a temp name then renamed), so an interrupted run resumes from its committed chunks.
The matrices are written with ``scipy.sparse.save_npz`` and read with ``load_npz`` (which
refuses pickled objects). ``load_codes`` refuses codes that another SAE made (weights hash).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saefe.errors import CorpusError, IncompatibleError, SaefeError
from saefe.manifest import EncoderInfo, read_json, write_json_atomic
from saefe.sae.model import CONFIG_NAME, WEIGHTS_NAME, TopKSAE

log = logging.getLogger(__name__)

CODES_DIR = "codes"
CODES_JSON = "codes.json"
CSR_NAME = "codes_csr.npz"
CSC_NAME = "codes_csc.npz"
FORMAT = "saefe-sae-codes-1"

_hash_cache: dict[tuple[str, int, int], str] = {}


def weights_hash(sae_dir: str | os.PathLike) -> str:
    """sha256 of the SAE's model.safetensors (memoised per path, size and mtime)."""
    p = Path(sae_dir) / WEIGHTS_NAME
    if not p.exists():
        raise SaefeError(f"no SAE weights at {p}")
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _hash_cache:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while b := f.read(1 << 22):
                h.update(b)
        _hash_cache[key] = h.hexdigest()
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


def _save_sparse_atomic(path: Path, m) -> None:
    import scipy.sparse as sp

    tmp = path.with_name(path.stem + ".tmp.npz")
    sp.save_npz(tmp, m, compressed=False)
    os.replace(tmp, path)


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
) -> Path:
    """Encode every vector of the index with the SAE; returns the codes dir.

    ``stop_after_chunks`` (tests, manual interruption) commits that many new chunks and stops
    without merging; a later call resumes."""
    import scipy.sparse as sp
    from tqdm.auto import tqdm

    from saefe.ingest.store import EmbeddingStore

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
    for stale in (CODES_JSON, CSR_NAME, CSC_NAME):
        (out / stale).unlink(missing_ok=True)

    n_chunks = (n + chunk_size - 1) // chunk_size
    if batch_size is None:  # cap the dense (batch, d_hidden) pre-activations at ~0.5 GB (CPU) / 2 GB (GPU)
        budget = (2 << 30) if dev.type == "cuda" else (512 << 20)
        batch_size = max(1, min(chunk_size, budget // (4 * H)))
    t0 = time.time()
    new = 0
    bar = tqdm(total=n, disable=not progress, desc=f"encode-sae {name}", unit="img", dynamic_ncols=True)
    for c in range(n_chunks):
        lo, hi = c * chunk_size, min(n, (c + 1) * chunk_size)
        path = chunks / f"{c:06d}.npz"
        if path.exists():
            bar.update(hi - lo)
            continue
        if stop_after_chunks is not None and new >= stop_after_chunks:
            bar.close()
            return out
        vals = np.empty((hi - lo, k), dtype=np.float32)
        idxs = np.empty((hi - lo, k), dtype=np.int32)
        for s in range(lo, hi, batch_size):
            e = min(hi, s + batch_size)
            block = np.asarray(store.vectors[s:e], dtype=np.float32)
            if not np.isfinite(block).all():
                bad = s + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
                raise CorpusError(f"index at {store.dir} has non-finite values (NaN/inf) at row {bad}; rebuild the index")
            v, i = sae.encode(torch.from_numpy(block).to(dev))
            vals[s - lo : e - lo] = v.float().cpu().numpy()
            idxs[s - lo : e - lo] = i.cpu().numpy()
            bar.update(e - s)
        _save_npz_atomic(path, values=vals, indices=idxs)
        new += 1
    bar.close()

    # merge the committed chunks into one CSR matrix, then its CSC transpose
    data = np.empty(n * k, dtype=np.float32)
    cols = np.empty(n * k, dtype=np.int32)
    for c in range(n_chunks):
        lo, hi = c * chunk_size, min(n, (c + 1) * chunk_size)
        with np.load(chunks / f"{c:06d}.npz", allow_pickle=False) as z:
            v, i = z["values"], z["indices"]
        if v.shape != (hi - lo, k) or i.shape != (hi - lo, k):
            raise SaefeError(f"chunk {c} in {chunks} is malformed; delete {chunks} and re-run")
        data[lo * k : hi * k] = v.ravel()
        cols[lo * k : hi * k] = i.ravel()
    indptr = np.arange(0, n * k + 1, k, dtype=np.int64)
    csr = sp.csr_matrix((data, cols, indptr), shape=(n, H))
    csr.eliminate_zeros()  # ReLU / strict-threshold zeros are not codes
    csr.sort_indices()
    csc = csr.tocsc()
    csc.sort_indices()
    _save_sparse_atomic(out / CSR_NAME, csr)
    _save_sparse_atomic(out / CSC_NAME, csc)
    meta = {
        "format": FORMAT,
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
        "nnz": int(csr.nnz),
        "mean_l0": float(csr.nnz / max(n, 1)),
        "dtype": "float32",
        "seconds": round(time.time() - t0, 2),
    }
    write_json_atomic(out / CODES_JSON, meta)
    shutil.rmtree(chunks, ignore_errors=True)
    return out


def load_codes(index_dir: str | os.PathLike, sae_name_or_dir: str | os.PathLike) -> tuple[Any, Any]:
    """(csr, csc) codes of the index for an SAE given by dir (hash-checked) or by name."""
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
    csr = sp.load_npz(out / CSR_NAME).tocsr()
    csc = sp.load_npz(out / CSC_NAME).tocsc()
    if csr.shape != tuple(meta["shape"]) or csc.shape != tuple(meta["shape"]):
        raise SaefeError(f"codes in {out} have shape {csr.shape}/{csc.shape}, codes.json says {meta['shape']}; re-run encode-sae")
    return csr, csc
