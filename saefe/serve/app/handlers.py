"""The app's handlers: one object holding the engine, with the named API endpoints and the UI
callbacks. Layout lives in page.py; these methods raise SaefeError and the page turns that into
a toast, an error line or a ``gr.Error``.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Sequence

import gradio as gr
import numpy as np

from saefe.analysis.saliency import overlay, smoothgrad
from saefe.errors import SaefeError, SteeringError
from saefe.search.bias import DEMOGRAPHICS
from saefe.search.engine import MODES, Engine, SearchResult, Term
from saefe.search.mix import FeatureMix, evaluate_expression
from saefe.serve.app.guard import ok as _ok
from saefe.serve.app.guard import parse_feature_id as _parse_feature_id
from saefe.serve.app.guard import parse_float as _parse_float
from saefe.serve.app.guard import parse_int as _parse_int
from saefe.serve.app.guard import read_bytes as _read_bytes
from saefe.serve.app.guard import small_k as _small_k
from saefe.serve.app.state import N_CUSTOM, TOP_N, MixState, SliderLayout
from saefe.serve.app.views import image_ref as _image_ref, bias_json, bias_markdown, caption, mix_summary, parse_query, result_json

log = logging.getLogger("saefe.serve.app")

DEFAULT_K = 20


class SaefeApp:
    """Holds the engine and the handlers; :meth:`build` makes the Blocks."""

    def __init__(self, engine: Engine, top_n: int = TOP_N, n_custom: int = N_CUSTOM):
        self.engine = engine
        self.layout = SliderLayout.from_profiles(engine.profiles if engine.sae is not None else None, top_n)
        self.state = MixState(engine, self.layout, n_custom)
        self._lock = threading.Lock()  # first-use initialisation of engine caches
        self.blocks = None

    def default_label(self) -> str | None:
        """The label menus open on an emotion, not on a demographic label (Kid, Male...)."""
        labels = self.engine.labels or []
        demographic = {g for groups in DEMOGRAPHICS.values() for g in groups}
        return next((lab for lab in labels if lab not in demographic), labels[0] if labels else None)

    # ---- engine calls (raise SaefeError) -------------------------------------------------
    def warm(self) -> None:
        """Load what the first search would (codes for feature mode), so requests stay fast."""
        with self._lock:
            if self.engine.sae is not None and self.engine.backend is None:
                try:
                    _ = self.engine.ranker
                except SaefeError as e:
                    log.warning("feature-space mode unavailable: %s", e)
            try:  # per-image groups for the bias panel (estimated now when the index has no labels)
                _ = self.engine.demographics
            except SaefeError as e:
                log.warning("no demographic groups: %s", e)

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

    # ---- UI handlers (raise SaefeError; the page wraps them with guard.ui_safe) ----------------------------------------------------------------------
    def _label_op(self, op: str, label: str, mult, prev, values, expr: str = "", fid=None, fw=None):
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

    def _search_mix(self, prev, values, mode, k, debias=(None, None, None)):
        """``debias``: the Debias control's (method, protected attributes, target)."""
        from saefe.serve.app import fairness

        mix = self.state.read(prev, values)
        cfg = fairness.config(*debias)
        if cfg is None:
            results, vec = self.run_mix(mix, mode, k)
            return self._show(results, vec, f"{len(results)} results ({self._check_mode(mode)} mode) — "
                              f"{mix_summary(mix)}", mix.to_dict())
        if mix.is_zero():
            raise SteeringError("all sliders are zero: set an emotion, move a slider or enter an expression")
        mode = self._check_mode(mode)
        results, md, note = fairness.search(self, [Term("features", mix.to_dict())], mode, k, cfg)
        return self._show(results, self.engine.direction(mix),
                          f"{len(results)} results ({mode} mode){note} — {mix_summary(mix)}", mix.to_dict(), md)

    def _search_text(self, text, k, debias=(None, None, None)):
        return self._search_term(Term("text", text), self.engine.embed_text(text), k, debias,
                                 f"text {str(text).strip()!r}")

    def _search_image(self, image, k, debias=(None, None, None)):
        if not image:
            raise SaefeError("upload an image first")
        data = _read_bytes(image)
        return self._search_term(Term("image", data), self.engine.embed_image(data), k, debias, "the uploaded image")

    def _search_term(self, term, vec, k, debias, what):
        from saefe.serve.app import fairness

        cfg = fairness.config(*debias)
        if cfg is None:
            results = self.engine.search_vector(vec, k)
            return self._show(results, vec, f"{len(results)} results for {what}")
        results, md, note = fairness.search(self, [term], "direction", k, cfg)
        return self._show(results, vec, f"{len(results)} results for {what}{note}", None, md)

    def _show(self, results, vec, msg, mix_dict=None, bias=None):
        rows = self.results_json(results)
        gallery = [(_image_ref(self.engine, r), caption(j)) for r, j in zip(results, rows) if _image_ref(self.engine, r)]
        if bias is None:
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


    def build(self):
        """The Blocks page (saefe.serve.app.page) wired to these handlers."""
        from saefe.serve.app.page import build_page

        self.blocks = build_page(self)
        return self.blocks

