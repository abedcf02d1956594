"""clip_server protocol over real HTTP on 127.0.0.1: saefe's server, its client, and the failures."""

from __future__ import annotations

import io
import socket
import threading
import time

import msgpack
import numpy as np
import pytest
import requests
from aiohttp import web
from PIL import Image

from saefe.remote.clip_client import ClipServerEncoder
from saefe.serve.clip_server import Metrics, make_app, start_in_thread
from saefe.errors import IncompatibleError, RemoteError
from saefe.manifest import EncoderInfo

from fixtures.app import dead_url

FAST = dict(retries=2, backoff=0.01, max_backoff=0.02, timeout=10)


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = rng.integers(0, 256, (40 + 3 * i, 56, 3), dtype=np.uint8)
        out.append(Image.fromarray(a))
    return out


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _post(url, obj):
    return requests.post(url + "/", data=msgpack.packb(obj, use_bin_type=True),
                         headers={"Content-Type": "application/msgpack"}, timeout=30)



@pytest.fixture(scope="module")
def clip_url(demo_encoder):
    url, stop = start_in_thread(make_app(demo_encoder, batch=4))
    yield url
    stop()


def _stub(routes: dict) -> tuple[str, callable]:
    """A tiny aiohttp server: routes maps (method, path) -> async handler."""
    app = web.Application()
    for (method, path), handler in routes.items():
        app.router.add_route(method, path, handler)
    return start_in_thread(app)


def _config_handler(dim=8, batch=4, model="stub/model"):
    async def h(request):
        return web.Response(body=msgpack.packb({"model": model, "batch": batch, "image_size": [64, 64],
                                                "embedding_size": dim}), content_type="application/msgpack")
    return h


