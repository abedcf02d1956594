"""meme-search-engine search API over real HTTP on 127.0.0.1: serve-backend, RemoteBackend, failures."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from dataclasses import dataclass, field

import numpy as np
import pytest
import requests
from aiohttp import web
from PIL import Image

from saefe.remote.backend_client import RemoteBackend
from saefe.serve.backend_server import make_app
from saefe.serve.clip_server import start_in_thread
from saefe.errors import IncompatibleError, RemoteError

from fixtures.app import dead_url

FAST = dict(retries=2, backoff=0.01, max_backoff=0.02, timeout=10)
D, N = 16, 40


@dataclass
class Result:
    id: int
    score: float
    metadata: dict = field(default_factory=dict)


def _unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


class FakeEngine:
    """Same attributes as saefe.search.engine.Engine: deterministic, no model."""

    def __init__(self):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(N, D)).astype(np.float32)
        self.vectors = x / np.linalg.norm(x, axis=1, keepdims=True)
        self.dim, self.n_total = D, N
        self.predefined = {"Happiness": _unit(rng.normal(size=D)), "Anger": _unit(rng.normal(size=D))}
        self.meta = []
        for i in range(N):
            md = {"sha256": hashlib.sha256(str(i).encode()).hexdigest(), "width": 10 + i, "height": 20 + i}
            md["url" if i % 2 else "path"] = f"https://img.example/{i}.jpg" if i % 2 else f"imgs/{i}.png"
            self.meta.append(md)

    def embed_text(self, text):
        seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
        return _unit(np.random.default_rng(seed).normal(size=D)) * 3  # not unit: the server normalises

    def embed_image_bytes(self, data):
        im = Image.open(io.BytesIO(data)).convert("RGB")
        m = np.asarray(im, np.float32).mean(axis=(0, 1))
        return _unit(np.resize(m + 1, D))

    def search_vector(self, vec, k):
        s = self.vectors @ vec
        order = np.argsort(-s)[:k]
        return [Result(int(i), float(s[i]), dict(self.meta[i])) for i in order]


def _png(color=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", (12, 9), color).save(buf, format="PNG")
    return buf.getvalue()



@pytest.fixture(scope="module")
def engine():
    return FakeEngine()


@pytest.fixture(scope="module")
def backend_url(engine):
    url, stop = start_in_thread(make_app(engine))
    yield url
    stop()


def _stub(routes):
    app = web.Application()
    for (method, path), handler in routes.items():
        app.router.add_route(method, path, handler)
    return start_in_thread(app)


async def _info(request):
    return web.json_response({"n_total": 3, "predefined_embedding_names": [], "d_emb": 4})


# -- server + client --------------------------------------------------------------------------
def test_info(backend_url, engine):
    r = requests.get(backend_url + "/")
    assert r.json() == {"n_total": N, "predefined_embedding_names": ["Anger", "Happiness"], "d_emb": D}
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    b = RemoteBackend(backend_url, **FAST)
    assert (b.n_total, b.d_emb, b.predefined_names) == (N, D, ["Anger", "Happiness"])


def test_search_vector_matches_engine(backend_url, engine):
    b = RemoteBackend(backend_url, **FAST)
    q = _unit(np.arange(D) - 7.5)
    got = b.search_vector(q, 10)
    want = engine.search_vector(q, 10)
    assert [r.metadata.get("url") or r.metadata.get("path") for r in got] == \
           [r.metadata.get("url") or r.metadata.get("path") for r in want]
    assert np.allclose([r.score for r in got], [r.score for r in want], atol=1e-5)
    for r, w in zip(got, want):
        assert r.metadata["sha256"] == w.metadata["sha256"]
        assert (r.metadata["width"], r.metadata["height"]) == (w.metadata["width"], w.metadata["height"])
        assert ("url" in r.metadata) == ("url" in w.metadata)
    assert [r.id for r in got] == list(range(10))  # remote matches carry their rank as id


def test_raw_reply_format_and_default_k(backend_url, engine):
    r = requests.post(backend_url + "/", json={"terms": [{"embedding": engine.vectors[3].tolist()}],
                                               "include_video": True})
    assert r.status_code == 200
    body = r.json()
    assert body["formats"] == [] and body["extensions"] == {}
    assert len(body["matches"]) == N  # k defaults to 1000, clamped to the index
    top = body["matches"][0]
    assert top == [pytest.approx(1.0, abs=1e-5), "https://img.example/3.jpg", engine.meta[3]["sha256"], 0, [13, 23], None]


def test_weighted_terms(backend_url, engine):
    """query = normalise(sum w * normalise(term embedding)), as the original."""
    b = RemoteBackend(backend_url, **FAST)
    emb = engine.vectors[5] * 7
    img = _png()
    terms = [{"text": "a happy dog", "weight": 2}, {"image": img, "weight": 0.5},
             {"predefined_embedding": "Anger", "weight": -1}, {"embedding": emb}]
    q = (2 * _unit(engine.embed_text("a happy dog")) + 0.5 * _unit(engine.embed_image_bytes(img))
         - engine.predefined["Anger"] + _unit(emb))
    want = engine.search_vector(_unit(q), 5)
    got = b.search_terms(terms, 5)
    assert [r.metadata.get("sha256") for r in got] == [r.metadata["sha256"] for r in want]
    assert np.allclose([r.score for r in got], [r.score for r in want], atol=1e-5)


@pytest.mark.parametrize("body,needle", [
    ({"terms": [{"video": "x"}]}, "unknown type 'video'"),
    ({"terms": [{"embedding": [0.1] * (D - 1)}]}, f"dimension {D - 1}, expected {D}"),
    ({"terms": [{"image": "***not base64***"}]}, "not valid base64"),
    ({"terms": [{"image": base64.b64encode(b"not an image").decode()}]}, "image term"),
    ({"terms": [{"embedding": [0.0] * D}]}, "all zeros"),
    ({"terms": [{"predefined_embedding": "Joy"}]}, "unknown predefined_embedding 'Joy'"),
    ({"terms": [{"text": "x", "weight": "heavy"}]}, "weight must be a finite number"),
    ({"terms": []}, "non-empty array"),
    ({"terms": [{"text": "x"}], "k": 0}, "positive integer"),
    ({"terms": [{"weight": 1}]}, "has none of"),
    ([1, 2], "JSON object"),
])
def test_bad_requests_get_400_and_server_keeps_serving(backend_url, body, needle):
    r = requests.post(backend_url + "/", json=body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]
    assert requests.post(backend_url + "/", json={"terms": [{"text": "ok"}], "k": 2}).status_code == 200


def test_nan_and_non_json(backend_url):
    r = requests.post(backend_url + "/", data=json.dumps({"terms": [{"embedding": [float("nan")] * D}]}),
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "NaN" in r.json()["error"]
    r = requests.post(backend_url + "/", data=json.dumps({"terms": [{"text": "x", "weight": float("inf")}]}),
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    r = requests.post(backend_url + "/", data=b"{nope", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    m = requests.get(backend_url + "/metrics").text
    assert 'saefe_backend_queries_total{status="400"}' in m and "saefe_backend_query_seconds_count" in m


def test_client_checks_dimension_and_terms(backend_url):
    b = RemoteBackend(backend_url, **FAST)
    with pytest.raises(IncompatibleError, match=f"d_emb {D}"):
        b.search_vector(np.ones(D + 1, np.float32), 5)
    with pytest.raises(RemoteError, match="NaN"):
        b.search_vector(np.full(D, np.nan, np.float32), 5)
    with pytest.raises(RemoteError, match="unknown type 'video'"):
        b.search_terms([{"video": "x"}], 5)
    with pytest.raises(RemoteError, match=r"rejected the search \(HTTP 400\): term 0: unknown predefined"):
        b.search_terms([{"predefined_embedding": "Joy"}], 5)


# -- client failures ---------------------------------------------------------------------------
def test_client_server_down():
    with pytest.raises(RemoteError, match=r"cannot reach backend at http://127\.0\.0\.1:\d+: Connection refused"):
        RemoteBackend(dead_url(), **FAST)


def test_client_500_and_malformed_replies():
    replies = iter([
        web.Response(status=500, text="index exploded"),
        web.json_response({"nope": 1}),
        web.json_response({"matches": [["high", "a.jpg", "", 0, None, None]]}),
        web.json_response({"matches": [[0.5]]}),
        web.Response(text="<html>proxy</html>"),
        web.json_response({"matches": [[0.9, "https://x/y.png", "abc", 0, [3, 4], None], [0.8, "z.jpg"]],
                           "formats": [], "extensions": {}}),
    ])

    async def search(request):
        return next(replies)

    url, stop = _stub({("GET", "/"): _info, ("POST", "/"): search})
    try:
        b = RemoteBackend(url, **FAST)
        with pytest.raises(RemoteError, match=r"failed the search \(HTTP 500\): index exploded"):
            b.search_vector(np.ones(4), 2)
        with pytest.raises(RemoteError, match="malformed search reply.*'matches'"):
            b.search_vector(np.ones(4), 2)
        with pytest.raises(RemoteError, match="match 0 has score 'high'"):
            b.search_vector(np.ones(4), 2)
        with pytest.raises(RemoteError, match=r"match 0 is not \[score, filename"):
            b.search_vector(np.ones(4), 2)
        with pytest.raises(RemoteError, match="not JSON"):
            b.search_vector(np.ones(4), 2)
        res = b.search_vector(np.ones(4), 2)
        assert res[0].metadata == {"url": "https://x/y.png", "filename_hash": "abc", "width": 3, "height": 4,
                                   "format_bitmask": 0}
        assert res[0].score == pytest.approx(0.9) and res[1].metadata == {"path": "z.jpg"}
    finally:
        stop()


def test_client_malformed_info_and_retry():
    calls = {"n": 0}

    async def flaky(request):
        calls["n"] += 1
        if calls["n"] < 3:
            return web.Response(status=503)
        return web.json_response({"n_total": "many"})

    url, stop = _stub({("GET", "/"): flaky})
    try:
        with pytest.raises(RemoteError, match="malformed GET / reply"):
            RemoteBackend(url, **FAST)
        assert calls["n"] == 3  # two 503s retried
    finally:
        stop()


# -- done-when: serve-backend over a real index returns what the local engine returns -------------
@pytest.fixture(scope="module")
def real_index(tmp_path_factory, demo_encoder):
    pytest.importorskip("saefe.search.engine")
    build = pytest.importorskip("saefe.ingest.build")
    tmp = tmp_path_factory.mktemp("backend_e2e")
    src = tmp / "imgs"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (32 + i, 40, 3), dtype=np.uint8)).save(src / f"{i:02d}.png")
    out = tmp / "index"
    build.build_index(build.BuildConfig(images=str(src), out=str(out), model="demo", progress=False))
    return out


def _same_as_local(url, eng, dim):
    b = RemoteBackend(url, **FAST)
    assert (b.n_total, b.d_emb) == (eng.n_total, eng.dim) == (24, dim)
    rng = np.random.default_rng(5)
    for q in (eng.embed_text("a happy dog"), rng.normal(size=eng.dim)):
        q = _unit(q)
        local = eng.search_vector(q, 8)
        remote = b.search_vector(q, 8)
        assert [r.metadata["sha256"] for r in remote] == [r.metadata["sha256"] for r in local]
        assert np.allclose([r.score for r in remote], [r.score for r in local], atol=1e-4)
        assert all(("path" in r.metadata or "url" in r.metadata) and r.metadata["width"] > 0 for r in remote)
    # a text term is embedded by the server's engine
    local = eng.search_vector(_unit(eng.embed_text("a sad cat")), 5)
    remote = b.search_terms([{"text": "a sad cat"}], 5)
    assert [r.metadata["sha256"] for r in remote] == [r.metadata["sha256"] for r in local]


def test_serve_backend_matches_local_engine(real_index, demo_encoder):
    from saefe.search.engine import Engine

    eng = Engine.open(str(real_index), model="demo")
    url, stop = start_in_thread(make_app(eng))
    try:
        _same_as_local(url, eng, demo_encoder.info.embedding_dim)
    finally:
        stop()


def test_serve_backend_cli(real_index, demo_encoder):
    """`saefe serve-backend` end to end (daemon thread; a subprocess would re-import torch)."""
    import threading
    import time

    from saefe.cli.main import main
    from saefe.search.engine import Engine

    url = dead_url()
    port = url.rsplit(":", 1)[1]
    threading.Thread(target=main, args=(["serve-backend", "--index", str(real_index), "--port", port],),
                     daemon=True).start()
    deadline = time.time() + 60
    while True:
        try:
            requests.get(url + "/", timeout=2)
            break
        except requests.ConnectionError:
            assert time.time() < deadline, "serve-backend did not come up"
            time.sleep(0.1)
    _same_as_local(url, Engine.open(str(real_index), model="demo"), demo_encoder.info.embedding_dim)


def test_serve_backend_cli_missing_index(tmp_path):
    pytest.importorskip("saefe.search.engine")
    from saefe.cli.main import main

    assert main(["serve-backend", "--index", str(tmp_path / "nope"), "--port", "0"]) == 2
