"""``saefe serve-backend``: a local index behind meme-search-engine's search API.

- ``POST /`` JSON ``{"terms": [{"embedding": [f32...]} | {"text": str} | {"image": base64}
  | {"predefined_embedding": name}, each with optional "weight" (default 1)], "k": int (default
  1000, at most ``max_k``), "include_video": bool (ignored)}``. Each term's embedding is
  L2-normalised, the terms are summed with their weights, the sum is L2-normalised and searched.
  Extensions (ignored by the original clients): ``"offset"`` (paging), ``"where"`` (metadata
  filters: ``{"subreddit": "pics", "width": {">=": 512}}`` or ``["path=memes/*"]``) and
  ``"dedup_threshold"`` (near-duplicate collapse; default the index's setting, else 0.95; 0 or
  false turns it off).
  Reply ``{"matches": [[score, filename_or_url, sha256 or "", 0, [width, height] | null, null], ...],
  "formats": [], "extensions": {}, "group_sizes": [...], "offset", "has_more", "next_offset"}``; a filename is
  the image's path relative to the corpus root (or its URL), never a path on the server.
  A bad request (unknown term type, wrong dimension, bad base64, NaN, undecodable image, unknown
  predefined name, k above the cap, bad filter) gets 400 ``{"error": message}``.
- Optional ``"debias": {"method": "rerank" | "ablate" | "project" | "ablate+rerank"..., "protect":
  "gender" | ["gender", "age"], "target": "corpus" | "parity" | "Male=0.5,Female=0.5", "pool": int}``
  (an extension; meme-search-engine clients never send it): ``project`` and ``rerank`` act on the
  query vector and the ranked list as in ``saefe search --debias``; ``ablate`` acts on
  ``predefined_embedding`` terms (label mixes) and leaves other terms as they are. The reply then
  also has ``"debias": {...}`` saying what was done, which groups are estimates, and whether the
  target shares were met. A bad debias request (unknown method, an attribute with no labels and
  no probe) is a 400. Debiased lists are not paged, filtered or collapsed.
- ``GET /`` -> ``{"n_total", "predefined_embedding_names", "d_emb"}``; ``GET /metrics`` Prometheus text.
- ``POST /reload`` -> ``{"generation", "n_total", "changed", "error"}``: reopen the index now if it
  changed (``{"force": true}``: always). The server also notices a new generation on its own
  (saefe.search.live), so an update needs neither this call nor a restart.

Permissive CORS like the original, so a browser front end on another origin can query it. The
engine (model and index) runs on a few worker threads off the event loop; searches only read.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from saefe.serve.clip_server import METRICS_KEY, Metrics, metrics_response, serve_forever  # noqa: F401 (cli.serve runs it)

log = logging.getLogger(__name__)

DEFAULT_K = 1000
MAX_K = 1000  # meme-search-engine's default k; more is a crawl of the corpus, not a search
WORKERS = 4
MAX_BODY = 2**26
TERM_TYPES = ("embedding", "text", "image", "predefined_embedding")


class QueryError(Exception):
    """A bad request: answered 400 {"error": message}."""


def _normalised(v: np.ndarray, what: str) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32).reshape(-1)
    if not np.isfinite(v).all():
        raise QueryError(f"{what} contains NaN or inf")
    n = float(np.linalg.norm(v))
    if n < 1e-12:
        raise QueryError(f"{what} is all zeros")
    return v / n


def _relative(path, root: str | None) -> str | None:
    """A stored path as a client may see it: relative to the corpus root, never a server path."""
    if not isinstance(path, str) or not path:
        return None
    if not os.path.isabs(path):
        return path
    if root and os.path.commonpath([os.path.abspath(path), root]) == root:
        return os.path.relpath(path, root)
    return os.path.basename(path)


def _to_match(r, root: str | None = None) -> list:
    md = getattr(r, "metadata", None) or {}
    # a URL as is; else the path relative to the corpus root (a server path would leak its layout)
    url = md.get("url")
    name = (url if isinstance(url, str) and url else None) or _relative(md.get("path"), root) or str(getattr(r, "id", ""))
    sha = md.get("sha256")
    w, h = md.get("width"), md.get("height")
    size = None
    try:
        if w is not None and h is not None and not (isinstance(w, float) and math.isnan(w)):
            size = [int(w), int(h)]
    except (TypeError, ValueError):
        size = None
    return [float(r.score), name, sha if isinstance(sha, str) else "", 0, size, None]


class QueryPlanner:
    """Turns the JSON terms into one query vector with an engine; raises QueryError on bad input.
    ``live`` (saefe.search.live.LiveEngine) hands out the current engine of a reloadable index:
    :meth:`run` takes it once per request, so parsing and searching see one index generation."""

    def __init__(self, live, max_k: int = MAX_K, dedup_threshold: float | str | None = "auto"):
        self.live = live
        self.max_k = int(max_k)
        self.dedup_threshold = dedup_threshold

    def run(self, body, on_parsed=None) -> dict:
        """Blocking (a worker thread: taking the engine may reopen the index): validate ``body``
        and search it, all against one engine. ``on_parsed(parsed)`` is called once the request
        is valid, before the search."""
        engine = self.live.engine  # one engine (one index generation) for the whole request
        parsed, k = self.parse(body, engine)
        opts = self.options(body)
        debias = self.parse_debias(body)
        if on_parsed is not None:
            on_parsed(parsed)
        return self.search(parsed, k, opts, debias, engine)

    def options(self, body) -> dict:
        """offset / where / dedup_threshold of a request body (validated; defaults filled in)."""
        offset = body.get("offset", 0) or 0
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise QueryError(f"'offset' must be an integer >= 0, got {offset!r}")
        where = body.get("where")
        if where is not None:
            from saefe.search.filters import Filter, FilterError

            if not isinstance(where, (dict, list, str)):
                raise QueryError("'where' must be an object {column: value}, a list of 'COLUMN OP VALUE' or a string")
            try:
                where = Filter.parse(where)
            except FilterError as e:
                raise QueryError(str(e)) from None
        dedup = body.get("dedup_threshold", self.dedup_threshold)
        if dedup is False or dedup is None or dedup == 0:
            dedup = None
        elif dedup == "auto":
            pass
        elif isinstance(dedup, bool) or not isinstance(dedup, (int, float)) or not 0 <= dedup <= 1:
            raise QueryError(f"'dedup_threshold' must be a cosine in (0, 1], or 0 / false for off; got {dedup!r}")
        return {"offset": offset, "where": where, "dedup": dedup}

    def parse_debias(self, body):
        """The optional ``debias`` member as a DebiasConfig (None when absent)."""
        spec = body.get("debias") if isinstance(body, dict) else None
        if spec is None:
            return None
        from saefe.errors import SaefeError
        from saefe.search.debias import DebiasConfig

        if not isinstance(spec, dict):
            raise QueryError("'debias' must be an object like {\"method\": \"rerank\", \"protect\": \"gender\"}")
        pool = spec.get("pool")
        if pool is not None and (isinstance(pool, bool) or not isinstance(pool, int)):
            raise QueryError(f"debias 'pool' must be an integer, got {pool!r}")
        try:
            return DebiasConfig.parse(spec.get("method"), spec.get("protect"), spec.get("target") or "corpus",
                                      pool=pool)
        except SaefeError as e:
            raise QueryError(f"debias: {e}") from None

    def parse(self, body, engine) -> tuple[list[tuple[str, object, float]], int]:
        if not isinstance(body, dict):
            raise QueryError("request must be a JSON object with 'terms'")
        terms = body.get("terms")
        if not isinstance(terms, list) or not terms:
            raise QueryError("'terms' must be a non-empty array")
        k = body.get("k", DEFAULT_K)
        if k is None:
            k = DEFAULT_K
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise QueryError(f"'k' must be a positive integer, got {k!r}")
        if k > self.max_k:
            raise QueryError(f"'k' is at most {self.max_k} on this server (got {k}); page with 'offset' for more")
        parsed = []
        for i, term in enumerate(terms):
            if not isinstance(term, dict):
                raise QueryError(f"term {i} must be an object")
            unknown = set(term) - set(TERM_TYPES) - {"weight"}
            if unknown:
                raise QueryError(f"term {i} has unknown type {sorted(unknown)[0]!r}; use one of {', '.join(TERM_TYPES)}")
            weight = term.get("weight", 1.0)
            if weight is None:
                weight = 1.0
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise QueryError(f"term {i} weight must be a finite number, got {weight!r}")
            kinds = [t for t in TERM_TYPES if t in term]
            if not kinds:
                raise QueryError(f"term {i} has none of {', '.join(TERM_TYPES)}")
            for kind in kinds:  # the original adds every kind a term carries
                parsed.append((kind, self._check(i, kind, term[kind], engine), float(weight)))
        return parsed, int(k)

    def _check(self, i: int, kind: str, value, engine):
        if kind == "embedding":
            if not isinstance(value, list) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in value
            ):
                raise QueryError(f"term {i} embedding must be an array of numbers")
            dim = int(engine.dim)
            if len(value) != dim:
                raise QueryError(f"term {i} embedding has dimension {len(value)}, expected {dim}")
            return _normalised(np.asarray(value, dtype=np.float32), f"term {i} embedding")
        if kind == "text":
            if not isinstance(value, str) or not value.strip():
                raise QueryError(f"term {i} text must be a non-empty string")
            return value
        if kind == "image":
            if not isinstance(value, str):
                raise QueryError(f"term {i} image must be a base64 string")
            s = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
            try:
                data = base64.b64decode(s, validate=True)
            except (binascii.Error, ValueError):
                raise QueryError(f"term {i} image is not valid base64") from None
            if not data:
                raise QueryError(f"term {i} image is empty")
            return data
        # predefined_embedding
        if not isinstance(value, str) or value not in engine.predefined:
            names = ", ".join(sorted(engine.predefined)) or "none on this server"
            raise QueryError(f"term {i}: unknown predefined_embedding {value!r} (available: {names})")
        return value

    def term_vector(self, kind: str, value, engine) -> np.ndarray:
        """Blocking: one term's embedding (text and image terms go through the engine)."""
        from saefe.errors import SaefeError

        try:
            if kind == "embedding":
                return value
            if kind == "text":
                return engine.embed_text(value)
            if kind == "image":
                return engine.embed_image_bytes(value)
            return engine.predefined[value]
        except SaefeError as e:
            raise QueryError(f"{kind} term: {e}") from None
        except Exception as e:  # noqa: BLE001 - undecodable images surface as many exception types
            if kind == "image":
                raise QueryError(f"image term: cannot decode image ({type(e).__name__})") from None
            raise

    def query_vector(self, parsed, engine) -> np.ndarray:
        """Blocking: the weighted sum of the terms' unit embeddings, normalised."""
        total = np.zeros(int(engine.dim), np.float32)
        for kind, value, weight in parsed:
            v = self.term_vector(kind, value, engine)
            total += weight * _normalised(np.asarray(v, dtype=np.float32), f"{kind} term embedding")
        return _normalised(total, "the weighted sum of the terms")

    def query_parts(self, parsed, engine) -> list:
        """The query as debias parts: predefined label embeddings as their feature mixes (which
        ablate can rewrite), every other term as its unit vector."""
        from saefe.search.debias import Part
        from saefe.search.engine import Term

        parts = []
        for kind, value, weight in parsed:
            if kind == "predefined_embedding" and engine.profiles is not None and value in engine.profiles.labels:
                parts.append(Part(weight, mix=engine.mix(Term("label", value))))
            else:
                v = np.asarray(self.term_vector(kind, value, engine), dtype=np.float32)
                parts.append(Part(weight, vector=_normalised(v, f"{kind} term embedding").astype(np.float64)))
        return parts

    def search(self, parsed, k: int, opts: dict, debias, engine) -> dict:
        """One page: {"matches", "group_sizes", "offset", "has_more", "next_offset"} (blocking);
        with ``debias`` (a DebiasConfig, or None) also "debias" (what was done), and no paging.
        ``engine``: the one ``parsed`` was validated against."""
        from saefe.errors import RemoteError, SaefeError

        info = None
        try:
            if debias is not None:
                from saefe.search.debias import search_parts, start

                if opts["where"] or opts["offset"]:
                    raise QueryError("'where' and 'offset' do not combine with 'debias' yet")
                attrs, targets, info = start(engine, debias)
                k = min(k, max(1, int(engine.n_total)))
                results = search_parts(engine, self.query_parts(parsed, engine), k, "direction", debias, attrs,
                                       targets, info)
                has_more, nxt = False, len(results)
            elif hasattr(engine, "store"):  # a local index: filters, collapse, paging
                from saefe.search.query import search_vector_page

                page = search_vector_page(engine, self.query_vector(parsed, engine), k, opts["offset"], opts["where"],
                                          opts["dedup"])
                results, has_more = page.results, page.has_more
                nxt = page.next_offset
            else:  # anything else with search_vector (a remote or stand-in engine): plain paging
                if opts["where"]:
                    raise QueryError("this server cannot filter (no local metadata)")
                n = max(1, int(engine.n_total))
                results = engine.search_vector(self.query_vector(parsed, engine), min(opts["offset"] + k + 1, n))
                has_more = len(results) > opts["offset"] + k
                results = results[opts["offset"]: opts["offset"] + k]
                nxt = opts["offset"] + len(results)
        except RemoteError:
            raise  # the engine's own remote backend failed: a server-side error (500)
        except SaefeError as e:
            raise QueryError(str(e)) from None
        store = getattr(engine, "store", None)
        root = store._image_base() if hasattr(store, "_image_base") else None
        out = {"matches": [_to_match(r, root) for r in results],
               "group_sizes": [len(r.group) if getattr(r, "group", None) else 1 for r in results],
               "offset": opts["offset"], "has_more": bool(has_more), "next_offset": nxt}
        if info is not None:
            out["debias"] = info.to_dict()
        return out


