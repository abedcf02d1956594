"""Throughput and latency of ``saefe serve-clip`` and ``saefe serve-backend`` under concurrent load.

Each server runs as its own process (``python -m saefe.cli.main serve-... --port 0``); this process
loads it with N concurrent aiohttp clients for T seconds per workload and prints requests/s and
p50/p99 latency as a table.

    python benchmarks/bench_servers.py                         # demo model, small generated index
    python benchmarks/bench_servers.py --duration 10 --concurrency 1 8 32 --index index/demo
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def start_server(args: list[str], env=None) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, "-m", "saefe.cli.main", *args, "--port", "0"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline:
        line = p.stdout.readline()
        if "listening on" in line:
            return p, line.split("listening on ")[1].strip()
        if not line and p.poll() is not None:
            raise SystemExit(f"server {args[0]} exited: {p.stderr.read()[-2000:]}")
    p.kill()
    raise SystemExit(f"server {args[0]} did not start")


def stop_server(p: subprocess.Popen) -> None:
    p.terminate()
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()


async def load(url: str, make_request, concurrency: int, duration: float) -> dict:
    """``make_request(session, url)`` -> awaitable returning the HTTP status."""
    import aiohttp

    lat: list[float] = []
    errors = 0
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as s:
        for _ in range(2):  # warm-up
            await make_request(s, url)
        deadline = time.perf_counter() + duration

        async def worker():
            nonlocal errors
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    status = await make_request(s, url)
                except Exception:  # noqa: BLE001
                    status = -1
                if status == 200:
                    lat.append(time.perf_counter() - t0)
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    a = np.array(lat) * 1000 if lat else np.array([np.nan])
    return {"rps": len(lat) / wall, "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
            "n": len(lat), "errors": errors}


def clip_workloads(batch: int):
    import msgpack
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    bodies = {
        "text x1": msgpack.packb({"text": ["a photo of a happy person"]}),
        f"text x{batch}": msgpack.packb({"text": ["a photo of a happy person"] * batch}),
        "image x1 (256px PNG)": msgpack.packb({"images": [png]}, use_bin_type=True),
        f"image x{batch} (256px PNG)": msgpack.packb({"images": [png] * batch}, use_bin_type=True),
    }

    def req(body):
        async def f(s, url):
            async with s.post(url + "/", data=body, headers={"Content-Type": "application/msgpack"}) as r:
                await r.read()
                return r.status
        return f
    return {name: (req(b), len(b)) for name, b in bodies.items()}


def backend_workloads(d: int):
    from PIL import Image

    rng = np.random.default_rng(0)
    v = rng.normal(size=d)
    v = (v / np.linalg.norm(v)).tolist()
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(buf, format="PNG")
    img = base64.b64encode(buf.getvalue()).decode()
    bodies = {
        "embedding, k=10": {"terms": [{"embedding": v}], "k": 10},
        "embedding, k=1000": {"terms": [{"embedding": v}], "k": 1000},
        "text, k=10": {"terms": [{"text": "a photo of a happy person"}], "k": 10},
        "image, k=10": {"terms": [{"image": img}], "k": 10},
    }

    def req(body):
        data = json.dumps(body)

        async def f(s, url):
            async with s.post(url + "/", data=data, headers={"Content-Type": "application/json"}) as r:
                await r.read()
                return r.status
        return f
    return {name: (req(b), len(json.dumps(b))) for name, b in bodies.items()}


def ensure_index(path: str | None, n: int) -> str | None:
    if path:
        return path
    if (ROOT / "index/demo/manifest.json").exists():
        return str(ROOT / "index/demo")
    try:
        from saefe.ingest.build import BuildConfig, build_index
    except ImportError:
        return None
    from PIL import Image

    out = ROOT / "benchmarks/out/bench_index"
    src = ROOT / "benchmarks/out/bench_images"
    if not (out / "manifest.json").exists():
        src.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(src / f"{i:05d}.png")
        build_index(BuildConfig(images=str(src), out=str(out), model="demo", progress=False))
    return str(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--index", default=None, help="index dir for serve-backend (default: index/demo or a generated one)")
    ap.add_argument("--n-images", type=int, default=500, help="size of the generated index")
    ap.add_argument("--batch", type=int, default=16, help="serve-clip --batch, and the batched workloads' size")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per workload and concurrency")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--only", choices=["clip", "backend"], default=None)
    a = ap.parse_args()

    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    rows = []
    if a.only in (None, "clip"):
        p, url = start_server(["serve-clip", "--model", a.model, "--batch", str(a.batch)], env)
        try:
            for name, (fn, size) in clip_workloads(a.batch).items():
                for c in a.concurrency:
                    rows.append(("serve-clip", name, c, asyncio.run(load(url, fn, c, a.duration))))
        finally:
            stop_server(p)
    if a.only in (None, "backend"):
        index = ensure_index(a.index, a.n_images)
        try:
            import saefe.search.engine  # noqa: F401
        except ImportError:
            index = None
        if index is None:
            print("serve-backend: skipped (saefe.search.engine or saefe.ingest.build not available)", file=sys.stderr)
        else:
            p, url = start_server(["serve-backend", "--index", index], env)
            try:
                import requests

                info = requests.get(url + "/").json()
                for name, (fn, size) in backend_workloads(int(info["d_emb"])).items():
                    for c in a.concurrency:
                        rows.append((f"serve-backend ({info['n_total']} imgs)", name, c,
                                     asyncio.run(load(url, fn, c, a.duration))))
            finally:
                stop_server(p)

    head = f"{'server':<28} {'workload':<24} {'conc':>4} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'ok':>7} {'err':>4}"
    print(f"# {os.cpu_count()} CPU cores, model {a.model}, {a.duration:g} s per row")
    print(head)
    print("-" * len(head))
    for server, name, c, r in rows:
        print(f"{server:<28} {name:<24} {c:>4} {r['rps']:>9.1f} {r['p50']:>9.1f} {r['p99']:>9.1f} {r['n']:>7} {r['errors']:>4}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
