"""``saefe build --ray local`` against the plain build on this machine: wall time of the user's
command (a fresh process each run, paired and interleaved so both see the same machine load),
the build's own time (in-process: scan, model load, embedding, index; not the interpreter's
start), the ratio, and whether both give the same index (cosine per image).

Also Ray's fixed cost on this machine, measured apart: ``ray.init`` of a private cluster, the
first Ray Data execution (its executor and stats actors) and ``ray.shutdown``.

    python benchmarks/bench_ray_build.py --sizes 3000,12000 --repeats 2

Corpora are demo images (generated once under --work); the model is the shipped demo model, so
the embedding is cheap and the table shows Ray's overhead at its most visible: with SigLIP
SO400M (~8 CPU-seconds an image) the fixed start is noise.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def ray_fixed_cost() -> dict[str, float]:
    """Seconds for ray.init (2 CPUs), two 1-CPU actors ready (a local build's workers, without and
    with a job runtime env), the first Ray Data execution and shutdown, in a child process."""
    code = (
        "import time, logging, ray, json, os\n"
        "def actors():\n"
        "    @ray.remote(num_cpus=1)\n"
        "    class A:\n"
        "        def ping(self): return os.getpid()\n"
        "    t=time.perf_counter(); a=[A.remote() for _ in range(2)]; ray.get([x.ping.remote() for x in a])\n"
        "    dt=time.perf_counter()-t; [ray.kill(x) for x in a]; return dt\n"
        "kw=dict(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)\n"
        "t=time.perf_counter(); ray.init(**kw); t1=time.perf_counter()\n"
        "plain=actors()\n"
        "import ray.data as rd; rd.DataContext.get_current().enable_progress_bars=False\n"
        "t2=time.perf_counter(); rd.range(2).map_batches(lambda b: b, batch_size=1).take_all(); t3=time.perf_counter()\n"
        "ray.shutdown(); t4=time.perf_counter()\n"
        "ray.init(runtime_env={'env_vars': {'SAEFE_X': '1'}}, **kw); with_env=actors(); ray.shutdown()\n"
        "print(json.dumps({'init': t1-t, 'actors_ready': plain, 'actors_ready_runtime_env': with_env, "
        "'first_data': t3-t2, 'shutdown': t4-t3}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


def run_build(images: Path, out: Path, task_size: int) -> tuple[float, float]:
    """(wall seconds of the command, seconds of the build as it reports them: "embedded this run:
    N in S s", everything in-process from the scan to the index, Ray's start and stop included); task_size
    0 = the plain build, else --ray local with tasks of that many images."""
    ray = task_size > 0
    cmd = [sys.executable, "-m", "saefe.cli.main", "build", "--images", str(images), "--model", "demo",
           "--out", str(out), "--force", "--no-progress"] + (["--ray", "local", "--ray-task-size", str(task_size)]
                                                             if ray else [])
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"build failed ({'ray' if ray else 'plain'}): {p.stderr.strip().splitlines()[-1:]}")
    m = re.search(r"embedded this run: \d+ in ([\d.]+)s", p.stdout)
    return wall, float(m.group(1)) if m else float("nan")


def same_index(a: Path, b: Path) -> tuple[int, float]:
    """(images, smallest cosine between the two builds' vectors of the same path)."""
    from saefe.ingest.store import EmbeddingStore

    sa, sb = EmbeddingStore.open(a), EmbeddingStore.open(b)
    pa, pb = list(sa.metadata["path"]), list(sb.metadata["path"])
    if sorted(pa) != sorted(pb):
        return len(pa), float("nan")
    pos = {p: i for i, p in enumerate(pb)}
    va, vb = sa.vectors_f32(), sb.vectors_f32()[[pos[p] for p in pa]]
    return len(pa), float((va * vb).sum(axis=1).min())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="3000,12000")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", default="/tmp/saefe_bench_ray")
    ap.add_argument("--task-sizes", default="512,128", help="--ray-task-size values to run (the first is the default's row)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from saefe.demo.corpus import DemoConfig, generate_demo

    work = Path(args.work)
    sizes = [int(t) for t in args.task_sizes.split(",")]
    print(f"machine: {os.cpu_count()} CPUs")
    fixed = ray_fixed_cost()
    print("Ray's fixed cost (private 2-CPU cluster): " + ", ".join(f"{k} {v:.2f}s" for k, v in fixed.items()))
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        corpus = work / f"corpus{n}"
        if not (corpus / "images").is_dir():
            generate_demo(corpus, DemoConfig(n=n, seed=5), progress=False)
        settings = [0, *sizes]
        runs: dict[int, list[tuple[float, float]]] = {t: [] for t in settings}
        for _ in range(args.repeats):
            for t in settings:  # interleaved: every setting sees the same load
                runs[t].append(run_build(corpus / "images", work / f"index{n}-{t}", t))
        pw = statistics.median(w for w, _ in runs[0])
        pe = statistics.median(e for _, e in runs[0])
        rows.append([n, "plain", f"{pw:.1f}", "1.00x", f"{pe:.1f} ({n / pe:.0f}/s)", "", "",
                     " / ".join(f"{w:.1f}" for w, _ in runs[0])])
        for t in sizes:
            images, cos = same_index(work / f"index{n}-0", work / f"index{n}-{t}")
            rw = statistics.median(w for w, _ in runs[t])
            re_ = statistics.median(e for _, e in runs[t])
            rows.append([n, f"ray, tasks of {t}", f"{rw:.1f}", f"{rw / pw:.2f}x", f"{re_:.1f} ({n / re_:.0f}/s)",
                         f"{rw - pw:.1f}", f"{cos:.5f}", " / ".join(f"{w:.1f}" for w, _ in runs[t])])
    head = ["images", "build", "wall s", "vs plain", "build s", "extra s", "min cosine", "runs"]
    cells = [[str(c) for c in r] for r in [head, *rows]]
    w = [max(len(r[i]) for r in cells) for i in range(len(head))]
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w[j]) for j, c in enumerate(r)))
        if i == 0:
            print("  ".join("-" * x for x in w))
    print("median wall time of the whole command (fresh process: imports, scan, embed, index); build s = the "
          "build's own 'embedded this run' figure (for Ray: cluster start, actors' model load, streaming, shutdown)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
