"""Corpus readers: a folder of images, a Hugging Face dataset, or precomputed embeddings.

Image corpora are random-access lists of (bytes, metadata) in a fixed, sorted order, so a
build can be cut into numbered chunks and resumed by chunk number. Bytes (not decoded images)
are what travels, so duplicates can be found by hash and a remote clip_server gets the file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import pandas as pd

from saefe.errors import CorpusError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jfif"}


class ItemChanged(OSError):
    """The file changed (size or mtime) while it was being read: its bytes cannot be trusted."""


class ImageCorpus(Protocol):
    kind: str
    source: str

    def __len__(self) -> int: ...

    def key(self, i: int) -> str: ...

    def read(self, i: int) -> tuple[bytes, dict[str, Any]]:
        """Bytes of item i and its metadata; raises OSError if it cannot be read."""
        ...


class IndexedView:
    """Items ``idx`` of ``base`` as a corpus of their own (position j -> base item ``idx[j]``): an
    update's build order (old rows first, then new items) or one Ray task's items."""

    def __init__(self, base: ImageCorpus, idx: Sequence[int]):
        self.base, self.idx = base, idx
        self.kind, self.source = base.kind, base.source

    def __len__(self) -> int:
        return len(self.idx)

    def key(self, j: int) -> str:
        return self.base.key(self.idx[j])

    def read(self, j: int) -> tuple[bytes, dict[str, Any]]:
        return self.base.read(self.idx[j])


@dataclass
class FolderCorpus:
    """Every file with an image extension below ``root``, recursively, in sorted order."""

    root: Path
    paths: list[str]
    kind: str = "folder"
    errors: list[str] = field(default_factory=list)  # sub-folders the scan could not read

    @classmethod
    def scan(cls, root: str | os.PathLike) -> "FolderCorpus":
        r = Path(root).expanduser()
        if not r.exists():
            raise CorpusError(f"image folder {r} does not exist")
        if not r.is_dir():
            raise CorpusError(f"{r} is not a folder")
        if not os.access(r, os.R_OK | os.X_OK):
            raise CorpusError(f"image folder {r} is not readable")
        paths: list[str] = []
        errors: list[str] = []

        def onerror(e: OSError) -> None:
            log.warning("skipping %s", e)
            errors.append(f"{e.filename}: {e.strerror or type(e).__name__}")

        for dirpath, dirnames, filenames in os.walk(r, onerror=onerror):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in filenames:
                if Path(fn).suffix.lower() in IMAGE_EXTENSIONS and not fn.startswith("."):
                    paths.append(os.path.relpath(os.path.join(dirpath, fn), r))
        if not paths:
            raise CorpusError(
                f"no images under {r} (looked recursively for {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        return cls(r.resolve(), sorted(paths), errors=errors)

    @property
    def source(self) -> str:
        return str(self.root)

    def __len__(self) -> int:
        return len(self.paths)

    def key(self, i: int) -> str:
        return self.paths[i]

    def stat(self, i: int) -> tuple[int, int] | None:
        """(size, mtime_ns) of item i, or None when it cannot be stat'ed."""
        try:
            st = os.stat(self.root / self.paths[i])
        except OSError:
            return None
        return int(st.st_size), int(st.st_mtime_ns)

    def read(self, i: int) -> tuple[bytes, dict[str, Any]]:
        """Bytes plus path, size and mtime; the size and mtime are those of the bytes returned
        (checked before and after reading), so an incremental build can trust them later."""
        rel = self.paths[i]
        with open(self.root / rel, "rb") as f:
            before = os.fstat(f.fileno())
            data = f.read()
            after = os.fstat(f.fileno())
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or len(data) != after.st_size:
            raise ItemChanged(0, "changed while being read", str(self.root / rel))
        return data, {"path": rel, "file_size": int(after.st_size), "mtime_ns": int(after.st_mtime_ns)}