def _unit(dim, n=1, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# -- the project's own server -----------------------------------------------------------------
def test_config_health_and_metrics(clip_url, demo_encoder):
    cfg = msgpack.unpackb(requests.get(clip_url + "/config").content)
    assert cfg == {"model": demo_encoder.info.model_id, "batch": 4, "image_size": list(demo_encoder.info.image_size),
                   "embedding_size": demo_encoder.info.embedding_dim}
    assert requests.get(clip_url + "/").status_code == 204
    m = requests.get(clip_url + "/metrics")
    assert m.status_code == 200 and m.headers["Content-Type"].startswith("text/plain")
    assert "# TYPE saefe_clip_requests_total counter" in m.text
    assert "# TYPE saefe_clip_request_seconds histogram" in m.text


def test_client_matches_local_encoder_and_batches(clip_url, demo_encoder):
    enc = ClipServerEncoder(clip_url, **FAST)
    assert enc.info == demo_encoder.info  # same model id, dim, image size -> indexes are compatible
    before = requests.get(clip_url + "/metrics").text
    ims = _images(9) + [Image.fromarray(np.zeros((30, 30), np.uint8), "L"),
                        Image.new("RGBA", (20, 33), (10, 200, 30, 128)), Image.new("CMYK", (25, 25))]
    remote = enc.embed_images(ims)
    local = demo_encoder.embed_images([im.convert("RGB") if im.mode in ("L", "CMYK") else im for im in ims])
    assert remote.shape == (12, demo_encoder.info.embedding_dim) and remote.dtype == np.float32
    assert np.allclose(np.linalg.norm(remote, axis=1), 1, atol=1e-5)
    cos = (remote[:9] * local[:9]).sum(1)
    assert cos.min() > 0.999
    texts = ["a happy dog", "a sad man", "an angry woman", "a calm cat", "a photo of a kid", "red"]
    cos_t = (enc.embed_texts(texts) * demo_encoder.embed_texts(texts)).sum(1)
    assert cos_t.min() > 0.999
    after = requests.get(clip_url + "/metrics").text

    def count(text, line):
        for ln in text.splitlines():
            if ln.startswith(line + " "):
                return float(ln.split()[-1])
        return 0.0
    # 12 images in batches of 4 -> 3 requests; 6 texts -> 2
    key = 'saefe_clip_requests_total{modality="image",status="200"}'
    assert count(after, key) - count(before, key) == 3
    key = 'saefe_clip_items_total{modality="text"}'
    assert count(after, key) - count(before, key) == 6
    assert enc.embed_texts([]).shape == (0, demo_encoder.info.embedding_dim)


def test_raw_bytes_and_fp16_wire_format(clip_url, demo_encoder):
    im = _images(1, seed=3)[0]
    r = _post(clip_url, {"images": [_png(im)]})
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/msgpack"
    out = msgpack.unpackb(r.content)
    assert isinstance(out, list) and len(out) == 1 and len(out[0]) == 2 * demo_encoder.info.embedding_dim
    v = np.frombuffer(out[0], "<f2").astype(np.float32)
    assert abs(np.linalg.norm(v) - 1) < 2e-3
    assert float(v @ demo_encoder.embed_images([im])[0]) > 0.999


@pytest.mark.parametrize("body,needle", [
    ({"text": ["a"] * 5}, "max batch size is 4"),
    ({"images": [b"\x89PNG not really"] * 5}, "max batch size is 4"),
    ({"images": [b"this is not an image"]}, "cannot decode image 0"),
    ({"images": [b""]}, "cannot decode image 0"),
    ({}, "images or text required"),
    ({"text": [1, 2]}, "array of strings"),
    ("just a string", "msgpack map"),
])
def test_server_refuses_bad_requests_and_keeps_serving(clip_url, body, needle):
    r = _post(clip_url, body)
    assert r.status_code == 500
    msg = msgpack.unpackb(r.content)
    assert isinstance(msg, str) and needle in msg
    assert requests.get(clip_url + "/").status_code == 204
    ok = _post(clip_url, {"text": ["still serving"]})
    assert ok.status_code == 200 and len(msgpack.unpackb(ok.content)) == 1


def test_server_refuses_garbage_body_and_decompression_bomb(demo_encoder):
    url, stop = start_in_thread(make_app(demo_encoder, batch=4, max_pixels=100 * 100))
    try:
        r = requests.post(url + "/", data=b"\xc1\xc1\xc1", timeout=10)
        assert r.status_code == 500 and "not valid msgpack" in msgpack.unpackb(r.content)
        big = _png(Image.new("RGB", (200, 200)))
        r = _post(url, {"images": [_png(Image.new("RGB", (50, 50))), big]})
        assert r.status_code == 500 and "image 1" in msgpack.unpackb(r.content)
        assert "bomb" in msgpack.unpackb(r.content)
        assert _post(url, {"images": [_png(Image.new("RGB", (50, 50)))]}).status_code == 200
    finally:
        stop()


def test_client_error_message_on_over_size_batch(clip_url):
    enc = ClipServerEncoder(clip_url, **FAST)
    enc.batch = 10  # pretend the server allows more than it does
    with pytest.raises(RemoteError, match=r"HTTP 500.*max batch size is 4"):
        enc.embed_texts(["x"] * 6)


def test_health_stays_responsive_while_model_busy():
    # the model is held busy until health and metrics have answered: they must not queue behind it
    release, busy = threading.Event(), threading.Event()

    class Slow:
        info = EncoderInfo("slow/model", 4, (8, 8))

        def embed_texts(self, texts):
            busy.set()
            release.wait(20)
            return _unit(4, len(texts))

        def embed_images(self, images):
            return _unit(4, len(images))

    url, stop = start_in_thread(make_app(Slow(), batch=2))
    try:
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("r", _post(url, {"text": ["x"]})))
        t.start()
        assert busy.wait(10)
        assert requests.get(url + "/", timeout=5).status_code == 204
        assert requests.get(url + "/metrics", timeout=5).status_code == 200
        assert not release.is_set()  # answered while the embedding was still running
        release.set()
        t.join(10)
        assert result["r"].status_code == 200
    finally:
        release.set()
        stop()


