"""Per-image labels stored beside an index, and the index's default SAE.

``attributes.parquet`` holds one 0/1 column per label, one row per stored image (row = id). It
is the ground truth the bias panel and ``saefe evaluate`` measure against; label profiles only
keep per-feature averages.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from saefe.ingest.store import EmbeddingStore, write_manifest

ATTRIBUTES = "attributes.parquet"

# Protected attribute -> its groups, in the EMOTIC annotations' terms (one 0/1 column per group).
DEMOGRAPHICS: dict[str, list[str]] = {"gender": ["Male", "Female"], "age": ["Kid", "Teenager", "Adult"]}


def write_attributes(store: EmbeddingStore, membership) -> Path:
    df = pd.DataFrame(np.asarray(membership.matrix).astype(np.uint8), columns=list(membership.labels))
    path = store.dir / ATTRIBUTES
    tmp = path.with_name(path.name + ".tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def read_attributes(store: EmbeddingStore) -> pd.DataFrame | None:
    p = store.dir / ATTRIBUTES
    if not p.exists():
        return None
    df = pd.read_parquet(p)
    return df if len(df) == len(store) else None


def set_default_sae(store: EmbeddingStore, sae_dir: Path) -> None:
    """Record the SAE the engine and app open with this index when none is named."""
    m = dict(store.manifest)
    m["default_sae"] = os.path.relpath(Path(sae_dir).resolve(), store.dir.resolve())
    write_manifest(store.dir, m)
    store.manifest = m
