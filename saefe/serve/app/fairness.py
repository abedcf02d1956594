"""The app's bias tools: the Debias control beside the bias panel (method, protected attributes,
target; every search then runs debiased and the panel shows a before/after table) and the bias
audit panel (a label's top features, each one's tie to a protected attribute, the flagged ones,
and a feature's example strip). API endpoints: /debias and /audit.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Sequence

import gradio as gr

from saefe.errors import SaefeError
from saefe.search.debias import DebiasConfig
from saefe.serve.app.guard import ok as _ok
from saefe.serve.app.guard import small_k as _small_k
from saefe.serve.app.guard import ui_safe
from saefe.serve.app.views import bias_json, bias_markdown, parse_query

if TYPE_CHECKING:
    from saefe.serve.app.handlers import SaefeApp

METHOD_CHOICES = ["none", "rerank", "project", "ablate", "project+rerank", "ablate+rerank", "ablate+project"]
TARGET_CHOICES = ["corpus", "parity"]


def attributes(app: "SaefeApp") -> list[str]:
    """Protected attributes this index can debias (labels or probe estimates)."""
    try:
        return list(app.engine.demographics.available)
    except SaefeError:
        return []


def config(method: str | None, protect: Sequence[str] | str | None, target: str | None) -> DebiasConfig | None:
    """The UI's choices as a DebiasConfig; None for 'none'."""
    if not method or str(method).strip().lower() == "none":
        return None
    return DebiasConfig.parse(method, protect if protect else None, (target or "corpus").strip() or "corpus")


def search(engine, terms, mode: str, k, cfg: DebiasConfig | None):
    """(results, bias panel markdown, status suffix): with ``cfg``, the debiased results and a
    before/after table against the same query without debiasing. ``engine``: the one the request
    took (one index generation for both searches)."""
    results = engine.search(terms, k=k, mode=mode, debias=cfg)
    try:
        after = bias_json(engine, results)
        before = bias_json(engine, engine.search(terms, k=k, mode=mode)) if cfg is not None else None
        md = bias_markdown(after, before)
    except SaefeError as e:
        md = f"_bias: {e}_"
    info = getattr(results, "info", None)
    note = ""
    if info is not None:
        met = "" if info.met is None else f"; target {'met' if info.met else 'NOT met'}"
        note = f" — debiased ({'+'.join(info.methods)}{met})"
        md += "\n\n" + describe(info)
    return results, md, note


def describe(info) -> str:
    parts = [f"**Debias** {'+'.join(info.methods)} · protecting "
             + ", ".join(f"{a} ({info.sources[a]})" for a in info.protect) + " · target "
             + "; ".join(", ".join(f"{g} {s:.0%}" for g, s in t.items()) for t in info.targets.values())]
    if info.ablated:
        strength = info.ablation.get("strength", 1.0) if info.ablation else 1.0
        parts.append(f"took {strength:.0%} of the weight of {len(info.ablated)} features: "
                     + ", ".join(f"f{f}" for f in info.ablated[:10]) + (", …" if len(info.ablated) > 10 else ""))
    if info.projection:
        p = info.projection
        parts.append(f"projection λ {p['lambda']:.2f}, cosine to the query {p['cosine_to_query']:.3f}")
    if info.rerank:
        parts.append(f"re-ranked {info.rerank['pool']} candidates")
    if info.met is not None:
        parts.append("target met" if info.met else "**target not met** (best effort)")
    parts += [f"_{n}_" for n in info.notes]
    return " · ".join(parts)


# -- API ------------------------------------------------------------------------------------------


def api_debias(app: "SaefeApp", query: str, mode: str = "direction", k: int = 20, method: str = "rerank",
               protect: str = "gender", target: str = "corpus") -> dict:
    """A debiased search: results, what was done, and the bias before and after."""
    cfg = config(method, protect, target)
    if cfg is None:
        raise SaefeError("choose a debias method: " + ", ".join(METHOD_CHOICES[1:]))
    term = parse_query(app.engine, query)
    mode = app._check_mode(mode)
    results = app.engine.search([term], k=k, mode=mode, debias=cfg)
    before = app.engine.search([term], k=k, mode=mode)
    return {"query": query, "kind": term.kind, "mode": mode, "results": app.results_json(results),
            "debias": results.info.to_dict(), "bias": bias_json(app.engine, results),
            "bias_before": bias_json(app.engine, before)}


def api_audit(app: "SaefeApp", label: str, attribute: str = "gender", top: int = 10) -> dict:
    """A label's top features with each one's tie to a protected attribute (flagged = carries the bias)."""
    from saefe.analysis.audit import audit_label

    if not label:
        raise SaefeError("choose a label to audit")
    return audit_label(app.engine, label, attribute, top=_small_k(top), examples=6).to_dict()


# -- page -----------------------------------------------------------------------------------------


