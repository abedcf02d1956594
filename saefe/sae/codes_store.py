"""On-disk SAE codes as plain ``.npy`` arrays that searches memory-map (schema 2).

    INDEX/codes/<sae>/csc_indptr.npy   int64 (d_hidden + 1)   feature j's postings are
    INDEX/codes/<sae>/csc_indices.npy  int32 (nnz)            indices[indptr[j]:indptr[j+1]]
    INDEX/codes/<sae>/csc_data.npy     float32 (nnz)          (image ids ascending) and data[...]
    INDEX/codes/<sae>/csr_indptr.npy   int64 (N + 1)          image i's codes, feature ids
    INDEX/codes/<sae>/csr_indices.npy  int32 (nnz)            ascending
    INDEX/codes/<sae>/csr_data.npy     float32 (nnz)
    INDEX/codes/<sae>/codes.json       schema version, shapes, SAE hash, ... (written last)

A ``.npz`` is a zip: numpy must read a member whole before using it, so 10M images x k 32 cost
2.5 GB of RAM per matrix to open. Plain ``.npy`` files open with ``mmap_mode="r"`` in
microseconds, and a feature-mode search then reads only its features' postings from disk.

The merge turns per-chunk top-k codes (``chunks/NNNNNN.npz``: values, indices, (rows, k)) into
both layouts out of core: one pass counts postings per feature, a second scatters each chunk's
entries into the memory-mapped CSC arrays (chunk rows ascending, so postings stay sorted) and
appends its rows to the CSR arrays. RAM stays at a few chunk sizes whatever N is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from saefe.errors import SaefeError

SCHEMA_VERSION = 2
ARRAYS = ("csc_indptr", "csc_indices", "csc_data", "csr_indptr", "csr_indices", "csr_data")


@dataclass
class SparseArrays:
    """A compressed sparse matrix as three (memory-mapped) arrays; ``format`` is csr or csc.

    Quacks enough like a scipy matrix for FeatureRanker (indptr/indices/data/shape/format),
    without scipy's index-dtype unification that would copy memory-mapped arrays into RAM."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    shape: tuple[int, int]
    format: str

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def to_scipy(self):
        """A scipy matrix (reads the arrays into RAM: for corpora that fit)."""
        import scipy.sparse as sp

        cls = sp.csr_matrix if self.format == "csr" else sp.csc_matrix
        return cls((np.asarray(self.data), np.asarray(self.indices), np.asarray(self.indptr)), shape=self.shape)

    def tocsc(self):
        return self if self.format == "csc" else self.to_scipy().tocsc()

    def tocsr(self):
        return self if self.format == "csr" else self.to_scipy().tocsr()


def open_arrays(dir: str | os.PathLike, shape: tuple[int, int]) -> tuple[SparseArrays, SparseArrays]:
    """(csr, csc) memory-mapped from ``dir``; checks lengths against ``shape`` (cheap: no data read)."""
    d = Path(dir)
    a = {}
    for name in ARRAYS:
        p = d / f"{name}.npy"
        if not p.exists():
            raise SaefeError(f"SAE codes in {d} miss {p.name}; re-run `saefe encode-sae`")
        a[name] = np.load(p, mmap_mode="r", allow_pickle=False)
    n, h = shape
    if len(a["csr_indptr"]) != n + 1 or len(a["csc_indptr"]) != h + 1:
        raise SaefeError(f"SAE codes in {d} do not match their shape {shape}; re-run `saefe encode-sae`")
    nnz = int(a["csr_indptr"][-1])
    if not (len(a["csr_indices"]) == len(a["csr_data"]) == len(a["csc_indices"]) == len(a["csc_data"]) == nnz
            == int(a["csc_indptr"][-1])):
        raise SaefeError(f"SAE codes in {d} are truncated or inconsistent; re-run `saefe encode-sae`")
    csr = SparseArrays(a["csr_indptr"], a["csr_indices"], a["csr_data"], (n, h), "csr")
    csc = SparseArrays(a["csc_indptr"], a["csc_indices"], a["csc_data"], (n, h), "csc")
    return csr, csc


def _open_out(path: Path, dtype, length: int) -> np.memmap:
    return np.lib.format.open_memmap(path.with_name(path.name + ".tmp"), mode="w+", dtype=dtype, shape=(length,))


