"""Estimated demographics of every image of an index, from the probes (:mod:`saefe.labels.probes`).

Stored beside the index as ``estimated_demographics.parquet``: one row per image (row = id), one
float32 column per group (``Male``, ``Female``, ``Kid``...) holding the probe's probability, and
the file's schema metadata (key ``saefe``) saying these are estimates, from which probes
(sha256), for which encoder. A stale file (other probes, other image count) is recomputed.

:func:`load_demographics` is what the engine calls: true labels from ``attributes.parquet`` where
an image has them, these estimates elsewhere (:class:`saefe.labels.demographics.Demographics`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from saefe.errors import SaefeError
from saefe.labels.probes import ProbeSet

log = logging.getLogger(__name__)

ESTIMATES = "estimated_demographics.parquet"
CHUNK = 65536


def estimate(store, probes: ProbeSet, sae=None, sae_dir=None, progress: bool = False) -> pd.DataFrame:
    """(N, groups) probabilities for every image of ``store``, computed in chunks."""
    from tqdm import tqdm

    if probes.encoder_info is not None:
        probes.encoder_info.check_compatible(store.encoder_info, f"the probes at {probes.dir}", f"the index at {store.dir}")
    n = len(store)
    if probes.space == "sae":
        if sae is None:
            raise SaefeError(f"the probes at {probes.dir} read SAE codes; open the index with the SAE they were fit on")
        from saefe.labels.profiles import load_or_compute_codes

        x_all = load_or_compute_codes(store, sae, sae_dir)
    cols: dict[str, np.ndarray] = {g: np.zeros(n, np.float32) for p in probes.probes.values() for g in p.groups}
    for off in tqdm(range(0, n, CHUNK), desc="estimating demographics", unit="chunk", disable=not progress):
        rows = np.arange(off, min(n, off + CHUNK))
        x = x_all[rows] if probes.space == "sae" else np.asarray(store.vectors[rows[0] : rows[-1] + 1], np.float32)
        for p in probes.probes.values():
            prob = p.predict_proba(x)
            for j, g in enumerate(p.groups):
                cols[g][rows] = prob[:, j]
    return pd.DataFrame(cols)


def _meta(probes: ProbeSet, n: int) -> dict:
    return {"estimated": True, "probes_sha256": probes.sha256, "probes_dir": str(probes.dir) if probes.dir else None,
            "n": int(n), "attributes": {a: p.groups for a, p in probes.probes.items()},
            "encoder": probes.encoder_info.to_dict() if probes.encoder_info else None}


def write_estimates(store, df: pd.DataFrame, probes: ProbeSet) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           b"saefe": json.dumps(_meta(probes, len(df))).encode()})
    path = Path(getattr(store, "data", store.dir)) / ESTIMATES  # per generation: rows follow its ids
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def read_estimates(store, probes: ProbeSet | None = None) -> pd.DataFrame | None:
    """The stored estimates when present and made by ``probes`` (any probes when None)."""
    import pyarrow.parquet as pq

    path = Path(getattr(store, "data", store.dir)) / ESTIMATES  # per generation: rows follow its ids
    if not path.exists():
        return None
    try:
        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {}).get(b"saefe", b"{}"))
    except Exception as e:  # noqa: BLE001 - a damaged file is recomputed, never fatal
        log.warning("ignoring unreadable %s (%s)", path, type(e).__name__)
        return None
    if not meta.get("estimated") or int(meta.get("n", -1)) != len(store) or table.num_rows != len(store):
        return None
    if probes is not None and meta.get("probes_sha256") != probes.sha256:
        return None
    return table.to_pandas()


def ensure_estimates(store, probes: ProbeSet, sae=None, sae_dir=None, progress: bool = False) -> pd.DataFrame:
    """Stored estimates for ``probes``, else computed now and stored (kept in memory only when the
    index dir is read-only)."""
    df = read_estimates(store, probes)
    if df is not None:
        return df
    df = estimate(store, probes, sae=sae, sae_dir=sae_dir, progress=progress)
    try:
        log.info("wrote %s", write_estimates(store, df, probes))
    except OSError as e:
        log.warning("cannot store demographic estimates beside %s (%s); keeping them in memory",
                    store.dir, e.strerror or type(e).__name__)
    return df


def load_demographics(store, attributes: pd.DataFrame | None, profiles=None, sae=None, sae_dir=None):
    """Labels where they exist, estimates (from the probes beside ``profiles``) elsewhere."""
    from saefe.labels.demographics import Demographics
    from saefe.labels.probes import probes_dir_of

    estimates = None
    pdir = probes_dir_of(profiles) if profiles is not None else None
    if pdir is not None:
        needs = _needs_estimates(attributes, len(store))
        if needs:
            try:
                probes = ProbeSet.load(pdir, encoder_info=store.encoder_info)
                estimates = ensure_estimates(store, probes, sae=sae, sae_dir=sae_dir)
            except SaefeError as e:
                log.warning("no demographic estimates: %s", e)
    if estimates is None:
        estimates = read_estimates(store)  # estimates made earlier (e.g. by `saefe labels --estimate`)
        if estimates is not None and not _needs_estimates(attributes, len(store)):
            estimates = None
    return Demographics.resolve(len(store), attributes, estimates)


def _needs_estimates(attributes: pd.DataFrame | None, n: int) -> bool:
    """True unless every image has a true group for every attribute."""
    from saefe.labels.attributes import DEMOGRAPHICS

    if attributes is None or len(attributes) != n:
        return True
    for names in DEMOGRAPHICS.values():
        cols = [g for g in names if g in attributes.columns]
        if len(cols) < 2 or not (attributes[cols].to_numpy().sum(axis=1) > 0).all():
            return True
    return False