def build_debias_controls(app: "SaefeApp", c: SimpleNamespace) -> None:
    """The Debias control, placed beside the bias panel (in the results column)."""
    attrs = attributes(app)
    with gr.Accordion("7 · Debias", open=False, elem_id="debias-panel"):
        if not attrs:
            gr.Markdown("_no demographic labels or probes for this index: run `saefe labels --annotations`_")
        with gr.Row(equal_height=True):
            c.db_method = gr.Dropdown(METHOD_CHOICES, value="none", label="Method", elem_id="db-method", scale=2,
                                      interactive=bool(attrs))
            c.db_protect = gr.CheckboxGroup(attrs, value=attrs[:1], label="Protect", elem_id="db-protect", scale=2)
            c.db_target = gr.Dropdown(TARGET_CHOICES, value="corpus", label="Target", allow_custom_value=True,
                                      info="corpus, parity or shares like Male=0.5,Female=0.5", elem_id="db-target",
                                      scale=2)
        gr.Markdown("_Every search runs debiased while a method is chosen; the bias panel then shows before → after._")
    c.debias_in = [c.db_method, c.db_protect, c.db_target]


def build_audit_panel(app: "SaefeApp", c: SimpleNamespace) -> None:
    attrs = attributes(app)
    with gr.Accordion("8 · Bias audit", open=False, elem_id="audit-panel"):
        with gr.Row(equal_height=True):
            c.au_label = gr.Dropdown(app.engine.labels, value=app.default_label(), label="Label", scale=2,
                                     elem_id="au-label")
            c.au_attr = gr.Dropdown(attrs, value=attrs[0] if attrs else None, label="Protected attribute", scale=2,
                                    elem_id="au-attr")
            c.au_btn = gr.Button("Audit", scale=1, elem_id="au-btn")
        c.au_md = gr.Markdown(elem_id="au-md")
        c.au_df = gr.Dataframe(headers=["feature", "weight", "fires", "shares (explained)", "excess", "gap here", "carries bias"],
                               interactive=False, label="Top features (click one for its example strip)",
                               elem_id="au-df")
        c.au_strip = gr.Gallery(label="Example strip", columns=6, height=150, allow_preview=False, elem_id="au-strip")
        c.au_state = gr.State({})


def audit_view(app: "SaefeApp", label: str, attribute: str):
    rep = api_audit(app, label, attribute)
    rows = [[f"f{r['feature']}", round(r["weight"], 4), r["support"] if r["support"] is not None else "-",
             ", ".join(f"{g} {r['shares'][g]:.0%} ({r['expected'][g]:.0%})" for g in rep["groups"]) if r["shares"] else "-",
             f"{r['excess']:+.2f} {r['lean']}" if r["excess"] is not None else "-",
             f"{r['gap']:+.2f}" if r["gap"] is not None else "-",
             "+".join(w for w, on in (("corpus", r["flagged_corpus"]), ("here", r["flagged_here"])) if on)]
            for r in rep["rows"]]
    n = sum(r["flagged"] for r in rep["rows"])
    head = (f"**{rep['label']}** for **{rep['attribute']}**: {n} of {len(rep['rows'])} features carry the bias: "
            f"corpus = |excess| ≥ {rep['threshold']:.2f} (group share among the images where the feature fires, beyond "
            f"what their labels explain); here = gap ≥ {rep['gap_threshold']:.2f} (Cohen's d towards "
            f"{rep['gap_group'] or '-'} among the label's {rep['neighbourhood']} nearest images). `ablate` takes "
            "weight from them.")
    if rep["label_shares"]:
        head += "  \n" + f"{rep['label']} images: " + ", ".join(f"{g} {s:.0%}" for g, s in rep["label_shares"].items())
        head += "; corpus: " + ", ".join(f"{g} {s:.0%}" for g, s in rep["corpus_shares"].items())
    strips = {f"f{r['feature']}": r["examples"] for r in rep["rows"]}
    first = next((r for r in rep["rows"] if r["flagged"]), rep["rows"][0] if rep["rows"] else None)
    strip = [(p, f"f{first['feature']}") for p in first["examples"]] if first else []
    return [head, rows, strips, strip, _ok(f"audited {rep['label']} for {rep['attribute']}")]


def wire_audit(app: "SaefeApp", c: SimpleNamespace) -> None:
    out = [c.au_md, c.au_df, c.au_state, c.au_strip, c.status]
    c.au_btn.click(ui_safe(lambda lab, at: audit_view(app, lab, at), len(out), 4), [c.au_label, c.au_attr], out,
                   api_visibility="private")

    def on_row(strips: dict[str, Any], table, evt: gr.SelectData):
        try:
            row = evt.index[0] if isinstance(evt.index, (list, tuple)) else int(evt.index)
            fid = str(table.iloc[row, 0]) if hasattr(table, "iloc") else str(table[row][0])
        except Exception:
            raise SaefeError("click a feature row") from None
        return [(p, fid) for p in strips.get(fid, [])]

    c.au_df.select(ui_safe(on_row, 1), [c.au_state, c.au_df], [c.au_strip], api_visibility="private")


def register_api(app: "SaefeApp") -> None:
    from saefe.serve.app.guard import api_safe

    def debias(query: str, mode: str = "direction", k: int = 20, method: str = "rerank", protect: str = "gender",
               target: str = "corpus") -> dict:
        """A debiased search (method rerank | ablate | project | combinations like ablate+rerank;
        protect: comma-separated attributes; target: corpus, parity or Male=0.5,Female=0.5)."""
        return api_debias(app, query, mode, k, method, protect, target)

    def audit(label: str, attribute: str = "gender", top: int = 10) -> dict:
        """A label's top features and each one's tie to a protected attribute."""
        return api_audit(app, label, attribute, top)

    gr.api(api_safe(debias), api_name="debias", concurrency_limit=4)
    gr.api(api_safe(audit), api_name="audit", concurrency_limit=4)