def _finish(arrays: dict[str, np.memmap], out: Path) -> None:
    names = list(arrays)
    for arr in arrays.values():
        arr.flush()
    arrays.clear()  # unmap before the renames
    for name in names:
        tmp = out / f"{name}.npy.tmp"
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out / f"{name}.npy")


def merge_chunks(
    chunks: list[Callable[[], tuple[np.ndarray, np.ndarray]]],
    n: int,
    d_hidden: int,
    out: str | os.PathLike,
    progress: Iterable | None = None,
) -> int:
    """Write the six arrays from per-chunk (values (r, k) float32, indices (r, k) int) loaders,
    given in row order. Zero values are not codes (dropped); feature ids in a row ascend.
    Returns nnz. Two passes over the chunks; memory stays at O(chunk + d_hidden)."""
    o = Path(out)
    counts = np.zeros(d_hidden, np.int64)
    rows_seen = 0
    for load in chunks:  # pass 1: postings per feature
        v, i = load()
        if v.shape != i.shape or v.ndim != 2:
            raise SaefeError("a chunk of SAE codes is malformed; delete its chunks dir and re-run encode-sae")
        if len(i) and (int(i.min()) < 0 or int(i.max()) >= d_hidden):
            raise SaefeError(f"a chunk of SAE codes holds feature ids outside [0, {d_hidden})")
        counts += np.bincount(i[v != 0].ravel(), minlength=d_hidden)
        rows_seen += len(v)
    if rows_seen != n:
        raise SaefeError(f"SAE code chunks hold {rows_seen} rows, expected {n}; delete the chunks dir and re-run")
    nnz = int(counts.sum())
    if n >= 2**31:
        raise SaefeError("more than 2^31 images: image ids no longer fit int32 postings")
    arrays = {
        "csc_indptr": _open_out(o / "csc_indptr.npy", np.int64, d_hidden + 1),
        "csc_indices": _open_out(o / "csc_indices.npy", np.int32, nnz),
        "csc_data": _open_out(o / "csc_data.npy", np.float32, nnz),
        "csr_indptr": _open_out(o / "csr_indptr.npy", np.int64, n + 1),
        "csr_indices": _open_out(o / "csr_indices.npy", np.int32, nnz),
        "csr_data": _open_out(o / "csr_data.npy", np.float32, nnz),
    }
    csc_ptr = np.zeros(d_hidden + 1, np.int64)
    np.cumsum(counts, out=csc_ptr[1:])
    arrays["csc_indptr"][:] = csc_ptr
    fill = csc_ptr[:-1].copy()  # next free slot per feature
    row0, pos = 0, 0
    arrays["csr_indptr"][0] = 0
    for load in chunks:  # pass 2: scatter into CSC, append to CSR
        v, i = load()
        r, k = v.shape
        i = i.astype(np.int32, copy=False)
        order = np.argsort(i, axis=1, kind="stable")  # ascending feature ids within each row
        i = np.take_along_axis(i, order, 1)
        v = np.take_along_axis(v.astype(np.float32, copy=False), order, 1)
        nz = v != 0
        per_row = nz.sum(1)
        rows = np.repeat(np.arange(row0, row0 + r, dtype=np.int32), per_row)
        fi, fv = i[nz], v[nz]  # row-major: rows ascending
        m = len(fi)
        arrays["csr_indices"][pos : pos + m] = fi
        arrays["csr_data"][pos : pos + m] = fv
        arrays["csr_indptr"][row0 + 1 : row0 + r + 1] = pos + np.cumsum(per_row)
        by_feat = np.argsort(fi, kind="stable")  # keeps rows ascending within a feature
        fs = fi[by_feat]
        c = np.bincount(fs, minlength=d_hidden)
        first = np.zeros(d_hidden, np.int64)
        np.cumsum(c[:-1], out=first[1:])
        dest = fill[fs] + (np.arange(m) - first[fs])
        arrays["csc_indices"][dest] = rows[by_feat]
        arrays["csc_data"][dest] = fv[by_feat]
        fill += c
        row0 += r
        pos += m
        if progress is not None:
            progress.update(r)
    if not np.array_equal(fill, csc_ptr[1:]):
        raise SaefeError("SAE code chunks changed during the merge; re-run encode-sae")
    _finish(arrays, o)
    return nnz


def remove_arrays(dir: str | os.PathLike) -> None:
    for name in ARRAYS:
        (Path(dir) / f"{name}.npy").unlink(missing_ok=True)