# -- client failures ---------------------------------------------------------------------------
def test_client_server_down():
    url = dead_url()
    t0 = time.perf_counter()
    with pytest.raises(RemoteError, match=r"cannot reach clip_server at http://127\.0\.0\.1:\d+: Connection refused \(tried 3 times\)$"):
        ClipServerEncoder(url, **FAST)
    assert time.perf_counter() - t0 < 5


def test_client_rejects_non_http_url():
    with pytest.raises(RemoteError, match="http://"):
        ClipServerEncoder("localhost:1234")


def test_client_reports_500_message_and_wrong_size_and_count():
    dim = 8

    async def embed(request):
        data = msgpack.unpackb(await request.read())
        texts = data["text"]
        if texts[0] == "boom":
            return web.Response(body=msgpack.packb("CUDA out of memory"), status=500)
        if texts[0] == "short":
            return web.Response(body=msgpack.packb([_unit(dim - 1)[0].astype("<f2").tobytes() for _ in texts]))
        if texts[0] == "few":
            return web.Response(body=msgpack.packb([_unit(dim)[0].astype("<f2").tobytes()]))
        if texts[0] == "nan":
            return web.Response(body=msgpack.packb([np.full(dim, np.nan, "<f2").tobytes() for _ in texts]))
        if texts[0] == "notmsgpack":
            return web.Response(body=b"<html>oops</html>")
        if texts[0] == "notlist":
            return web.Response(body=msgpack.packb({"a": 1}))
        return web.Response(body=msgpack.packb([_unit(dim, seed=i)[0].astype("<f2").tobytes()
                                                 for i, _ in enumerate(texts)]))

    url, stop = _stub({("GET", "/config"): _config_handler(dim), ("POST", "/"): embed})
    try:
        enc = ClipServerEncoder(url, **FAST)
        assert enc.info == EncoderInfo("stub/model", dim, (64, 64))
        ok = enc.embed_texts(["a", "b", "c", "d", "e"])
        assert ok.shape == (5, dim)
        assert np.allclose(ok[0], _unit(dim, seed=0)[0], atol=2e-3)
        with pytest.raises(RemoteError, match=r"HTTP 500\): CUDA out of memory"):
            enc.embed_texts(["boom"])
        with pytest.raises(RemoteError, match=r"embedding of size 7, expected 8"):
            enc.embed_texts(["short", "x"])
        with pytest.raises(RemoteError, match=r"returned 1 embeddings for 2 inputs"):
            enc.embed_texts(["few", "x"])
        with pytest.raises(RemoteError, match="non-finite"):
            enc.embed_texts(["nan"])
        with pytest.raises(RemoteError, match="not msgpack"):
            enc.embed_texts(["notmsgpack"])
        with pytest.raises(RemoteError, match="instead of an array"):
            enc.embed_texts(["notlist"])
        with pytest.raises(IncompatibleError, match="dimension 8, expected 16"):
            ClipServerEncoder(url, expected_dim=16, **FAST)
    finally:
        stop()


def test_client_retries_transient_failures_with_backoff():
    dim = 8
    calls = {"config": 0, "post": 0}

    async def config(request):
        calls["config"] += 1
        if calls["config"] <= 2:
            return web.Response(status=503, text="warming up")
        return await _config_handler(dim)(request)

    async def embed(request):
        calls["post"] += 1
        if calls["post"] == 1:
            return web.Response(status=502)
        data = msgpack.unpackb(await request.read())
        if data["text"][0] == "always":
            return web.Response(status=504)
        return web.Response(body=msgpack.packb([_unit(dim)[0].astype("<f2").tobytes() for _ in data["text"]]))

    url, stop = _stub({("GET", "/config"): config, ("POST", "/"): embed})
    try:
        sleeps = []

        def sleep(s):
            sleeps.append(s)
            time.sleep(s)
        enc = ClipServerEncoder(url, retries=3, backoff=0.01, max_backoff=0.03, timeout=10, sleep=sleep)
        assert calls["config"] == 3
        assert enc.embed_texts(["x"]).shape == (1, dim)
        assert calls["post"] == 2
        with pytest.raises(RemoteError, match=r"unavailable: HTTP 504 \(tried 4 times\)"):
            enc.embed_texts(["always"])
        assert sleeps[:2] == [0.01, 0.02]  # exponential ...
        assert max(sleeps) == 0.03  # ... and bounded
    finally:
        stop()


