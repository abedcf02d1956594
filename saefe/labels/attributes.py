"""Per-image labels stored beside an index, and the index's default SAE.

``attributes.parquet`` holds one 0/1 column per label, one row per stored image (row = id). It
is the ground truth the bias panel and ``saefe evaluate`` measure against; label profiles only
keep per-feature averages. ``attributes.json`` records where the labels came from (annotations
CSV or label folders), so an incremental update can label its new rows the same way.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from saefe.ingest.store import EmbeddingStore, read_manifest, write_manifest
from saefe.manifest import read_json, write_json_atomic

log = logging.getLogger(__name__)

ATTRIBUTES = "attributes.parquet"
ATTRIBUTES_SOURCE = "attributes.json"

# Protected attribute -> its groups, in the EMOTIC annotations' terms (one 0/1 column per group).
DEMOGRAPHICS: dict[str, list[str]] = {"gender": ["Male", "Female"], "age": ["Kid", "Teenager", "Adult"]}


def write_attributes(store: EmbeddingStore, membership, **params: Any) -> Path:
    """Write the 0/1 label table; ``params`` (e.g. vad_high / vad_low) are kept with its source."""
    df = pd.DataFrame(np.asarray(membership.matrix).astype(np.uint8), columns=list(membership.labels))
    path = write_attributes_table(store.data, df)
    rep = getattr(membership, "report", None)
    if rep is not None and rep.kind in ("annotations", "folders"):
        write_json_atomic(store.data / ATTRIBUTES_SOURCE,
                          {"kind": rep.kind, "source": str(Path(rep.source).resolve()), "params": params})
    return path


def write_attributes_table(data_dir: Path, df: pd.DataFrame) -> Path:
    path = Path(data_dir) / ATTRIBUTES
    tmp = path.with_name(path.name + ".tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def read_attributes(store: EmbeddingStore) -> pd.DataFrame | None:
    p = store.data / ATTRIBUTES
    if not p.exists():
        return None
    df = pd.read_parquet(p)
    return df if len(df) == len(store) else None


def carry_attributes(old: EmbeddingStore, new: EmbeddingStore, old_rows: np.ndarray) -> str | None:
    """Give the new generation ``new`` per-image labels: re-read from their recorded source when it
    is still there (new images get labels too), else the old rows' labels carried to their new ids
    (``old_rows[i]`` = old id of new row i, -1 for a new image, which gets 0s). Returns a note."""
    df = read_attributes(old)
    if df is None:
        return None
    src_file = old.data / ATTRIBUTES_SOURCE
    src = read_json(src_file) if src_file.exists() else None
    if src and Path(src["source"]).exists():
        from saefe.errors import SaefeError
        from saefe.labels.annotations import membership_from_folders, read_annotations

        try:
            if src["kind"] == "annotations":
                m = read_annotations(src["source"], new, **src.get("params", {}))
            else:
                m = membership_from_folders(new, src["source"])
            write_attributes(new, m, **src.get("params", {}))
            return f"re-read from {src['source']}"
        except SaefeError as e:
            log.warning("could not re-read the labels from %s (%s); carrying the old rows over", src["source"], e)
    old_rows = np.asarray(old_rows, dtype=np.int64)
    vals = np.zeros((len(old_rows), df.shape[1]), np.uint8)
    have = old_rows >= 0
    vals[have] = df.to_numpy(dtype=np.uint8)[old_rows[have]]
    write_attributes_table(new.data, pd.DataFrame(vals, columns=df.columns))
    if src is not None:
        write_json_atomic(new.data / ATTRIBUTES_SOURCE, src)
    n_new = int((~have).sum())
    if n_new:
        log.warning("%d new images have no per-image labels (their source is gone); run `saefe labels` again", n_new)
    return f"carried over ({n_new} new images unlabelled)"


def set_default_sae(store: EmbeddingStore, sae_dir: Path) -> None:
    """Record the SAE the engine and app open with this index when none is named."""
    m = dict(read_manifest(store.dir) or store.manifest)  # the newest generation's, not a stale copy
    m["default_sae"] = os.path.relpath(Path(sae_dir).resolve(), store.dir.resolve())
    write_manifest(store.dir, m)
    store.manifest = m