@dataclass
class HFDatasetCorpus:
    """A local Hugging Face dataset (imagefolder, parquet, webdataset shards or a saved dataset).

    The image column is read undecoded (bytes), so corrupt images become logged skips instead of
    exceptions inside ``datasets``; every other column travels as metadata.
    """

    ds: Any
    image_column: str
    source: str
    kind: str = "hf-dataset"

    @classmethod
    def load(cls, path: str, split: str = "train", image_column: str | None = None, builder: str | None = None) -> "HFDatasetCorpus":
        import datasets

        p = Path(path).expanduser()
        if not p.exists():
            raise CorpusError(f"dataset path {p} does not exist")
        try:
            if (p / "dataset_info.json").exists() or (p / "state.json").exists():
                ds = datasets.load_from_disk(str(p))
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[split]
            elif builder:
                ds = datasets.load_dataset(builder, data_dir=str(p), split=split)
            elif p.is_file():
                b = {".parquet": "parquet", ".tar": "webdataset", ".csv": "csv", ".json": "json", ".jsonl": "json"}.get(p.suffix)
                if b is None:
                    raise CorpusError(f"cannot tell the dataset format of {p}; pass --dataset-builder")
                ds = datasets.load_dataset(b, data_files=str(p), split=split)
            else:
                ds = datasets.load_dataset(str(p), split=split)
        except CorpusError:
            raise
        except Exception as e:  # datasets raises many types for a bad path/format
            raise CorpusError(f"cannot load dataset {p}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
        col = image_column or _find_image_column(ds)
        if col not in ds.column_names:
            raise CorpusError(f"dataset {p} has no column {col!r}; columns: {ds.column_names}")
        feat = ds.features.get(col)
        if isinstance(feat, datasets.Image):
            ds = ds.cast_column(col, datasets.Image(decode=False))
        if len(ds) == 0:
            raise CorpusError(f"dataset {p} ({split}) is empty")
        return cls(ds, col, str(p.resolve()))

    def __len__(self) -> int:
        return len(self.ds)

    def key(self, i: int) -> str:
        return f"row {i}"

    def read(self, i: int) -> tuple[bytes, dict[str, Any]]:
        row = self.ds[int(i)]
        img = row.pop(self.image_column)
        flat: dict[str, Any] = {}
        for k, v in row.items():  # webdataset's per-sample .json becomes a nested dict: flatten it
            if isinstance(v, dict):
                for k2, v2 in v.items():
                    flat[k2 if k2 not in row else f"{k}.{k2}"] = v2
            else:
                flat[k] = v
        meta = {k: _scalar(v) for k, v in flat.items()}
        meta = {k: v for k, v in meta.items() if v is not None}
        if isinstance(img, dict):
            data = img.get("bytes")
            if data is None and img.get("path"):
                with open(img["path"], "rb") as f:
                    data = f.read()
            if img.get("path"):
                meta.setdefault("path", str(img["path"]))
        elif isinstance(img, (bytes, bytearray)):
            data = bytes(img)
        else:  # already decoded (e.g. webdataset's PIL images): re-encode losslessly
            import io

            buf = io.BytesIO()
            img.save(buf, format="PNG")
            data = buf.getvalue()
        meta.setdefault("row", int(i))
        return data or b"", meta


def _find_image_column(ds) -> str:
    import datasets

    for name, feat in ds.features.items():
        if isinstance(feat, datasets.Image):
            return name
    for name in ("image", "img", "jpg", "jpeg", "png", "webp"):
        if name in ds.column_names:
            return name
    raise CorpusError(f"no image column found among {ds.column_names}; pass --image-column")


def _scalar(v: Any) -> Any:
    """Metadata must be Parquet-friendly scalars; nested values become strings."""
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    if isinstance(v, np.generic):
        return v.item()
    return str(v)


def read_precomputed(vectors_path: str, metadata_path: str | None) -> tuple[np.ndarray, pd.DataFrame]:
    """An .npy of vectors plus an optional CSV/Parquet of metadata, row-aligned."""
    vp = Path(vectors_path).expanduser()
    if not vp.exists():
        raise CorpusError(f"embeddings file {vp} does not exist")
    try:
        vecs = np.load(vp, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise CorpusError(f"cannot read {vp} as a .npy array of vectors: {e}") from None
    if vecs.ndim != 2 or vecs.shape[0] == 0:
        raise CorpusError(f"{vp} holds an array of shape {vecs.shape}; expected (N, d) with N > 0")
    if metadata_path:
        mp = Path(metadata_path).expanduser()
        if not mp.exists():
            raise CorpusError(f"metadata file {mp} does not exist")
        meta = pd.read_parquet(mp) if mp.suffix == ".parquet" else pd.read_csv(mp)
        if len(meta) != vecs.shape[0]:
            raise CorpusError(f"{vp} has {vecs.shape[0]} vectors but {mp} has {len(meta)} rows")
    else:
        meta = pd.DataFrame({"row": np.arange(vecs.shape[0])})
    return vecs, meta