def make_app(engine, max_k: int = MAX_K, dedup_threshold: float | str | None = "auto"):
    """An aiohttp app serving ``engine``: an Engine (or anything with the same attributes), or a
    saefe.search.live.LiveEngine that follows its index's updates."""
    from aiohttp import web

    from saefe.search.live import LiveEngine, one_blas_thread_per_request

    one_blas_thread_per_request()
    live = engine if isinstance(engine, LiveEngine) else LiveEngine.static(engine)
    planner = QueryPlanner(live, max_k, dedup_threshold)
    _ = live.engine.predefined  # build the label directions now, not on the first request
    executor = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="saefe-backend-engine")
    metrics = Metrics()
    metrics.counter("saefe_backend_queries_total", "Search requests by status")
    metrics.counter("saefe_backend_terms_total", "Query terms by type")
    metrics.counter("saefe_backend_errors_total", "Search requests that failed, by reason")
    metrics.histogram("saefe_backend_query_seconds", "Search request latency in seconds")
    cors = {
        "Access-Control-Allow-Origin": "*",
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Allow-Headers": "Content-Type",
    }

    def reply(obj, status: int = 200):
        return web.json_response(obj, status=status, headers=cors)

    def count_terms(parsed) -> None:
        for kind, _, _ in parsed:
            metrics.inc("saefe_backend_terms_total", type=kind)

    async def search(request):
        t0 = time.perf_counter()
        try:
            try:
                body = await request.json()
            except web.HTTPRequestEntityTooLarge:
                raise QueryError(f"request body exceeds {MAX_BODY} bytes") from None
            except ValueError:
                raise QueryError("request body is not valid JSON") from None
            # validate and search on a worker thread: taking the engine may reopen the index
            loop = asyncio.get_running_loop()
            page = await loop.run_in_executor(executor, planner.run, body, count_terms)
            status, out = 200, {**page, "formats": [], "extensions": {}}
        except QueryError as e:
            metrics.inc("saefe_backend_errors_total", reason="bad_request")
            status, out = 400, {"error": str(e)}
        except Exception as e:  # noqa: BLE001 - report, keep serving
            log.exception("search failed")
            metrics.inc("saefe_backend_errors_total", reason="internal")
            status, out = 500, {"error": f"{type(e).__name__}: {e}"}
        metrics.inc("saefe_backend_queries_total", status=str(status))
        metrics.observe("saefe_backend_query_seconds", time.perf_counter() - t0)
        return reply(out, status)

    async def info(request):
        def facts() -> dict:  # taking the engine may reopen a new generation: off the event loop
            eng = live.engine
            return {
                "n_total": int(eng.n_total),
                "predefined_embedding_names": sorted(eng.predefined),
                "d_emb": int(eng.dim),
            }

        loop = asyncio.get_running_loop()
        return reply(await loop.run_in_executor(executor, facts))

    async def reload(request):
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            body = {}
        force = bool(body.get("force")) if isinstance(body, dict) else False
        loop = asyncio.get_running_loop()
        return reply(await loop.run_in_executor(executor, lambda: live.reload(force=force)))

    async def options(request):
        return web.Response(status=204, headers=cors)

    async def metrics_view(request):
        return metrics_response(metrics)

    async def on_cleanup(app):
        executor.shutdown(wait=False, cancel_futures=True)

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post("/", search)
    app.router.add_get("/", info)
    app.router.add_post("/reload", reload)
    app.router.add_route("OPTIONS", "/", options)
    app.router.add_get("/metrics", metrics_view)
    app.on_cleanup.append(on_cleanup)
    app[METRICS_KEY] = metrics
    return app