def test_client_malformed_config():
    async def config(request):
        return web.Response(body=msgpack.packb({"model": "x", "batch": 4}))

    url, stop = _stub({("GET", "/config"): config})
    try:
        with pytest.raises(RemoteError, match="malformed /config"):
            ClipServerEncoder(url, **FAST)
    finally:
        stop()


def test_metrics_exposition_format():
    m = Metrics(buckets=(0.1, 1.0))
    m.counter("x_total", "things")
    m.histogram("lat_seconds", "latency")
    m.inc("x_total", 2, kind='a"b')
    m.observe("lat_seconds", 0.5)
    text = m.render()
    assert 'x_total{kind="a\\"b"} 2' in text
    assert 'lat_seconds_bucket{le="0.1"} 0' in text and 'lat_seconds_bucket{le="1"} 1' in text
    assert 'lat_seconds_bucket{le="+Inf"} 1' in text and "lat_seconds_count 1" in text


# -- the CLI ------------------------------------------------------------------------------------
def _wait_healthy(url: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.get(url + "/", timeout=2).status_code in (200, 204):
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not come up")


def test_serve_clip_cli(saefe_home, demo_encoder):
    """`saefe serve-clip` end to end (in a daemon thread: a subprocess would re-import torch)."""
    from saefe.cli.main import main

    url = dead_url()
    port = url.rsplit(":", 1)[1]
    threading.Thread(target=main, args=(["serve-clip", "--model", "demo", "--port", port, "--batch", "2"],),
                     daemon=True).start()
    _wait_healthy(url)
    enc = ClipServerEncoder(url, **FAST)
    assert enc.batch == 2 and enc.info == demo_encoder.info
    v = enc.embed_texts(["a happy dog", "a sad cat", "red"])
    assert float((v * demo_encoder.embed_texts(["a happy dog", "a sad cat", "red"])).sum(1).min()) > 0.999


def test_serve_clip_cli_port_in_use(saefe_home):
    from saefe.cli.main import main

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        assert main(["serve-clip", "--port", str(s.getsockname()[1])]) == 2
    finally:
        s.close()


# -- done-when: an index built through --clip-server equals a local one --------------------------
def test_index_built_through_clip_server_equals_local(tmp_path, clip_url):
    build = pytest.importorskip("saefe.ingest.build")
    from saefe.ingest.store import EmbeddingStore

    src = tmp_path / "imgs"
    src.mkdir()
    for i, im in enumerate(_images(10, seed=7)):
        im.save(src / f"img{i:02d}.png" if i % 2 else src / f"img{i:02d}.jpg")
    Image.new("RGBA", (31, 17), (200, 10, 10, 60)).save(src / "alpha.png")
    Image.new("L", (33, 21), 90).save(src / "grey.png")
    (src / "broken.jpg").write_bytes(b"not an image")

    local = build.build_index(build.BuildConfig(images=str(src), out=str(tmp_path / "local"), model="demo", progress=False))
    remote = build.build_index(build.BuildConfig(images=str(src), out=str(tmp_path / "remote"), model="demo",
                                                 clip_server=clip_url, progress=False))
    assert local.count == remote.count == 12
    a, b = EmbeddingStore.open(tmp_path / "local"), EmbeddingStore.open(tmp_path / "remote")
    assert a.encoder_info == b.encoder_info
    assert list(a.metadata["sha256"]) == list(b.metadata["sha256"])
    va, vb = np.asarray(a.vectors, np.float32), np.asarray(b.vectors, np.float32)
    cos = (va * vb).sum(1) / (np.linalg.norm(va, axis=1) * np.linalg.norm(vb, axis=1))
    assert cos.min() > 0.999, cos
