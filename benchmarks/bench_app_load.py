#!/usr/bin/env python
"""Load test of the Gradio app's named /search endpoint: N concurrent clients for T seconds.

Launches the app in-process on a free port over --index (default index/demo; or --url of a
running app), then N threads each loop: a search request (rotating over labels, expressions and
feature mixes, both modes) until the time is up. Prints a table: requests, errors, p50/p99
latency and requests/s, per client kind and overall.

    python benchmarks/bench_app_load.py                       # 20 clients, 30 s, gradio_client
    python benchmarks/bench_app_load.py --client http         # raw HTTP: POST /gradio_api/run/search
    python benchmarks/bench_app_load.py --url http://127.0.0.1:7860/ --clients 50 --seconds 60
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUERIES = [
    ("Esteem - Male + Adult", "direction"),
    ("Happiness", "direction"),
    ("Esteem", "features"),
    ("Fear + 0.5*Sadness", "features"),
    ('{"83": 0.8, "480": -0.5}', "features"),
    ("Excitement - Kid", "direction"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_search(base: str, query: str, mode: str, k: int, session, sid: str | None = None) -> dict:
    """One plain POST /gradio_api/run/search {"data": [...]} -> {"data": [result]} (the app opens
    its API with queue(api_open=True))."""
    # A session_hash lets gradio reuse its per-session state; without one every request pays for
    # a fresh session (~60 ms here: a config copy of each of the page's ~360 components).
    r = session.post(f"{base}gradio_api/run/search", json={"data": [query, mode, k], "session_hash": sid},
                     timeout=60)
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:120]}")
    return r.json()["data"][0]


def sse_search(base: str, query: str, mode: str, k: int, session, sid: str | None = None) -> dict:
    """Gradio's queued HTTP API: POST /gradio_api/call/search -> event id; GET .../{id} streams SSE."""
    r = session.post(f"{base}gradio_api/call/search", json={"data": [query, mode, k]}, timeout=60)
    r.raise_for_status()
    eid = r.json()["event_id"]
    r = session.get(f"{base}gradio_api/call/search/{eid}", timeout=60)
    r.raise_for_status()
    event = None
    for line in r.text.splitlines():
        if line.startswith("event: "):
            event = line[7:].strip()
        elif line.startswith("data: ") and event in ("complete", "error"):
            if event == "error":
                raise RuntimeError(line[6:])
            return json.loads(line[6:])[0]
    raise RuntimeError("no complete event")


def worker(i: int, base: str, k: int, until: float, how: str, out: list, errs: list) -> None:
    if how in ("http", "sse"):
        import requests

        session = requests.Session()
        fn = http_search if how == "http" else sse_search
        sid = f"bench-{i}-{os.getpid()}"
        call = lambda q, m: fn(base, q, m, k, session, sid)  # noqa: E731
    else:
        from gradio_client import Client

        client = Client(base, verbose=False)
        call = lambda q, m: client.predict(q, m, k, api_name="/search")  # noqa: E731
    n = i
    while time.perf_counter() < until:
        q, m = QUERIES[n % len(QUERIES)]
        n += 1
        t0 = time.perf_counter()
        try:
            res = call(q, m)
            if len(res["results"]) != k:
                raise RuntimeError(f"{len(res['results'])} results")
            out.append((m, time.perf_counter() - t0))
        except Exception as e:  # noqa: BLE001 - counted, reported
            errs.append(f"{type(e).__name__}: {str(e)[:120]}")


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", default=str(ROOT / "index" / "demo"))
    ap.add_argument("--url", help="a running app (default: launch one in-process)")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--client", choices=["gradio_client", "http", "sse"], default="gradio_client",
                    help="gradio_client (queue, SSE); http: one POST /gradio_api/run/search; sse: POST /call + GET stream")
    args = ap.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    demo = None
    base = args.url
    if not base:
        from saefe.serve.app import launch
        from saefe.search.engine import Engine

        engine = Engine.open(args.index)
        port = free_port()
        demo, _ = launch(engine, port=port, prevent_thread_lock=True, quiet=True)
        base = f"http://127.0.0.1:{port}/"
    base = base if base.endswith("/") else base + "/"
    # warm up (first requests load caches)
    from gradio_client import Client

    c = Client(base, verbose=False)
    for q, m in QUERIES:
        c.predict(q, m, args.k, api_name="/search")

    out: list = []
    errs: list = []
    start = time.perf_counter()
    until = start + args.seconds
    threads = [threading.Thread(target=worker, args=(i, base, args.k, until, args.client, out, errs), daemon=True)
               for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=args.seconds + 120)
    wall = time.perf_counter() - start

    print(f"\n{args.clients} concurrent {args.client} clients, {args.seconds:g}s, "
          f"k={args.k}, {base}  (cpu cores: {os.cpu_count()})")
    print(f"{'mode':<10} {'requests':>8} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>7}")
    rows = [("direction", [t for m, t in out if m == "direction"]), ("features", [t for m, t in out if m == "features"]),
            ("all", [t for _, t in out])]
    for name, lat in rows:
        e = len(errs) if name == "all" else "-"
        print(f"{name:<10} {len(lat):>8} {e:>6} {pct(lat, 50) * 1e3:>8.0f} {pct(lat, 99) * 1e3:>8.0f} {len(lat) / wall:>7.1f}")
    if errs:
        print("first errors:", *sorted(set(errs))[:5], sep="\n  ")
    if demo is not None:
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
