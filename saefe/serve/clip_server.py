"""``saefe serve-clip``: the project's encoder behind the clip_server protocol.

Speaks what osmarks/meme-search-engine's ``clip_server.py`` speaks, so that engine (or any client
of that protocol, including ``saefe --clip-server``) can use a SAEFE model:

- ``POST /`` msgpack ``{"text": [str, ...]}`` or ``{"images": [bytes, ...]}`` (at most ``batch``
  items) -> 200, msgpack array of little-endian float16 bytes (L2-normalised embeddings);
  on a bad request (over-size batch, undecodable image, ...) 500 with a msgpack string, as the
  original does. The server keeps serving.
- ``GET /config`` -> msgpack ``{"model", "batch", "image_size": [h, w], "embedding_size"}``.
- ``GET /`` -> 204 (health). ``GET /metrics`` -> Prometheus text exposition.

The model runs on one worker thread off the event loop, so health checks and metrics stay
responsive while a batch is being embedded. Metrics are written by hand (a few counters and a
latency histogram) to avoid depending on prometheus_client.

This module also holds the small HTTP helpers ``serve-backend`` shares: ``Metrics`` and
``start_in_thread`` (run an aiohttp app on a background thread, e.g. in tests).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_BATCH = 32
DEFAULT_MAX_PIXELS = 64_000_000  # a 8000x8000 image; bigger ones are refused before decoding
MAX_BODY = 2**26  # 64 MiB, as the original server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


# --------------------------------------------------------------------------------------------
# Metrics (hand-written Prometheus text exposition format 0.0.4)
# --------------------------------------------------------------------------------------------
def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    esc = lambda v: str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')  # noqa: E731
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in sorted(labels.items())) + "}"


def _num(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Metrics:
    """Counters and histograms, rendered as Prometheus text. Thread-safe."""

    def __init__(self, buckets=LATENCY_BUCKETS):
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}  # name -> (type, help)
        self._counters: dict[str, dict[tuple, float]] = {}
        self._hists: dict[str, dict[tuple, list]] = {}
        self.buckets = tuple(buckets)

    def counter(self, name: str, help_: str) -> None:
        self._help[name] = ("counter", help_)
        self._counters.setdefault(name, {})

    def histogram(self, name: str, help_: str) -> None:
        self._help[name] = ("histogram", help_)
        self._hists.setdefault(name, {})

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._counters[name]
            series[key] = series.get(key, 0.0) + value

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._hists[name]
            h = series.get(key)
            if h is None:
                h = series[key] = [[0] * len(self.buckets), 0.0, 0]  # bucket counts, sum, count
            for i, b in enumerate(self.buckets):
                if value <= b:
                    h[0][i] += 1
            h[1] += value
            h[2] += 1

    def value(self, name: str, **labels: str) -> float:
        key = tuple(sorted(labels.items()))
        with self._lock:
            if name in self._counters:
                return self._counters[name].get(key, 0.0)
            h = self._hists[name].get(key)
            return float(h[2]) if h else 0.0

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name, (kind, help_) in self._help.items():
                lines.append(f"# HELP {name} {help_}")
                lines.append(f"# TYPE {name} {kind}")
                if kind == "counter":
                    for key, v in sorted(self._counters[name].items()):
                        lines.append(f"{name}{_labels(dict(key))} {_num(v)}")
                else:
                    for key, (counts, total, n) in sorted(self._hists[name].items()):
                        base = dict(key)
                        for b, c in zip(self.buckets, counts):
                            lines.append(f"{name}_bucket{_labels({**base, 'le': _num(b)})} {c}")
                        lines.append(f"{name}_bucket{_labels({**base, 'le': '+Inf'})} {n}")
                        lines.append(f"{name}_sum{_labels(base)} {_num(total)}")
                        lines.append(f"{name}_count{_labels(base)} {n}")
        return "\n".join(lines) + "\n"


def _metrics_key():
    from aiohttp import web

    return web.AppKey("saefe_metrics", Metrics)


try:
    METRICS_KEY = _metrics_key()  # app[METRICS_KEY] -> the app's Metrics
except Exception:  # noqa: BLE001 - aiohttp missing: the servers cannot run anyway
    METRICS_KEY = "saefe_metrics"


def metrics_response(metrics: Metrics):
    from aiohttp import web

    resp = web.Response(text=metrics.render(), content_type="text/plain")
    resp.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
    return resp


# --------------------------------------------------------------------------------------------
# Running an app on a background thread (tests, benchmarks, embedding in another program)
# --------------------------------------------------------------------------------------------
def start_in_thread(app, host: str = "127.0.0.1", port: int = 0) -> tuple[str, Callable[[], None]]:
    """Serve ``app`` on a daemon thread; returns ``(base_url, stop)``. ``port=0`` picks a free one."""
    from aiohttp import web

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict = {}

    def _run() -> None:
        asyncio.set_event_loop(loop)
        runner = web.AppRunner(app, access_log=None)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, host, port)
            loop.run_until_complete(site.start())
            box["port"] = runner.addresses[0][1]
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e
            ready.set()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()

    thread = threading.Thread(target=_run, name="saefe-http", daemon=True)
    thread.start()
    if not ready.wait(30):
        raise RuntimeError("server thread did not start within 30 s")
    if "error" in box:
        raise box["error"]

    def stop() -> None:
        if thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)

    return f"http://{host}:{box['port']}", stop


def serve_forever(app, host: str, port: int, name: str) -> None:
    """Run ``app`` until interrupted; prints ``NAME listening on http://HOST:PORT`` (the real port)."""
    from aiohttp import web

    from saefe.errors import SaefeError

    async def main() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as e:
            await runner.cleanup()
            raise SaefeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        real = runner.addresses[0][1]
        print(f"{name} listening on http://{host}:{real}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass


# --------------------------------------------------------------------------------------------
# The clip_server app
# --------------------------------------------------------------------------------------------
class BadRequest(Exception):
    """A request this server refuses (answered 500 + msgpack message, as the original)."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, index: int | None = None):
    """Bytes of an image file -> RGB PIL image, exactly as a local build decodes it.

    Uses ``saefe.ingest.images.decode_image`` (decompression-bomb refusal before decoding, transparency
    over white, high-bit-depth rescaling), so the server and a local build see the same pixels.
    """
    from saefe.ingest.images import BadImage
    from saefe.ingest.images import decode_image as _decode

    where = "image" if index is None else f"image {index}"
    if not isinstance(data, (bytes, bytearray)):
        raise BadRequest(f"{where} must be bytes, got {type(data).__name__}")
    try:
        return _decode(bytes(data), max_pixels=max_pixels)
    except BadImage as e:
        raise BadRequest(f"cannot decode {where}: {e}") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds on hostile input
        raise BadRequest(f"cannot decode {where}: {type(e).__name__}") from None


def parse_embed_request(data, batch: int) -> tuple[str, list]:
    """The msgpack body -> (modality, items); raises BadRequest like the original's asserts."""
    if not isinstance(data, dict):
        raise BadRequest("request must be a msgpack map with 'text' or 'images'")
    text, images = data.get("text"), data.get("images")
    if text and images:
        raise BadRequest("send either text or images in one request, not both")
    if text:
        if not isinstance(text, list) or not all(isinstance(t, str) for t in text):
            raise BadRequest("text must be an array of strings")
        if len(text) > batch:
            raise BadRequest(f"max batch size is {batch}")
        return "text", text
    if images:
        if not isinstance(images, list) or not all(isinstance(b, (bytes, bytearray)) for b in images):
            raise BadRequest("images must be an array of binary image files")
        if len(images) > batch:
            raise BadRequest(f"max batch size is {batch}")
        return "image", images
    raise BadRequest("images or text required")


def make_app(encoder, batch: int = DEFAULT_BATCH, max_pixels: int = DEFAULT_MAX_PIXELS, model_name: str | None = None):
    """An aiohttp app serving ``encoder`` (anything with ``info``, ``embed_images``, ``embed_texts``)."""
    import msgpack
    from aiohttp import web

    info = encoder.info
    model_name = model_name or info.model_id
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saefe-clip-model")
    metrics = Metrics()
    metrics.counter("saefe_clip_requests_total", "Embedding requests by modality and status")
    metrics.counter("saefe_clip_items_total", "Items embedded by modality")
    metrics.counter("saefe_clip_errors_total", "Embedding requests that failed, by reason")
    metrics.histogram("saefe_clip_request_seconds", "Embedding request latency in seconds")
    metrics.histogram("saefe_clip_inference_seconds", "Time the model spent on a batch")

    def work(modality: str, items: list) -> np.ndarray:
        t0 = time.perf_counter()
        if modality == "image":
            imgs = [decode_image(b, max_pixels, i) for i, b in enumerate(items)]
            out = encoder.embed_images(imgs)
        else:
            out = encoder.embed_texts(items)
        metrics.observe("saefe_clip_inference_seconds", time.perf_counter() - t0, modality=modality)
        return np.asarray(out, dtype=np.float32)

    def packed(obj, status: int = 200):
        return web.Response(body=msgpack.packb(obj, use_bin_type=True), status=status, content_type="application/msgpack")

    async def embed(request):
        t0 = time.perf_counter()
        modality = "unknown"
        try:
            try:
                raw = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise BadRequest(f"request body exceeds {MAX_BODY} bytes; send smaller batches") from None
            try:
                data = msgpack.unpackb(raw, raw=False)
            except Exception:  # noqa: BLE001
                raise BadRequest("request body is not valid msgpack") from None
            modality, items = parse_embed_request(data, batch)
            loop = asyncio.get_running_loop()
            vecs = await loop.run_in_executor(executor, work, modality, items)
            if vecs.shape != (len(items), info.embedding_dim):
                raise RuntimeError(f"encoder returned shape {vecs.shape} for {len(items)} items")
            body = [v.astype("<f2").tobytes() for v in vecs]
            metrics.inc("saefe_clip_items_total", len(items), modality=modality)
            status, reply = 200, body
        except BadRequest as e:
            metrics.inc("saefe_clip_errors_total", reason="bad_request")
            log.info("refused request: %s", e)
            status, reply = 500, str(e)
        except Exception as e:  # noqa: BLE001 - report, keep serving
            metrics.inc("saefe_clip_errors_total", reason="internal")
            log.exception("embedding failed")
            status, reply = 500, f"{type(e).__name__}: {e}"
        metrics.inc("saefe_clip_requests_total", modality=modality, status=str(status))
        metrics.observe("saefe_clip_request_seconds", time.perf_counter() - t0, modality=modality)
        return packed(reply, status)

    async def config(request):
        return packed({
            "model": model_name,
            "batch": int(batch),
            "image_size": [int(x) for x in info.image_size],
            "embedding_size": int(info.embedding_dim),
        })

    async def health(request):
        return web.Response(status=204)

    async def metrics_view(request):
        return metrics_response(metrics)

    async def on_cleanup(app):
        executor.shutdown(wait=False, cancel_futures=True)

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post("/", embed)
    app.router.add_get("/config", config)
    app.router.add_get("/", health)
    app.router.add_get("/metrics", metrics_view)
    app.on_cleanup.append(on_cleanup)
    app[METRICS_KEY] = metrics
    return app


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
