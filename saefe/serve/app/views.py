"""Query parsing and the JSON / Markdown views of results and bias, shared by the UI and the API."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from saefe.errors import SaefeError, SteeringError
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
    dups = f" · +{r['group_size'] - 1} near-duplicates" if int(r.get("group_size") or 1) > 1 else ""
    return f"{r['score']:.3f} · {size}{dups}"


def bias_json(engine: Engine, results: Sequence[SearchResult]) -> dict[str, Any]:
    """The results' make-up (``shares``, ``base_rates``, ``max_skew``, ``ndkl``, ``estimated``,
    ``sources``, and ``attributes``: the per-attribute shape of ``saefe search --bias --json``).
    Groups are true labels where images have them, probe estimates elsewhere."""
    from saefe.search.bias import measure_demographics
    from saefe.search.debias import local_ids

    if not engine.demographics.attributes:
        raise SaefeError(f"no per-image demographic labels for {engine.store.dir} (attributes.parquet) and no "
                         "probes to estimate them (`saefe labels --annotations`)")
    ids = local_ids(engine, results, strict=False)
    if len(ids) == 0:
        raise SaefeError("none of the results is in the local corpus, so their make-up is unknown")
    rep = measure_demographics(ids, engine.demographics)
    return {**rep.to_dict(), "attributes": rep.by_attribute()}


def bias_markdown(rep: dict[str, Any], before: dict[str, Any] | None = None) -> str:
    """The bias panel; with ``before`` (the same query without debiasing), a before/after table."""
    if not rep.get("shares"):
        return "_no demographic make-up for these results_"
    title = f"**Bias of the top {rep['k']}**"
    if before:
        lines = [f"{title}: before → after debiasing (share in results; corpus base rate)", "",
                 "| attribute | group | before | after | corpus | |", "|---|---|---:|---:|---:|---|"]
    else:
        lines = [f"{title} (share in results vs corpus base rate)", "",
                 "| attribute | group | results | corpus | |", "|---|---|---:|---:|---|"]
    for attr, shares in rep["shares"].items():
        est = " _(estimated)_" if (rep.get("estimated") or {}).get(attr) else ""
        for g, s in shares.items():
            b = rep["base_rates"][attr][g]
            arrow = "▲" if s > b + 0.05 else ("▼" if s < b - 0.05 else "≈")
            if before:
                s0 = (before.get("shares", {}).get(attr) or {}).get(g)
                lines.append(f"| {attr}{est} | {g} | {_pct(s0)} | {s:.0%} | {b:.0%} | {arrow} |")
            else:
                lines.append(f"| {attr}{est} | {g} | {s:.0%} | {b:.0%} | {arrow} |")
    lines.append("")

    def metrics(r, attr):
        return f"MaxSkew {_num(r['max_skew'].get(attr), '{:+.2f}')}, NDKL {_num(r['ndkl'].get(attr), '{:.3f}')}"

    lines.append(" · ".join(f"{attr}: " + (f"{metrics(before, attr)} → " if before else "") + metrics(rep, attr)
                            for attr in rep["shares"]) + "  _(0 = mirrors the corpus)_")
    src = {a: s for a, s in (rep.get("sources") or {}).items() if s != "labels"}
    if src:
        lines.append("")
        lines.append("_groups from " + ", ".join(f"{a}: {s}" for a, s in src.items())
                     + " (probe estimates where an image has no label)_")
    return "\n".join(lines)


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _num(x, fmt: str) -> str:
    return "n/a" if x is None else fmt.format(x)


def mix_summary(mix) -> str:
    ids, ws = mix.as_arrays()
    if len(ids) == 0:
        return "mix: all sliders at zero"
    order = np.argsort(-np.abs(ws))[:6]
    top = ", ".join(f"f{ids[i]} {ws[i]:+.3f}" for i in order)
    return f"mix: {len(ids)} non-zero sliders, L2 norm {mix.norm():.3f} (largest: {top})"
