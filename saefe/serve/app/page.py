"""The Blocks page: layout of the seed's use cases, wired to :class:`SaefeApp`'s handlers.

Left column: set an emotion, label arithmetic, the feature sliders. Right column: search, the
results gallery, the bias panel, the selected result (saliency, top features) and the feature
inspector. Components are collected in a namespace so layout and wiring read as separate steps.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING

import gradio as gr

from saefe.errors import SaefeError
from saefe.search.dedup import default_threshold
from saefe.serve.app import fairness
from saefe.serve.app.guard import api_safe, ui_safe
from saefe.serve.app.state import SLIDER_STEP

if TYPE_CHECKING:
    from saefe.serve.app.handlers import SaefeApp

DEFAULT_K = 20
MAX_K = 200
READ_LIMIT = 32  # concurrent read-only events (searches, API reads); the model-heavy ones stay lower


def build_page(app: "SaefeApp") -> gr.Blocks:
    """Lay out the page, then wire every control to its handler and register the API."""
    with gr.Blocks(title="SAEFE — steer image search with SAE features") as page:
        gr.Markdown(_header(app))
        c = SimpleNamespace(status=gr.Markdown("", elem_id="saefe-status"), mix_state=gr.State({}),
                            rows_state=gr.State([]), vec_state=gr.State([]), sel_state=gr.State(None),
                            page_state=gr.State({}))
        with gr.Row():
            with gr.Column(scale=2, min_width=420):
                _mix_column(app, c)
            with gr.Column(scale=3, min_width=520):
                _results_column(app, c)
        _wire_mix(app, c)
        _wire_search(app, c)
        _wire_results(app, c)
        fairness.wire_audit(app, c)
        _register_api(app)
        fairness.register_api(app)
    return page


def _header(app: "SaefeApp") -> str:
    e, labels = app.engine, app.engine.labels
    return (f"# SAEFE configuration tool\n"
            f"Index `{e.store.dir}` · {e.n_total} images · encoder `{e.info.model_id}`"
            + (f" · SAE {app.state.d_hidden} features" if app.state.d_hidden else " · no SAE")
            + (f" · {len(labels)} labels" if labels else "")
            + (" · remote backend" if e.backend is not None else ""))


def _mix_column(app: "SaefeApp", c: SimpleNamespace) -> None:
    labels = app.engine.labels
    first = app.default_label()
    with gr.Accordion("1 · Set emotion", open=True):
        with gr.Row(equal_height=True):
            c.label_dd = gr.Dropdown(labels, value=first, label="Label", elem_id="label-dd",
                                     allow_custom_value=False, scale=2)
            c.apply_btn = gr.Button("Apply to all sliders", variant="primary", elem_id="apply-btn", scale=2)
        with gr.Row():
            c.reset_btn = gr.Button("Reset", elem_id="reset-btn", size="sm")
            c.l2_btn = gr.Button("L2 Norm", elem_id="l2-btn", size="sm")
    with gr.Accordion("3 · Label arithmetic", open=True):
        with gr.Row(equal_height=True):
            c.op_dd = gr.Dropdown(labels, value=first, label="Label", elem_id="op-label", scale=3)
            c.mult = gr.Number(1.0, label="Multiplier", elem_id="op-mult", scale=2, min_width=80)
            c.add_btn = gr.Button("Add", elem_id="add-btn", scale=1, min_width=60)
            c.sub_btn = gr.Button("Subtract", elem_id="sub-btn", scale=1, min_width=60)
        with gr.Row(equal_height=True):
            c.expr = gr.Textbox(label="Expression", placeholder="Esteem - Male + Adult", elem_id="expr-box", scale=4)
            c.expr_btn = gr.Button("Evaluate", elem_id="expr-btn", scale=1, min_width=60)
        with gr.Row(equal_height=True):
            c.fid_box = gr.Textbox(label="Feature id", placeholder="f123 or 123", elem_id="fid-box", scale=2,
                                   min_width=80)
            c.fw_box = gr.Number(0.5, label="Weight", elem_id="fw-box", scale=2, min_width=80)
            c.fset_btn = gr.Button("Set feature", elem_id="fset-btn", scale=1, min_width=60)
    gr.Markdown("### 2 · Feature sliders\nRange [-1, 1]; a negative value pushes away from a feature.")
    c.sliders, c.cids, c.cws = [], [], []
    with gr.Accordion("Custom", open=False, elem_id="group-custom"):
        for i in range(app.state.n_custom):
            with gr.Row():
                c.cids.append(gr.Textbox(None, label=f"custom id {i + 1}", placeholder="f123", scale=1,
                                         min_width=90, elem_id=f"cid-{i}"))
                c.cws.append(gr.Slider(-1, 1, 0, step=SLIDER_STEP, label=f"weight {i + 1}", scale=3,
                                       elem_id=f"cw-{i}"))
    for gi, (title, fids) in enumerate(app.layout.groups):
        name = title if title == "Shared" else f"{title} · top {len(fids)} distinct"
        with gr.Accordion(name, open=False, elem_id=f"group-{gi}", elem_classes="saefe-slider-group"):
            for f in fids:
                c.sliders.append(gr.Slider(-1, 1, 0, step=SLIDER_STEP, label=app.layout.captions[f],
                                           elem_id=f"s-{len(c.sliders)}"))
    c.slider_io = [*c.sliders, *c.cids, *c.cws]


def _results_column(app: "SaefeApp", c: SimpleNamespace) -> None:
    with gr.Row(equal_height=True):
        c.mode = gr.Radio(["direction", "features"], value="direction", label="Search mode",
                          info="direction: cosine to the mix's decoder direction; features: exact Σ w·a",
                          elem_id="mode")
        c.k = gr.Slider(1, MAX_K, DEFAULT_K, step=1, label="Results", elem_id="k")
    with gr.Row(equal_height=True):
        c.where = gr.Textbox(label="Filter", placeholder="subreddit=pics; width>=512; path=memes/*", scale=4,
                             elem_id="where", info="metadata conditions, all must hold (= != >= <= > <, globs, a|b)")
        c.dedup = gr.Checkbox(True, label="Collapse near-duplicates", scale=1, elem_id="dedup")
        c.dedup_thr = gr.Number(default_threshold(app.engine.store), label="at cosine", minimum=0.5, maximum=1.0,
                                step=0.0005, scale=1, min_width=80, elem_id="dedup-thr")
    c.run_btn = gr.Button("Run Search", variant="primary", elem_id="run-btn")
    with gr.Accordion("Search by text or image", open=False, elem_id="other-search"):
        with gr.Row(equal_height=True):
            c.text_q = gr.Textbox(label="Search by text", placeholder="a photo of a happy child", scale=3,
                                  elem_id="text-q")
            c.text_btn = gr.Button("Text search", scale=1, elem_id="text-btn")
        with gr.Row(equal_height=True):
            c.img_q = gr.Image(type="filepath", label="Search by image", height=140, scale=3, elem_id="img-q")
            c.img_btn = gr.Button("Image search", scale=1, elem_id="img-btn")
    c.gallery = gr.Gallery(label="Results", columns=5, height=520, object_fit="contain", allow_preview=False,
                           elem_id="gallery")
    with gr.Row(equal_height=True):
        c.more_btn = gr.Button("More", elem_id="more-btn", scale=2)
        c.export_btn = gr.Button("Export CSV", elem_id="export-btn", scale=1)
        c.reload_btn = gr.Button("Reload index", elem_id="reload-btn", scale=1)
    c.export_file = gr.File(label="Exported results", visible=False, elem_id="export-file")
    c.bias_md = gr.Markdown("_bias: run a search_", elem_id="bias")
    fairness.build_debias_controls(app, c)
    with gr.Accordion("5 · Selected result", open=True):
        c.sel_md = gr.Markdown("_click a result_")
        with gr.Row():
            c.sal_img = gr.Image(label="Saliency (SmoothGrad) for the current query", height=260,
                                 interactive=False, elem_id="saliency")
            c.feats_df = gr.Dataframe(headers=["feature", "activation", "label"],
                                      label="Top active features (click to inspect)", interactive=False,
                                      elem_id="img-feats")
        with gr.Row():
            c.sal_n = gr.Slider(2, 64, 16, step=1, label="noisy copies")
            c.sal_sigma = gr.Slider(0.0, 0.5, 0.15, step=0.01, label="noise σ")
            c.sal_btn = gr.Button("Heat map", elem_id="sal-btn")
    with gr.Accordion("6 · Feature inspector", open=True):
        with gr.Row():
            c.insp_id = gr.Textbox(label="Feature id", placeholder="f83", elem_id="insp-id", scale=3)
            c.insp_btn = gr.Button("Inspect", elem_id="insp-btn", scale=1)
        c.insp_md = gr.Markdown(elem_id="insp-md")
        with gr.Row():
            c.insp_top = gr.Gallery(label="Top images", columns=4, height=200, allow_preview=False)
            c.insp_bot = gr.Gallery(label="Bottom images", columns=4, height=200, allow_preview=False)
    fairness.build_audit_panel(app, c)


def _wire_mix(app: "SaefeApp", c: SimpleNamespace) -> None:
    """Label operations rewrite the mix state and every slider; duplicated sliders stay in sync."""
    n_out = 1 + len(c.slider_io) + 1  # state, sliders..., status

    def op(name):
        def fn(prev, label, m, ex, fi, fw, *values):
            return app._label_op(name, label, m, prev, list(values), ex, fi, fw)
        return ui_safe(fn, n_out)

    outputs = [c.mix_state, *c.slider_io, c.status]
    set_inputs = [c.mix_state, c.label_dd, c.mult, c.expr, c.fid_box, c.fw_box, *c.slider_io]
    arith_inputs = [c.mix_state, c.op_dd, c.mult, c.expr, c.fid_box, c.fw_box, *c.slider_io]
    for btn, name, inputs in [(c.apply_btn, "apply", set_inputs), (c.reset_btn, "reset", set_inputs),
                              (c.l2_btn, "l2", set_inputs), (c.add_btn, "add", arith_inputs),
                              (c.sub_btn, "sub", arith_inputs), (c.expr_btn, "expr", arith_inputs),
                              (c.fset_btn, "feature", arith_inputs)]:
        btn.click(op(name), inputs, outputs, api_visibility="private")
    c.expr.submit(op("expr"), arith_inputs, outputs, api_visibility="private")
    # Keep duplicated sliders of one feature equal, in the browser (no server round trip).
    for _, idx in app.layout.mirrors().items():
        for i in idx:
            others = [c.sliders[j] for j in idx if j != i]
            js = "(v) => v" if len(others) == 1 else f"(v) => Array({len(others)}).fill(v)"
            c.sliders[i].input(None, [c.sliders[i]], others, js=js, api_visibility="private", queue=False)


def _wire_search(app: "SaefeApp", c: SimpleNamespace) -> None:
    """Searches only read the index, so they run concurrently (READ_LIMIT at a time). Every search
    runs debiased while a Debias method is chosen, filtered by the filter box, collapsed as set."""
    out = [c.gallery, c.rows_state, c.vec_state, c.bias_md, c.status, c.mix_state, c.page_state]
    db = c.debias_in  # method, protected attributes, target
    opts = [c.where, c.dedup, c.dedup_thr]
    run = ui_safe(lambda prev, md, kk, m, p, t, wh, dd, th, *v: app._search_mix(prev, list(v), md, kk, (m, p, t), wh, dd, th),
                  len(out), 4)
    c.run_btn.click(run, [c.mix_state, c.mode, c.k, *db, *opts, *c.slider_io], out, api_visibility="private",
                    concurrency_limit=READ_LIMIT)
    text = ui_safe(lambda q, kk, m, p, t, wh, dd, th: app._search_text(q, kk, (m, p, t), wh, dd, th), len(out), 4)
    for trigger in (c.text_btn.click, c.text_q.submit):
        trigger(text, [c.text_q, c.k, *db, *opts], out, api_visibility="private", concurrency_limit=READ_LIMIT)
    image = ui_safe(lambda im, kk, m, p, t, wh, dd, th: app._search_image(im, kk, (m, p, t), wh, dd, th), len(out), 4)
    c.img_btn.click(image, [c.img_q, c.k, *db, *opts], out, api_visibility="private", concurrency_limit=READ_LIMIT)
    c.more_btn.click(ui_safe(app._more, len(out), 4), [c.page_state, c.rows_state, c.vec_state], out,
                     api_visibility="private", concurrency_limit=READ_LIMIT)
    c.export_btn.click(ui_safe(app._export, 2), [c.rows_state], [c.export_file, c.status], api_visibility="private",
                       concurrency_limit=READ_LIMIT)
    c.reload_btn.click(ui_safe(app._reload, 1), None, [c.status], api_visibility="private")


def _wire_results(app: "SaefeApp", c: SimpleNamespace) -> None:
    """Selecting a result shows its features and heat map; a feature row opens the inspector."""

    def on_select(rows, evt: gr.SelectData):
        return app._select(rows, evt)

    sel_out = [c.sel_state, c.sel_md, c.feats_df, c.sal_img]
    saliency = ui_safe(lambda s, v, n, sg, progress=gr.Progress(): app._saliency(s, v, n, sg, progress), 2, 1)
    sal_in, sal_out = [c.sel_state, c.vec_state, c.sal_n, c.sal_sigma], [c.sal_img, c.status]
    c.gallery.select(ui_safe(on_select, len(sel_out)), [c.rows_state], sel_out, api_visibility="private").then(
        saliency, sal_in, sal_out, api_visibility="private")
    c.sal_btn.click(saliency, sal_in, sal_out, api_visibility="private")

    insp_out = [c.insp_md, c.insp_top, c.insp_bot, c.status]
    c.insp_btn.click(ui_safe(app._inspect, len(insp_out), 3), [c.insp_id], insp_out, api_visibility="private")
    c.insp_id.submit(ui_safe(app._inspect, len(insp_out), 3), [c.insp_id], insp_out, api_visibility="private")

    def on_feat_click(table, evt: gr.SelectData):
        try:
            row = evt.index[0] if isinstance(evt.index, (list, tuple)) else int(evt.index)
            fid = str(table.iloc[row, 0]) if hasattr(table, "iloc") else str(table[row][0])
        except Exception:
            raise SaefeError("click a feature row") from None
        return [fid, *app._inspect(fid)]

    c.feats_df.select(ui_safe(on_feat_click, 1 + len(insp_out), 4), [c.feats_df], [c.insp_id, *insp_out],
                      api_visibility="private")


def _register_api(app: "SaefeApp") -> None:
    """Named endpoints for gradio_client. They only read the index (a reload swaps the engine
    reference, it never changes one in use), so they run concurrently: a search costs a few
    milliseconds of our time, and a one-at-a-time queue made 20 clients wait seconds."""
    for fn, name, limit in [(app.api_search, "search", READ_LIMIT), (app.api_search_page, "search_page", READ_LIMIT),
                            (app.api_search_text, "search_text", 8), (app.api_search_text_page, "search_text_page", 8),
                            (app.api_search_image, "search_image", 8),
                            (app.api_inspect_feature, "inspect_feature", READ_LIMIT),
                            (app.api_image_features, "image_features", READ_LIMIT), (app.api_bias, "bias", READ_LIMIT),
                            (app.api_labels, "labels", READ_LIMIT), (app.api_reload, "reload", 1)]:
        gr.api(api_safe(fn), api_name=name, concurrency_limit=limit)
