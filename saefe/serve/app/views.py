"""Query parsing and the JSON / Markdown views of results and bias, shared by the UI and the API."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from saefe.errors import SaefeError, SteeringError
from saefe.search.bias import measure_bias
from saefe.search.engine import Engine, SearchResult, Term


def parse_query(engine: Engine, query: str) -> Term:
    """A label name, an expression, or features JSON (``{"12": 0.5}``, ``[[12, 0.5]]``, ``[12, 40]``)."""
    if not isinstance(query, str) or not query.strip():
        raise SteeringError("empty query: give a label, an expression like 'Esteem - Male + Adult' or features JSON")
    q = query.strip()
    if q[0] in "{[":
        try:
            obj = json.loads(q)
        except json.JSONDecodeError as e:
            raise SteeringError(f"features JSON is not valid ({e.msg} at column {e.colno})") from None
        feats: dict[int, float] = {}
        items = obj.items() if isinstance(obj, dict) else obj
        for it in items:
            if isinstance(obj, dict):
                f, w = it
            elif isinstance(it, (list, tuple)) and len(it) == 2:
                f, w = it
            else:
                f, w = it, 1.0
            try:
                fid = int(str(f).strip().lstrip("#fF"))
            except ValueError:
                raise SteeringError(f"feature id must be an integer, got {f!r}") from None
            if isinstance(w, bool) or not isinstance(w, (int, float)):
                raise SteeringError(f"weight of feature {fid} must be a number, got {w!r}")
            feats[fid] = float(w)
        if not feats:
            raise SteeringError("features JSON is empty")
        return Term("features", feats)
    if engine.profiles is not None:
        try:
            return Term("label", engine.profiles.labels[engine.profiles.label_index(q)])
        except SaefeError:
            pass
    return Term("expr", q)


def image_ref(engine: Engine, r: SearchResult) -> str | None:
    m = r.metadata
    if m.get("image_path"):
        return str(m["image_path"])
    if m.get("url"):
        return str(m["url"])
    base = engine.store._image_base() if hasattr(engine.store, "_image_base") else None
    if base and isinstance(m.get("path"), str):
        p = os.path.join(base, m["path"])
        if os.path.exists(p):
            return p
    return None


def result_json(engine: Engine, r: SearchResult, rank: int) -> dict[str, Any]:
    out = {"rank": rank, **r.to_json()}
    if "path" in out:  # gradio_client would take a dict with a "path" key for a file to download
        out["file"] = out.pop("path")
    ref = image_ref(engine, r)
    if ref and "image_path" not in out and not ref.startswith(("http://", "https://")):
        out["image_path"] = ref
    return out


def caption(r: dict[str, Any]) -> str:
    size = f"{r['width']}×{r['height']}" if r.get("width") and r.get("height") else "size ?"
    return f"{r['score']:.3f} · {size}"


def local_ids(engine: Engine, results: Sequence[SearchResult]) -> np.ndarray:
    """Corpus row ids of results (a remote backend's are matched by sha256, then by path)."""
    if engine.backend is None:
        return np.array([r.id for r in results], dtype=np.int64)
    md = engine.store.metadata
    by_sha = dict(zip(md["sha256"], range(len(md)))) if "sha256" in md else {}
    by_path = dict(zip(md["path"], range(len(md)))) if "path" in md else {}
    ids = []
    for r in results:
        i = by_sha.get(r.metadata.get("sha256"), by_path.get(r.metadata.get("path")))
        if i is not None:
            ids.append(i)
    return np.array(ids, dtype=np.int64)


def bias_json(engine: Engine, results: Sequence[SearchResult]) -> dict[str, Any]:
    if engine.attributes is None:
        raise SaefeError(f"no per-image demographic labels for {engine.store.dir} (attributes.parquet)")
    ids = local_ids(engine, results)
    if len(ids) == 0:
        raise SaefeError("none of the results is in the local corpus, so their make-up is unknown")
    return measure_bias(ids, engine.attributes).to_dict()


def bias_markdown(rep: dict[str, Any]) -> str:
    if not rep.get("shares"):
        return "_no demographic make-up for these results_"
    lines = [f"**Bias of the top {rep['k']}** (share in results vs corpus base rate)", "",
             "| attribute | group | results | corpus | |", "|---|---|---:|---:|---|"]
    for attr, shares in rep["shares"].items():
        for g, s in shares.items():
            b = rep["base_rates"][attr][g]
            arrow = "▲" if s > b + 0.05 else ("▼" if s < b - 0.05 else "≈")
            lines.append(f"| {attr} | {g} | {s:.0%} | {b:.0%} | {arrow} |")
    lines.append("")
    lines.append(" · ".join(
        f"{attr}: MaxSkew {rep['max_skew'][attr]:+.2f}, NDKL {rep['ndkl'][attr]:.3f}" for attr in rep["shares"]
    ) + "  _(0 = mirrors the corpus)_")
    return "\n".join(lines)


def mix_summary(mix) -> str:
    ids, ws = mix.as_arrays()
    if len(ids) == 0:
        return "mix: all sliders at zero"
    order = np.argsort(-np.abs(ws))[:6]
    top = ", ".join(f"f{ids[i]} {ws[i]:+.3f}" for i in order)
    return f"mix: {len(ids)} non-zero sliders, L2 norm {mix.norm():.3f} (largest: {top})"
