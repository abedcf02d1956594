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
from saefe.search.dedup import dedup_option
from saefe.search.engine import MODES, Engine, SearchResult, Term
from saefe.search.live import LiveEngine
from saefe.search.mix import FeatureMix, evaluate_expression
from saefe.serve.app.guard import ok as _ok
from saefe.serve.app.guard import parse_feature_id as _parse_feature_id
from saefe.serve.app.guard import parse_float as _parse_float
from saefe.serve.app.guard import parse_int as _parse_int
from saefe.serve.app.guard import read_bytes as _read_bytes
from saefe.serve.app.guard import small_k as _small_k
from saefe.serve.app.state import N_CUSTOM, TOP_N, MixState, SliderLayout
from saefe.serve.app.views import bias_json, bias_markdown, caption, mix_summary, parse_query, result_json

log = logging.getLogger("saefe.serve.app")

DEFAULT_K = 20
DEDUP = None  # API default for dedup_threshold: the index's own near-duplicate cosine; 0 turns it off


class SaefeApp:
    """Holds the engine and the handlers; :meth:`build` makes the Blocks. The engine follows its
    index (saefe.search.live): a build that updates the index is served without a restart."""

    def __init__(self, engine: Engine | LiveEngine, top_n: int = TOP_N, n_custom: int = N_CUSTOM):
        self.live = engine if isinstance(engine, LiveEngine) else LiveEngine.follow(engine)
        engine = self.live.engine
        self.layout = SliderLayout.from_profiles(engine.profiles if engine.sae is not None else None, top_n)
        self.state = MixState(engine, self.layout, n_custom)
        self._lock = threading.Lock()  # first-use initialisation of engine caches
        self.blocks = None

    @property
    def engine(self) -> Engine:
        """The current engine (one generation of the index); take it once per request."""
        return self.live.engine

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

    def results_json(self, results: Sequence[SearchResult], start: int = 1, engine=None) -> list[dict[str, Any]]:
        engine = engine or self.engine
        return [result_json(engine, r, i) for i, r in enumerate(results, start)]

    def page(self, spec: dict[str, Any], engine=None):
        """Run a page spec (what "more" needs to fetch the next page of the same search)."""
        from saefe.search.query import rank_features_page, search_vector_page

        engine = engine or self.engine
        where, dedup = spec.get("where") or None, spec.get("dedup")
        if spec["how"] == "features":
            return rank_features_page(engine, np.asarray(spec["ids"], np.int64), np.asarray(spec["ws"], np.float64),
                                      spec["k"], spec["offset"], where, dedup)
        return search_vector_page(engine, np.asarray(spec["vec"], np.float32), spec["k"], spec["offset"], where, dedup)

    def _page_json(self, engine, page, **extra) -> dict:
        return {**extra, "offset": page.offset, "has_more": page.has_more, "matching": page.matching,
                "dedup_threshold": page.dedup_threshold, "results": self.results_json(page.results, page.offset + 1, engine)}

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
        """Search by a label, an expression ('Esteem - Male + Adult') or features JSON ({"12": 0.5});
        near-duplicates collapsed (see /search_page for paging, filters and the threshold)."""
        return self.api_search_page(query, mode, k)

    def api_search_page(self, query: str, mode: str = "direction", k: int = DEFAULT_K, offset: int = 0,
                        where: str = "", dedup_threshold: float | None = DEDUP) -> dict:
        """/search with paging and filters. offset: results to skip; where: metadata conditions
        ('subreddit=pics; width>=512; path=memes/*'); dedup_threshold: collapse near-duplicates at
        this cosine (0: off). The reply says whether more results follow (has_more)."""
        e = self.engine
        term = parse_query(e, query)
        mode = self._check_mode(mode)
        page = e.search_page([term], k=k, mode=mode, offset=_parse_int(offset or 0, "offset"), where=where or None,
                             dedup=dedup_option(dedup_threshold))
        return self._page_json(e, page, query=query, kind=term.kind, mode=mode)

    def api_search_text(self, text: str, k: int = DEFAULT_K) -> dict:
        """Search by a text description (SigLIP text embedding); near-duplicates collapsed."""
        return self.api_search_text_page(text, k)

    def api_search_text_page(self, text: str, k: int = DEFAULT_K, offset: int = 0, where: str = "",
                             dedup_threshold: float | None = DEDUP) -> dict:
        """/search_text with paging and filters (as /search_page)."""
        e = self.engine
        page = e.search_page([Term("text", text)], k=k, offset=_parse_int(offset or 0, "offset"), where=where or None,
                             dedup=dedup_option(dedup_threshold))
        return self._page_json(e, page, query=text, kind="text", mode="direction")

    def api_search_image(self, image: str, k: int = DEFAULT_K) -> dict:
        """Search by an image file (upload it with gradio_client.handle_file); duplicates collapsed."""
        if not image:
            raise SaefeError("no image given")
        e = self.engine
        page = e.search_page([Term("image", _read_bytes(image))], k=k)
        return self._page_json(e, page, query=os.path.basename(str(image)), kind="image", mode="direction")

    def api_reload(self, force: bool = False) -> dict:
        """Reopen the index now if a build changed it (force: always); it is also noticed by itself."""
        return self.live.reload(force=bool(force))

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

    def _spec(self, how: str, k, where: str, dedup_on: bool, threshold, **query) -> dict:
        from saefe.search.filters import Filter

        Filter.parse(where or None)  # a malformed condition fails here, with its message
        thr = (float(threshold) if threshold else "auto") if dedup_on else None
        return {"how": how, "k": int(k), "offset": 0, "where": (where or "").strip(), "dedup": thr, **query}

    def _debias_cfg(self, debias, where):
        from saefe.serve.app import fairness

        cfg = fairness.config(*(debias or (None, None, None)))
        if cfg is not None and (where or "").strip():
            raise SaefeError("the filter does not combine with Debias yet: clear one of them")
        return cfg

    def _search_mix(self, prev, values, mode, k, debias=(None, None, None), where="", dedup_on=True, threshold=None):
        """``debias``: the Debias control's (method, protected attributes, target); ``where``,
        ``dedup_on``, ``threshold``: the filter box and the near-duplicate collapse."""
        from saefe.serve.app import fairness

        mix = self.state.read(prev, values)
        mode = self._check_mode(mode)
        if mix.is_zero():
            raise SteeringError("all sliders are zero: set an emotion, move a slider or enter an expression")
        e = self.engine
        cfg = self._debias_cfg(debias, where)
        vec = e.direction(mix)
        if cfg is not None:  # fair re-ranking reorders a whole list: no paging or collapse on top
            results, md, note = fairness.search(e, [Term("features", mix.to_dict())], mode, k, cfg)
            return self._show_results(e, results, vec, f"({mode} mode){note} — {mix_summary(mix)}", mix.to_dict(), md)
        if mode == "direction":
            spec = self._spec("vector", k, where, dedup_on, threshold, vec=vec.tolist())
        else:
            ids, ws = mix.as_arrays()
            spec = self._spec("features", k, where, dedup_on, threshold, ids=ids.tolist(), ws=ws.tolist())
        return self._show(e, spec, vec, f"({mode} mode) — {mix_summary(mix)}", mix.to_dict())

    def _search_text(self, text, k, debias=(None, None, None), where="", dedup_on=True, threshold=None):
        e = self.engine
        return self._search_term(e, e.embed_text(text), k, debias, where, dedup_on, threshold,
                                 f"for text {str(text).strip()!r}")

    def _search_image(self, image, k, debias=(None, None, None), where="", dedup_on=True, threshold=None):
        if not image:
            raise SaefeError("upload an image first")
        e = self.engine
        data = _read_bytes(image)
        return self._search_term(e, e.embed_image(data), k, debias, where, dedup_on, threshold,
                                 "for the uploaded image")

    def _search_term(self, e, vec, k, debias, where, dedup_on, threshold, what):
        """A text or image query already embedded (``vec``) by ``e``: the encoder runs once."""
        from saefe.serve.app import fairness

        cfg = self._debias_cfg(debias, where)
        if cfg is not None:
            results, md, note = fairness.search(e, [Term("embedding", vec)], "direction", k, cfg)
            return self._show_results(e, results, vec, f"{what}{note}", None, md)
        return self._show(e, self._spec("vector", k, where, dedup_on, threshold, vec=np.asarray(vec).tolist()), vec, what)

    def _show(self, e, spec, vec, msg, mix_dict=None, rows=None):
        """A page of ``spec`` appended to ``rows`` (the More button), and the new page state."""
        page = self.page(spec, e)
        new = self.results_json(page.results, spec["offset"] + 1, e)
        rows = list(rows or []) + new
        spec = {**spec, "msg": msg, "has_more": page.has_more, "next_offset": page.next_offset}
        extra = (f"; filter {page.filter}: {page.matching} of {e.n_total} images match" if page.matching is not None else "")
        extra += "; near-duplicates collapsed" if page.dedup_threshold else ""
        extra += " — press More for the next page" if page.has_more else ""
        return self._view(e, rows, vec, f"{len(rows)} results {msg}{extra}", mix_dict, None, spec)

    def _show_results(self, e, results, vec, msg, mix_dict=None, bias=None):
        """A finished list (debiased): shown whole, no next page."""
        rows = self.results_json(results, 1, e)
        return self._view(e, rows, vec, f"{len(rows)} results {msg}", mix_dict, bias, {"has_more": False})

    def _view(self, e, rows, vec, msg, mix_dict, bias, spec):
        gallery = [(j["image_path"] if j.get("image_path") else j.get("url"), caption(j)) for j in rows
                   if j.get("image_path") or j.get("url")]
        if bias is None:
            try:
                bias = bias_markdown(bias_json(e, [SearchResult(int(j["id"]), float(j["score"]),
                                                                {"sha256": j.get("sha256"), "path": j.get("file")})
                                                   for j in rows]))
            except SaefeError as err:
                bias = f"_bias: {err}_"
        return [gallery, rows, np.asarray(vec, np.float32).tolist(), bias, _ok(msg),
                gr.skip() if mix_dict is None else mix_dict, spec]

    def _more(self, spec, rows, vec):
        if not spec or not rows:
            raise SaefeError("run a search first")
        if not spec.get("has_more") or "how" not in spec:
            raise SaefeError("no more results for this search")
        nxt = {**spec, "offset": int(spec["next_offset"])}
        return self._show(self.engine, nxt, vec, spec.get("msg", ""), None, rows)

    def _export(self, rows):
        """The results shown, as a CSV file to download (paths, scores, features)."""
        import tempfile

        from saefe.search.export import export_results

        if not rows:
            raise SaefeError("run a search first")
        skip = {"id", "score", "rank", "group_size", "group_ids"}
        results = [SearchResult(int(r["id"]), float(r["score"]), {k: v for k, v in r.items() if k not in skip},
                                r.get("group_ids")) for r in rows]
        path = os.path.join(tempfile.mkdtemp(prefix="saefe-export-"), "results.csv")
        export_results(self.engine, results, path, offset=int(rows[0].get("rank", 1)) - 1)
        return [gr.update(value=path, visible=True), _ok(f"exported {len(rows)} results")]

    def _reload(self):
        st = self.live.reload(force=True)
        if st["error"]:
            raise SaefeError(f"could not reopen the index ({st['error']}); still serving generation {st['generation']}")
        return _ok(f"index reopened: generation {st['generation']}, {st['n_total']} images")

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

