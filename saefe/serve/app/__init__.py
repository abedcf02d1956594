"""The configuration tool: a Gradio Blocks app over an :class:`~saefe.search.engine.Engine`.

The seed's use cases: (1) set an emotion (label menu, Apply to all sliders, Reset, L2 Norm);
(2) feature sliders grouped Custom / Shared / each label's top-10 distinct, range [-1, 1];
(3) Add / Subtract a label with a multiplier, an expression box (``Esteem - Male + Adult``) and
manual feature ids; (4) search in direction or exact feature mode, by text or image; (5) the
selected result's SmoothGrad heat map and top features; (6) a feature inspector; (7) a bias
panel with a Debias control (method, protected attributes, target; before/after table) and a
bias audit panel; (8) named API endpoints for gradio_client: /search, /search_text,
/search_image, /inspect_feature, /image_features, /bias, /labels, /debias, /audit.

Modules: state (slider layout <-> FeatureMix), views (query parsing, JSON/Markdown views),
guard (errors and input parsing), handlers (SaefeApp: API endpoints and UI callbacks), page
(the Blocks layout and its wiring), fairness (the Debias control, the audit panel and their
endpoints).
"""

from __future__ import annotations

from typing import Any

from saefe.search.engine import Engine
from saefe.serve.app.guard import api_safe, ui_safe
from saefe.serve.app.handlers import SaefeApp
from saefe.serve.app.state import TOP_N, MixState, SliderLayout
from saefe.serve.app.views import bias_json, bias_markdown, parse_query, result_json

_ui_safe = ui_safe  # old private name, kept for callers of the single-module app

CSS = """
#saefe-status p {margin: 0}
.saefe-err {color: #b00020; font-weight: 600}
.saefe-ok {color: #1b5e20}
.saefe-slider-group .form {gap: 2px}
"""

__all__ = ["SaefeApp", "SliderLayout", "MixState", "create_app", "launch", "allowed_paths", "parse_query",
           "result_json", "bias_json", "bias_markdown", "ui_safe", "api_safe"]


def create_app(engine: Engine, top_n: int = TOP_N) -> tuple[SaefeApp, Any]:
    """The app over ``engine`` (an Engine, followed through its index's updates, or a LiveEngine)."""
    app = SaefeApp(engine, top_n=top_n)
    app.warm()
    return app, app.build()


def allowed_paths(engine: Engine) -> list[str]:
    """Folders Gradio may serve files from: the corpus images and the index dir."""
    base = engine.store._image_base() if hasattr(engine.store, "_image_base") else None
    return [p for p in {base, str(engine.store.dir.resolve())} if p]


def launch(engine: Engine, host: str = "127.0.0.1", port: int | None = 7860, *, prevent_thread_lock: bool = False,
           quiet: bool = False, max_threads: int = 40):
    """Serve the app; returns the Blocks (launched) and its SaefeApp."""
    from saefe.search.live import one_blas_thread_per_request

    one_blas_thread_per_request()
    app, demo = create_app(engine)
    engine = app.engine
    # api_open: plain `POST /gradio_api/run/<name>` {"data": [...]} works too, besides the queue
    demo.queue(default_concurrency_limit=8, max_size=512, api_open=True)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=prevent_thread_lock, quiet=quiet,
                allowed_paths=allowed_paths(engine), show_error=True, ssr_mode=False, max_threads=max_threads,
                css=CSS, footer_links=["api"])
    return demo, app
