"""The configuration tool: a Gradio Blocks app over an :class:`~saefe.search.engine.Engine`.

Layout (the seed's use cases):

1. Set emotion: a label dropdown, "Apply to all sliders", Reset, L2 Norm.
2. Feature sliders, grouped as the seed did: Custom (free feature ids), Shared (top-10 shared
   features of all labels), then one collapsed accordion per label with its top-10 distinct
   features. Range [-1, 1], step 0.001; each slider is labelled ``f<id> · <most tied label>``.
   A feature shown in several groups has one slider per group, kept in sync in the browser.
3. Add / Subtract a label with a multiplier, a free expression box (``Esteem - Male + Adult``)
   and manual feature ids with a weight.
4. Run Search (direction or exact feature-space mode, k results), search by text or image.
5. The selected result: its SmoothGrad heat map for the current query and its top features.
6. A feature inspector (top / bottom images, activation frequency, most tied labels).
7. A bias panel: the results' demographic make-up against the corpus' base rates.
8. Named API endpoints for ``gradio_client``: /search, /search_text, /search_image,
   /inspect_feature, /image_features, /bias, /labels.

The slider state: a ``gr.State`` holds the authoritative mix ``{feature: weight}``; every
operation reads the sliders (a slider that differs from the state is a user edit), applies the
:class:`~saefe.search.mix.FeatureMix` operation and writes the state and all sliders back.
User-facing failures (:class:`~saefe.errors.SaefeError`) show as a warning toast plus an error line
in the page (API calls get them as ``gr.Error``); the server keeps serving.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import gradio as gr
import numpy as np

from saefe.search.engine import MODES, Engine, SearchResult, Term
from saefe.errors import SaefeError, SteeringError

log = logging.getLogger(__name__)

TOP_N = 10  # sliders per group (the seed's K)
N_CUSTOM = 8  # free feature-id slots in the Custom group
DEFAULT_K = 20
MAX_K = 200
SLIDER_STEP = 0.001
CSS = """
#saefe-status p {margin: 0}
.saefe-err {color: #b00020; font-weight: 600}
.saefe-ok {color: #1b5e20}
.saefe-slider-group .form {gap: 2px}
"""


# -- slider layout ------------------------------------------------------------------------


@dataclass
class SliderLayout:
    """Which feature each slider shows, grouped as the seed did (Shared, then per label)."""

    groups: list[tuple[str, list[int]]] = field(default_factory=list)  # (title, feature ids)
    captions: dict[int, str] = field(default_factory=dict)  # feature -> "f12 · Esteem"

    @classmethod
    def from_profiles(cls, profiles, top_n: int = TOP_N) -> "SliderLayout":
        if profiles is None:
            return cls()
        groups = [("Shared", [int(f) for f in profiles.shared(k=top_n)])]
        for label in profiles.labels:
            groups.append((label, [int(f) for f in profiles.distinct(label, k=top_n)]))
        captions = {}
        for _, fids in groups:
            for f in fids:
                if f not in captions:
                    lab = profiles.most_tied_label(f)[0]
                    captions[f] = f"f{f} · {lab}" if lab else f"f{f}"
        return cls(groups, captions)

    @property
    def slots(self) -> list[int]:
        """Feature of each slider component, in creation order (duplicates included)."""
        return [f for _, fids in self.groups for f in fids]

    @property
    def shown(self) -> list[int]:
        return sorted(set(self.slots))

    def mirrors(self) -> dict[int, list[int]]:
        """feature -> slot indices, for features shown by more than one slider."""
        out: dict[int, list[int]] = {}
        for i, f in enumerate(self.slots):
            out.setdefault(f, []).append(i)
        return {f: idx for f, idx in out.items() if len(idx) > 1}


def _as_feature_id(value, d_hidden: int | None) -> int | None:
    """A custom slot's id (None when empty)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    from saefe.search.mix import FeatureMix

    return FeatureMix(d_hidden=d_hidden)._feature(value)


class MixState:
    """Converts between the UI's slider values and the authoritative FeatureMix."""

    def __init__(self, engine: Engine, layout: SliderLayout, n_custom: int = N_CUSTOM):
        self.engine = engine
        self.layout = layout
        self.n_custom = n_custom
        self.d_hidden = engine.sae.config.d_hidden if engine.sae is not None else None
        self.slots = layout.slots
        self.n_slots = len(self.slots)

    # values = [slider_0 .. slider_{S-1}, custom_id_0 .. custom_id_{C-1}, custom_w_0 .. custom_w_{C-1}]
    def read(self, prev: dict | None, values: Sequence) -> "FeatureMix":  # noqa: F821
        from saefe.search.mix import FeatureMix

        prev = {int(k): float(v) for k, v in (prev or {}).items()}
        mix = FeatureMix(d_hidden=self.d_hidden)
        s = self.n_slots
        by_feature: dict[int, list[float]] = {}
        for f, v in zip(self.slots, values[:s]):
            by_feature.setdefault(f, []).append(float(v or 0.0))
        for f, vs in by_feature.items():
            p = prev.get(f, 0.0)
            changed = [v for v in vs if abs(v - p) > SLIDER_STEP / 2]  # sliders show 3 decimals
            w = changed[-1] if changed else p
            if w != 0.0:
                mix.set(f, w)
        ids = values[s : s + self.n_custom]
        ws = values[s + self.n_custom : s + 2 * self.n_custom]
        for fid, w in zip(ids, ws):
            f = _as_feature_id(fid, self.d_hidden)
            if f is not None:
                mix.set(f, float(w or 0.0))
        return mix

    def custom_ids(self, values: Sequence) -> list[int | None]:
        s = self.n_slots
        out = []
        for v in values[s : s + self.n_custom]:
            try:
                out.append(_as_feature_id(v, self.d_hidden))
            except SaefeError:
                out.append(None)
        return out

    def write(self, mix, custom: list[int | None]) -> list:
        """Slider values + custom slots for ``mix``; features not shown go to free custom slots."""
        shown = set(self.slots)
        custom = list(custom) + [None] * (self.n_custom - len(custom))
        placed = {f for f in custom if f is not None}
        extra = [f for f, w in mix.items() if w != 0.0 and f not in shown and f not in placed]
        for f in extra:
            try:
                i = custom.index(None)
            except ValueError:
                raise SteeringError(
                    f"more than {self.n_custom} features outside the shown sliders; clear a Custom slot "
                    f"(features left: {', '.join(f'f{x}' for x in extra[:8])})"
                ) from None
            custom[i] = f
        sliders = [round(float(mix.get(f, 0.0)), 3) for f in self.slots]
        cids = [f"f{f}" if f is not None else "" for f in custom]
        cws = [round(float(mix.get(f, 0.0)), 3) if f is not None else 0.0 for f in custom]
        return sliders + cids + cws

    def touched(self, values: Sequence) -> list[int]:
        """Sliders a label operation sets: every shown slider plus the filled Custom slots."""
        return sorted(set(self.slots) | {f for f in self.custom_ids(values) if f is not None})


# -- query parsing and JSON views (shared by the UI and the API) ------------------------


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


def _image_ref(engine: Engine, r: SearchResult) -> str | None:
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
    ref = _image_ref(engine, r)
    if ref and "image_path" not in out and not ref.startswith(("http://", "https://")):
        out["image_path"] = ref
    return out


def caption(r: dict[str, Any]) -> str:
    size = f"{r['width']}×{r['height']}" if r.get("width") and r.get("height") else "size ?"
    return f"{r['score']:.3f} · {size}"


def _local_ids(engine: Engine, results: Sequence[SearchResult]) -> np.ndarray:
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
    from saefe.search.bias import measure_bias

    if engine.attributes is None:
        raise SaefeError(f"no per-image demographic labels for {engine.store.dir} (attributes.parquet)")
    ids = _local_ids(engine, results)
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


# -- the app ------------------------------------------------------------------------------


class SaefeApp:
    """Holds the engine and the handlers; :meth:`build` makes the Blocks."""

    def __init__(self, engine: Engine, top_n: int = TOP_N, n_custom: int = N_CUSTOM):
        self.engine = engine
        self.layout = SliderLayout.from_profiles(engine.profiles if engine.sae is not None else None, top_n)
        self.state = MixState(engine, self.layout, n_custom)
        self._lock = threading.Lock()  # first-use initialisation of engine caches
        self.blocks = None

    # ---- engine calls (raise SaefeError) -------------------------------------------------
    def warm(self) -> None:
        """Load what the first search would (codes for feature mode), so requests stay fast."""
        with self._lock:
            if self.engine.sae is not None and self.engine.backend is None:
                try:
                    _ = self.engine.ranker
                except SaefeError as e:
                    log.warning("feature-space mode unavailable: %s", e)

    def _check_mode(self, mode: str) -> str:
        mode = (mode or "direction").strip().lower()
        if mode.startswith("exact") or mode == "feature":
            mode = "features"
        if mode not in MODES:
            raise SaefeError(f"unknown search mode {mode!r}; use one of {', '.join(MODES)}")
        return mode

    def run_mix(self, mix, mode: str, k) -> tuple[list[SearchResult], np.ndarray]:
        mode = self._check_mode(mode)
        if mix.is_zero():
            raise SteeringError("all sliders are zero: set an emotion, move a slider or enter an expression")
        vec = self.engine.direction(mix)
        if mode == "direction":
            return self.engine.search_vector(vec, k), vec
        return self.engine.search_features(mix, k), vec

    def results_json(self, results: Sequence[SearchResult]) -> list[dict[str, Any]]:
        return [result_json(self.engine, r, i) for i, r in enumerate(results, 1)]

    # ---- API endpoints (gr.Error on bad input) ------------------------------------------
    def api_labels(self) -> dict:
        """Labels, their slider groups and index facts."""
        e = self.engine
        return {
            "labels": e.labels,
            "groups": {name: fids for name, fids in self.layout.groups},
            "captions": {str(f): c for f, c in self.layout.captions.items()},
            "d_hidden": self.state.d_hidden,
            "n_total": e.n_total,
            "modes": list(MODES),
            "index": str(e.store.dir),
        }

    def api_search(self, query: str, mode: str = "direction", k: int = DEFAULT_K) -> dict:
        """Search by a label, an expression ('Esteem - Male + Adult') or features JSON ({"12": 0.5})."""
        term = parse_query(self.engine, query)
        mode = self._check_mode(mode)
        results = self.engine.search([term], k=k, mode=mode)
        return {"query": query, "kind": term.kind, "mode": mode, "results": self.results_json(results)}

    def api_search_text(self, text: str, k: int = DEFAULT_K) -> dict:
        """Search by a text description (SigLIP text embedding)."""
        results = self.engine.search([Term("text", text)], k=k)
        return {"query": text, "kind": "text", "mode": "direction", "results": self.results_json(results)}

    def api_search_image(self, image: str, k: int = DEFAULT_K) -> dict:
        """Search by an image file (upload it with gradio_client.handle_file)."""
        if not image:
            raise SaefeError("no image given")
        results = self.engine.search([Term("image", _read_bytes(image))], k=k)
        return {"query": os.path.basename(str(image)), "kind": "image", "mode": "direction",
                "results": self.results_json(results)}

    def api_inspect_feature(self, feature: str, k: int = 8) -> dict:
        """A feature's top / bottom images, activation frequency and most tied labels."""
        f = _parse_feature_id(feature)
        rep = self.engine.inspect_feature(f, k=_small_k(k))
        return {
            "feature": rep.feature,
            "frequency": rep.frequency,
            "labels": [{"label": l, "score": s} for l, s in rep.labels],
            "top": self.results_json(rep.top),
            "bottom": self.results_json(rep.bottom),
        }

    def api_image_features(self, image_id: int, top: int = 10) -> dict:
        """An image's strongest SAE features with the label each is most tied to."""
        i = _parse_int(image_id, "image id")
        feats = self.engine.image_features(i, top=_small_k(top))
        return {"id": i, "features": [{"feature": f, "activation": a, "label": l} for f, a, l in feats]}

    def api_bias(self, query: str, mode: str = "direction", k: int = DEFAULT_K) -> dict:
        """Demographic make-up of a search's results against the corpus' base rates."""
        term = parse_query(self.engine, query)
        results = self.engine.search([term], k=k, mode=self._check_mode(mode))
        return bias_json(self.engine, results)

    # ---- UI handlers ----------------------------------------------------------------------
    def _label_op(self, op: str, label: str, mult, prev, values, expr: str = "", fid=None, fw=None):
        from saefe.search.mix import FeatureMix, evaluate_expression

        self.engine.require_sae()
        mix = self.state.read(prev, values)
        custom = self.state.custom_ids(values)
        if op == "reset":
            mix = FeatureMix(d_hidden=self.state.d_hidden)
            custom = [None] * self.state.n_custom
            msg = "all sliders reset to 0"
        elif op == "l2":
            mix = mix.l2_normalised()
            msg = "slider vector L2-normalised"
        elif op == "feature":
            f = _parse_feature_id(fid, self.state.d_hidden)
            mix.set(f, _parse_float(fw, f"weight of f{f}"))
            msg = f"f{f} set to {mix.get(f):+.3f}"
        else:
            profiles = self.engine.require_profiles()
            ids = self.state.touched(values)
            if op == "expr":
                if not (expr or "").strip():
                    raise SteeringError("empty expression: try 'Esteem - Male + Adult'")
                mix = evaluate_expression(expr, profiles, features=ids)
                msg = f"expression {expr.strip()!r} applied"
            else:
                if not label:
                    raise SteeringError("choose a label first")
                if op == "apply":
                    mix.apply_label(profiles, label, features=ids)
                    msg = f"{label}'s mean activations applied to all sliders"
                else:
                    m = _parse_float(mult, "multiplier")
                    (mix.add_label if op == "add" else mix.subtract_label)(profiles, label, m, features=ids)
                    msg = f"{'added' if op == 'add' else 'subtracted'} {m:g} × {label}"
        out = self.state.write(mix, custom)
        return [mix.to_dict(), *out, _ok(f"{msg} — {mix_summary(mix)}")]

    def _search_mix(self, prev, values, mode, k):
        mix = self.state.read(prev, values)
        results, vec = self.run_mix(mix, mode, k)
        return self._show(results, vec, f"{len(results)} results ({self._check_mode(mode)} mode) — {mix_summary(mix)}",
                          mix.to_dict())

    def _search_text(self, text, k):
        vec = self.engine.embed_text(text)
        results = self.engine.search_vector(vec, k)
        return self._show(results, vec, f"{len(results)} results for text {text.strip()!r}")

    def _search_image(self, image, k):
        if not image:
            raise SaefeError("upload an image first")
        vec = self.engine.embed_image(_read_bytes(image))
        results = self.engine.search_vector(vec, k)
        return self._show(results, vec, f"{len(results)} results for the uploaded image")

    def _show(self, results, vec, msg, mix_dict=None):

        rows = self.results_json(results)
        gallery = [(_image_ref(self.engine, r), caption(j)) for r, j in zip(results, rows) if _image_ref(self.engine, r)]
        try:
            bias = bias_markdown(bias_json(self.engine, results))
        except SaefeError as e:
            bias = f"_bias: {e}_"
        return [gallery, rows, np.asarray(vec, np.float32).tolist(), bias, _ok(msg),
                gr.skip() if mix_dict is None else mix_dict]

    def _select(self, rows, evt):
        if not rows or evt is None or evt.index is None:
            raise SaefeError("select a result first")
        idx = evt.index if isinstance(evt.index, int) else evt.index[0]
        r = rows[int(idx)]
        feats = self.api_image_features(r["id"], 10)["features"] if self.engine.backend is None else []
        table = [[f"f{x['feature']}", round(x["activation"], 4), x["label"] or ""] for x in feats]
        md = f"**Result #{r['rank']}** · id {r['id']} · score {r['score']:.4f} · " + (
            f"{r.get('width')}×{r.get('height')}" if r.get("width") else "size ?")
        return [r, md, table, None]

    def _saliency(self, sel, vec, n, sigma, progress):
        from saefe.analysis.saliency import overlay, smoothgrad

        if not sel:
            raise SaefeError("select a result first")
        if not vec:
            raise SaefeError("run a search first: the heat map is for the current query")
        path = sel.get("image_path")
        if not path or not os.path.exists(path):
            raise SaefeError("the selected image is not on this machine, so it has no heat map")
        from PIL import Image

        with Image.open(path) as im:
            image = im.convert("RGB")
        progress((0, int(n)), desc="SmoothGrad")

        def step(done, total):
            progress((done, total), desc="SmoothGrad")

        heat = smoothgrad(self.engine.encoder, image, np.asarray(vec, np.float32), n=int(n), sigma=float(sigma),
                          progress=step)
        big = image.resize((max(256, image.width), max(256, image.height)))
        return [overlay(big, heat), _ok(f"heat map of result id {sel['id']} ({int(n)} noisy copies, σ {float(sigma):g})")]

    def _inspect(self, feature):
        rep = self.api_inspect_feature(feature, 8)
        freq = "unknown" if rep["frequency"] is None else f"{rep['frequency']:.2%} of images"
        labs = ", ".join(f"{x['label']} ({x['score']:+.3f})" for x in rep["labels"]) or "none (fires for no label)"
        md = (f"### Feature f{rep['feature']}\n**activation frequency:** {freq}  \n"
              f"**most tied labels:** {labs}")
        top = [(x["image_path"], f"{x['score']:+.3f}") for x in rep["top"] if x.get("image_path")]
        bottom = [(x["image_path"], f"{x['score']:+.3f}") for x in rep["bottom"] if x.get("image_path")]
        return [md, top, bottom, _ok(f"inspected f{rep['feature']}")]

    # ---- layout ---------------------------------------------------------------------------
    def build(self):

        e = self.engine
        labels = e.labels
        ui = _ui_safe
        with gr.Blocks(title="SAEFE — steer image search with SAE features") as demo:
            gr.Markdown(
                f"# SAEFE configuration tool\n"
                f"Index `{e.store.dir}` · {e.n_total} images · encoder `{e.info.model_id}`"
                + (f" · SAE {self.state.d_hidden} features" if self.state.d_hidden else " · no SAE")
                + (f" · {len(labels)} labels" if labels else "")
                + (" · remote backend" if e.backend is not None else "")
            )
            status = gr.Markdown("", elem_id="saefe-status")
            mix_state = gr.State({})
            rows_state = gr.State([])
            vec_state = gr.State([])
            sel_state = gr.State(None)
            with gr.Row():
                with gr.Column(scale=2, min_width=420):
                    with gr.Accordion("1 · Set emotion", open=True):
                        with gr.Row(equal_height=True):
                            label_dd = gr.Dropdown(labels, value=labels[0] if labels else None, label="Label",
                                                   elem_id="label-dd", allow_custom_value=False, scale=2)
                            apply_btn = gr.Button("Apply to all sliders", variant="primary", elem_id="apply-btn",
                                                  scale=2)
                        with gr.Row():
                            reset_btn = gr.Button("Reset", elem_id="reset-btn", size="sm")
                            l2_btn = gr.Button("L2 Norm", elem_id="l2-btn", size="sm")
                    with gr.Accordion("3 · Label arithmetic", open=True):
                        with gr.Row(equal_height=True):
                            op_dd = gr.Dropdown(labels, value=labels[0] if labels else None, label="Label",
                                                elem_id="op-label", scale=3)
                            mult = gr.Number(1.0, label="Multiplier", elem_id="op-mult", scale=2, min_width=80)
                            add_btn = gr.Button("Add", elem_id="add-btn", scale=1, min_width=60)
                            sub_btn = gr.Button("Subtract", elem_id="sub-btn", scale=1, min_width=60)
                        with gr.Row(equal_height=True):
                            expr = gr.Textbox(label="Expression", placeholder="Esteem - Male + Adult",
                                              elem_id="expr-box", scale=4)
                            expr_btn = gr.Button("Evaluate", elem_id="expr-btn", scale=1, min_width=60)
                        with gr.Row(equal_height=True):
                            fid_box = gr.Textbox(label="Feature id", placeholder="f123 or 123", elem_id="fid-box",
                                                 scale=2, min_width=80)
                            fw_box = gr.Number(0.5, label="Weight", elem_id="fw-box", scale=2, min_width=80)
                            fset_btn = gr.Button("Set feature", elem_id="fset-btn", scale=1, min_width=60)
                    gr.Markdown("### 2 · Feature sliders\nRange [-1, 1]; a negative value pushes away from a feature.")
                    sliders: list = []
                    with gr.Accordion("Custom", open=False, elem_id="group-custom"):
                        cids, cws = [], []
                        for i in range(self.state.n_custom):
                            with gr.Row():
                                cids.append(gr.Textbox(None, label=f"custom id {i + 1}", placeholder="f123",
                                                       scale=1, min_width=90, elem_id=f"cid-{i}"))
                                cws.append(gr.Slider(-1, 1, 0, step=SLIDER_STEP, label=f"weight {i + 1}",
                                                     scale=3, elem_id=f"cw-{i}"))
                    for gi, (title, fids) in enumerate(self.layout.groups):
                        name = title if title == "Shared" else f"{title} · top {len(fids)} distinct"
                        with gr.Accordion(name, open=False, elem_id=f"group-{gi}", elem_classes="saefe-slider-group"):
                            for f in fids:
                                sliders.append(gr.Slider(-1, 1, 0, step=SLIDER_STEP, label=self.layout.captions[f],
                                                         elem_id=f"s-{len(sliders)}"))
                with gr.Column(scale=3, min_width=520):
                    with gr.Row(equal_height=True):
                        mode = gr.Radio(["direction", "features"], value="direction", label="Search mode",
                                        info="direction: cosine to the mix's decoder direction; features: exact Σ w·a",
                                        elem_id="mode")
                        k = gr.Slider(1, MAX_K, DEFAULT_K, step=1, label="Results", elem_id="k")
                    run_btn = gr.Button("Run Search", variant="primary", elem_id="run-btn")
                    with gr.Accordion("Search by text or image", open=False, elem_id="other-search"):
                        with gr.Row(equal_height=True):
                            text_q = gr.Textbox(label="Search by text", placeholder="a photo of a happy child",
                                                scale=3, elem_id="text-q")
                            text_btn = gr.Button("Text search", scale=1, elem_id="text-btn")
                        with gr.Row(equal_height=True):
                            img_q = gr.Image(type="filepath", label="Search by image", height=140, scale=3,
                                             elem_id="img-q")
                            img_btn = gr.Button("Image search", scale=1, elem_id="img-btn")
                    gallery = gr.Gallery(label="Results", columns=5, height=520, object_fit="contain",
                                         allow_preview=False, elem_id="gallery")
                    bias_md = gr.Markdown("_bias: run a search_", elem_id="bias")
                    with gr.Accordion("5 · Selected result", open=True):
                        sel_md = gr.Markdown("_click a result_")
                        with gr.Row():
                            sal_img = gr.Image(label="Saliency (SmoothGrad) for the current query", height=260,
                                               interactive=False, elem_id="saliency")
                            feats_df = gr.Dataframe(headers=["feature", "activation", "label"],
                                                    label="Top active features (click to inspect)",
                                                    interactive=False, elem_id="img-feats")
                        with gr.Row():
                            sal_n = gr.Slider(2, 64, 16, step=1, label="noisy copies")
                            sal_sigma = gr.Slider(0.0, 0.5, 0.15, step=0.01, label="noise σ")
                            sal_btn = gr.Button("Heat map", elem_id="sal-btn")
                    with gr.Accordion("6 · Feature inspector", open=True):
                        with gr.Row():
                            insp_id = gr.Textbox(label="Feature id", placeholder="f83", elem_id="insp-id", scale=3)
                            insp_btn = gr.Button("Inspect", elem_id="insp-btn", scale=1)
                        insp_md = gr.Markdown(elem_id="insp-md")
                        with gr.Row():
                            insp_top = gr.Gallery(label="Top images", columns=4, height=200, allow_preview=False)
                            insp_bot = gr.Gallery(label="Bottom images", columns=4, height=200, allow_preview=False)

            slider_io = [*sliders, *cids, *cws]
            n_out = 1 + len(slider_io) + 1  # state, sliders..., status

            def op(name):
                def fn(prev, label, m, ex, fi, fw, *values):
                    return self._label_op(name, label, m, prev, list(values), ex, fi, fw)
                return ui(fn, n_out)

            op_inputs = [mix_state, label_dd, mult, expr, fid_box, fw_box, *slider_io]
            op_outputs = [mix_state, *slider_io, status]
            apply_btn.click(op("apply"), op_inputs, op_outputs, api_visibility="private")
            reset_btn.click(op("reset"), op_inputs, op_outputs, api_visibility="private")
            l2_btn.click(op("l2"), op_inputs, op_outputs, api_visibility="private")
            op_inputs2 = [mix_state, op_dd, mult, expr, fid_box, fw_box, *slider_io]
            add_btn.click(op("add"), op_inputs2, op_outputs, api_visibility="private")
            sub_btn.click(op("sub"), op_inputs2, op_outputs, api_visibility="private")
            expr_btn.click(op("expr"), op_inputs2, op_outputs, api_visibility="private")
            expr.submit(op("expr"), op_inputs2, op_outputs, api_visibility="private")
            fset_btn.click(op("feature"), op_inputs2, op_outputs, api_visibility="private")

            # Keep duplicated sliders of one feature equal, in the browser (no server round trip).
            for f, idx in self.layout.mirrors().items():
                for i in idx:
                    others = [sliders[j] for j in idx if j != i]
                    js = "(v) => v" if len(others) == 1 else f"(v) => Array({len(others)}).fill(v)"
                    sliders[i].input(None, [sliders[i]], others, js=js,
                                     api_visibility="private", queue=False)

            search_out = [gallery, rows_state, vec_state, bias_md, status, mix_state]
            run_btn.click(ui(lambda prev, md, kk, *v: self._search_mix(prev, list(v), md, kk), len(search_out), 4),
                          [mix_state, mode, k, *slider_io], search_out, api_visibility="private")
            text_btn.click(ui(self._search_text, len(search_out), 4), [text_q, k], search_out, api_visibility="private")
            text_q.submit(ui(self._search_text, len(search_out), 4), [text_q, k], search_out, api_visibility="private")
            img_btn.click(ui(self._search_image, len(search_out), 4), [img_q, k], search_out, api_visibility="private")

            def on_select(rows, evt: gr.SelectData):
                return self._select(rows, evt)

            sel_out = [sel_state, sel_md, feats_df, sal_img]
            gallery.select(ui(on_select, len(sel_out)), [rows_state], sel_out, api_visibility="private").then(
                ui(lambda s, v, n, sg, progress=gr.Progress(): self._saliency(s, v, n, sg, progress), 2, 1),
                [sel_state, vec_state, sal_n, sal_sigma], [sal_img, status], api_visibility="private")
            sal_btn.click(ui(lambda s, v, n, sg, progress=gr.Progress(): self._saliency(s, v, n, sg, progress), 2, 1),
                          [sel_state, vec_state, sal_n, sal_sigma], [sal_img, status], api_visibility="private")

            insp_out = [insp_md, insp_top, insp_bot, status]
            insp_btn.click(ui(self._inspect, len(insp_out), 3), [insp_id], insp_out, api_visibility="private")
            insp_id.submit(ui(self._inspect, len(insp_out), 3), [insp_id], insp_out, api_visibility="private")

            def on_feat_click(table, evt: gr.SelectData):
                try:
                    row = evt.index[0] if isinstance(evt.index, (list, tuple)) else int(evt.index)
                    fid = str(table.iloc[row, 0]) if hasattr(table, "iloc") else str(table[row][0])
                except Exception:
                    raise SaefeError("click a feature row") from None
                return [fid, *self._inspect(fid)]

            feats_df.select(ui(on_feat_click, 1 + len(insp_out), 4), [feats_df], [insp_id, *insp_out],
                            api_visibility="private")

            # ---- named API endpoints -------------------------------------------------------
            gr.api(_api_safe(self.api_search), api_name="search", concurrency_limit=8)
            gr.api(_api_safe(self.api_search_text), api_name="search_text", concurrency_limit=4)
            gr.api(_api_safe(self.api_search_image), api_name="search_image", concurrency_limit=4)
            gr.api(_api_safe(self.api_inspect_feature), api_name="inspect_feature", concurrency_limit=8)
            gr.api(_api_safe(self.api_image_features), api_name="image_features", concurrency_limit=8)
            gr.api(_api_safe(self.api_bias), api_name="bias", concurrency_limit=8)
            gr.api(_api_safe(self.api_labels), api_name="labels", concurrency_limit=8)
        self.blocks = demo
        return demo


# -- error handling -----------------------------------------------------------------------


def _ok(msg: str) -> str:
    return f"<span class='saefe-ok'>{msg}</span>"


def _err(msg: str) -> str:
    return f"<span class='saefe-err'>Error: {msg}</span>"


def _message(e: BaseException) -> str:
    if isinstance(e, SaefeError):
        return str(e)
    log.exception("unexpected error in the app")
    return f"internal error ({type(e).__name__}): {e}".splitlines()[0][:300]


def _ui_safe(fn: Callable, n_out: int, status_index: int | None = None) -> Callable:
    """Wrap a UI handler: a failure becomes a warning toast + an error line in ``status``
    (output ``status_index``, default the last), the other outputs stay as they were."""

    si = n_out - 1 if status_index is None else status_index

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the page must show a line, not a trace
            msg = _message(e)
            gr.Warning(msg, duration=5)
            out = [gr.skip()] * n_out
            out[si] = _err(msg)
            return out if n_out > 1 else out[0]

    return wrapper


def _api_safe(fn: Callable) -> Callable:
    """Wrap an API endpoint: failures reach the client as ``gr.Error`` with a one-line message."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as e:  # noqa: BLE001
            raise gr.Error(_message(e), print_exception=False) from None

    return wrapper


# -- small parsers ------------------------------------------------------------------------


def _read_bytes(image) -> bytes:
    if isinstance(image, dict):  # gradio FileData
        image = image.get("path")
    try:
        with open(str(image), "rb") as f:
            return f.read()
    except OSError as e:
        raise SaefeError(f"cannot read the query image: {e.strerror}") from None


def _parse_feature_id(value, d_hidden: int | None = None) -> int:
    if isinstance(value, str):
        v = value.strip().lstrip("#fF")
        if not v:
            raise SteeringError("enter a feature id, e.g. f83 or 83")
        try:
            value = int(v)
        except ValueError:
            raise SteeringError(f"feature id must be an integer like f83, got {value.strip()!r}") from None
    f = _as_feature_id(value, d_hidden)
    if f is None:
        raise SteeringError("enter a feature id, e.g. f83 or 83")
    return f


def _parse_float(value, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SteeringError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise SteeringError(f"{what} must be finite, got {v}")
    return v


def _parse_int(value, what: str) -> int:
    try:
        v = float(value)
        if not v.is_integer():
            raise ValueError
        return int(v)
    except (TypeError, ValueError, OverflowError):
        raise SaefeError(f"{what} must be an integer, got {value!r}") from None


def _small_k(k) -> int:
    k = _parse_int(k, "number of results")
    if not 1 <= k <= 100:
        raise SaefeError(f"number of results must be within [1, 100], got {k}")
    return k


# -- launching ----------------------------------------------------------------------------


def create_app(engine: Engine, top_n: int = TOP_N) -> tuple["SaefeApp", Any]:
    app = SaefeApp(engine, top_n=top_n)
    app.warm()
    return app, app.build()


def allowed_paths(engine: Engine) -> list[str]:
    base = engine.store._image_base() if hasattr(engine.store, "_image_base") else None
    return [p for p in {base, str(engine.store.dir.resolve())} if p]


def launch(engine: Engine, host: str = "127.0.0.1", port: int | None = 7860, *, prevent_thread_lock: bool = False,
           quiet: bool = False, max_threads: int = 40):
    """Serve the app; returns the Blocks (launched) and its SaefeApp."""
    app, demo = create_app(engine)
    # api_open: plain `POST /gradio_api/run/<name>` {"data": [...]} works too, besides the queue
    demo.queue(default_concurrency_limit=4, max_size=256, api_open=True)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=prevent_thread_lock, quiet=quiet,
                allowed_paths=allowed_paths(engine), show_error=True, ssr_mode=False, max_threads=max_threads,
                css=CSS, footer_links=["api"])
    return demo, app
