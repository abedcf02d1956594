"""Export a result list (CSV or JSON by the file's extension): rank, id, score, path/url, the
near-duplicate group and, with an SAE, each image's strongest features (one batched encode)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from saefe.errors import SaefeError

N_FEATURES = 5


def result_rows(engine, results: Sequence, n_features: int = N_FEATURES, offset: int = 0) -> list[dict[str, Any]]:
    feats = _top_features(engine, [r.id for r in results], n_features)
    rows = []
    for rank, r in enumerate(results, offset + 1):
        md = dict(r.metadata)
        row: dict[str, Any] = {"rank": rank, "id": int(r.id), "score": round(float(r.score), 6)}
        for key in ("path", "url", "image_path"):
            if md.get(key) is not None:
                row[key] = md.pop(key)
        if r.group is not None:
            row["group_size"] = len(r.group)
            row["group_ids"] = " ".join(str(i) for i in r.group)
        if feats is not None:
            row["features"] = " ".join(f"{f}:{a:.4f}" for f, a in feats[len(rows)])
        row.update({k: v for k, v in md.items() if k not in row})
        rows.append(row)
    return rows


def _top_features(engine, ids: list[int], n: int) -> list[list[tuple[int, float]]] | None:
    if getattr(engine, "sae", None) is None or not ids or getattr(engine, "backend", None) is not None:
        return None
    import torch

    x = torch.from_numpy(engine.store.vectors_f32(ids))
    with torch.no_grad():
        v, i = engine.sae.encode(x)
    v, i = v.float().numpy(), i.numpy()
    out = []
    for vals, idx in zip(v, i):
        order = np.argsort(-vals)[:n]
        out.append([(int(idx[j]), float(vals[j])) for j in order if vals[j] > 0])
    return out


def export_results(engine, results: Sequence, path: str | os.PathLike, n_features: int = N_FEATURES,
                   offset: int = 0) -> Path:
    """Write ``results`` to ``path`` (.csv or .json; written to a temp name, then renamed)."""
    import pandas as pd

    p = Path(path)
    kind = p.suffix.lower()
    if kind not in (".csv", ".json"):
        raise SaefeError(f"export file must end in .csv or .json, got {p.name!r}")
    rows = result_rows(engine, results, n_features, offset)
    tmp = p.with_name(p.name + ".tmp")
    try:
        if kind == ".json":
            with open(tmp, "w") as f:
                json.dump(rows, f, indent=1, default=str)
        else:
            pd.DataFrame(rows).to_csv(tmp, index=False)
        os.replace(tmp, p)
    except OSError as e:
        raise SaefeError(f"cannot write {p}: {e.strerror or e}") from None
    return p
