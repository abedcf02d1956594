"""Engine benchmark: search quality on the demo corpus (its true attributes are known) and query
latency of both search modes, on the demo and on a 1M-image synthetic SAE-code corpus.

Tables:
  1. precision@20 of a label search for every emotion label (ground truth = attributes.parquet),
     direction vs features mode, with the label's sliders from steer's features="nonzero" (the
     engine's default) vs features="top" (the seed UI's top-10 distinct + shared sliders);
  2. demographic share of the top-20 for Esteem vs Esteem - Male + Adult (and - Male + Female);
  3. latency p50/p99 of each mode on the demo (end to end through Engine.search);
  4. feature-mode latency on 1M images (synthetic codes: d_hidden 262144, k 128, power-law
     feature frequency, built directly as CSC) for 10-feature mixes by postings touched, for the
     ranker's sort / dense / auto merges against a brute-force codes @ w baseline, same run.
     Direction mode at 1M (FAISS flat / IVF / HNSW) is measured by benchmarks/bench_index.py.

    SAEFE_HOME=/tmp/saefe_home python benchmarks/bench_engine.py [--index index/demo] [--n-synth 1000000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from procstat import table  # noqa: E402

from saefe.search.feature_rank import FeatureRanker  # noqa: E402

DEMOGRAPHIC = ["Male", "Female", "Kid", "Teenager", "Adult"]


def pct(ts) -> tuple[float, float]:
    a = np.asarray(ts) * 1000
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


# -- demo quality ----------------------------------------------------------------------------


def demo_quality(engine, k: int = 20) -> None:
    from saefe.search.mix import FeatureMix, evaluate_expression

    try:
        from saefe.demo.corpus import DEMO_EMOTIONS
    except ImportError:
        DEMO_EMOTIONS = []
    attrs = engine.attributes
    prof = engine.profiles
    emotions = [l for l in prof.labels if l in DEMO_EMOTIONS] or [l for l in prof.labels if l not in DEMOGRAPHIC and " " not in l]
    h = engine.sae.config.d_hidden

    def run(mix, mode):
        if mode == "direction":
            res = engine.search_vector(engine.direction(mix), k)
        else:
            res = engine.search_features(mix, k)
        return np.array([r.id for r in res], dtype=np.int64)

    rows, sums = [], {}
    for lab in emotions:
        truth = attrs[lab].to_numpy().astype(bool)
        row = [lab, f"{truth.mean():.0%}"]
        for feats in ("nonzero", "top"):
            mix = FeatureMix(d_hidden=h).apply_label(prof, lab, features=feats)
            for mode in ("direction", "features"):
                p = truth[run(mix, mode)].mean()
                sums.setdefault((feats, mode), []).append(p)
                row.append(f"{p:.2f}")
            row.append(len(mix))
        rows.append(row)
    rows.append(["mean", ""] + sum([[f"{np.mean(sums[(f, 'direction')]):.3f}", f"{np.mean(sums[(f, 'features')]):.3f}", ""]
                                    for f in ("nonzero", "top")], []))
    print(f"\n## 1. precision@{k} of a label search on the demo ({len(attrs)} images; base = label's share)\n")
    print(table(rows, ["label", "base", "nonzero:dir", "nonzero:feat", "#sl", "top:dir", "top:feat", "#sl"]))
    best = max(sums, key=lambda key: np.mean(sums[key]))
    print(f"\nbest on average: features={best[0]!r}, mode={best[1]!r} ({np.mean(sums[best]):.3f}); "
          f"engine default label term = apply_label(features='nonzero')")

    print(f"\n## 2. demographic share of the top-{k} (corpus base rates in the first row)\n")
    base = attrs[DEMOGRAPHIC].mean()
    rows = [["corpus", "", "", ""] + [f"{base[g]:.0%}" for g in DEMOGRAPHIC] + ["", ""]]
    from saefe.search.bias import measure_bias

    for q in ("Esteem", "Esteem - Male + Adult", "Esteem - Male + Female", "Esteem - 2*Male + 2*Female"):
        for feats in ("nonzero", "top"):
            mix = evaluate_expression(q, prof, features=feats)
            for mode in ("direction", "features"):
                ids = run(mix, mode)
                sh = attrs[DEMOGRAPHIC].to_numpy()[ids].mean(axis=0)
                b = measure_bias(ids, attrs)
                prec = attrs["Esteem"].to_numpy()[ids].mean()
                rows.append([q, feats, mode, f"{prec:.0%}"] + [f"{s:.0%}" for s in sh]
                            + [f"{b.max_skew['gender']:+.2f}", f"{b.max_skew['age']:+.2f}"])
    print(table(rows, ["query", "sliders", "mode", "Esteem"] + DEMOGRAPHIC + ["skew:gender", "skew:age"]))


def demo_latency(engine, n_queries: int = 200, k: int = 20) -> None:
    from saefe.search.engine import Term

    labs = engine.labels
    rng = np.random.default_rng(0)
    h = engine.sae.config.d_hidden
    engine.ranker  # noqa: B018 - load codes once, outside the timing
    engine.search([Term("label", labs[0])], k=k, mode="direction")
    rows = []
    for name, make in (
        ("label", lambda i: [Term("label", labs[i % len(labs)])]),
        ("expr (3 labels)", lambda i: [Term("expr", f"{labs[i % len(labs)]} - Male + Adult")]),
        ("10 features", lambda i: [Term("features", {int(f): 1.0 for f in rng.choice(h, 10, replace=False)})]),
    ):
        for mode in ("direction", "features"):
            ts = []
            for i in range(n_queries):
                terms = make(i)
                t = time.perf_counter()
                engine.search(terms, k=k, mode=mode)
                ts.append(time.perf_counter() - t)
            p50, p99 = pct(ts)
            rows.append([name, mode, f"{p50:.2f}", f"{p99:.2f}"])
    print(f"\n## 3. demo latency, end to end through Engine.search (k={k}, {n_queries} queries, ms)\n")
    print(table(rows, ["query", "mode", "p50", "p99"]))


# -- 1M synthetic codes ----------------------------------------------------------------------


def power_law_freq(h: int, k: int, alpha: float, cap: float) -> np.ndarray:
    """Per-feature firing frequency ~ rank^-alpha, capped, summing to k (mean active per image)."""
    r = np.arange(1, h + 1, dtype=np.float64) ** -alpha
    lo, hi = 0.0, 1e6
    for _ in range(100):
        c = (lo + hi) / 2
        if np.minimum(cap, c * r).sum() > k:
            hi = c
        else:
            lo = c
    return np.minimum(cap, lo * r)


def synthetic_csc(n: int, h: int = 262144, k: int = 128, alpha: float = 0.8, cap: float = 0.05, seed: int = 0):
    """CSC (n, h) codes built column by column: feature j's postings are a Bernoulli(freq_j) subset
    of the rows (geometric gaps: sorted, distinct), values ~ Exp(1) as float32."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    freq = rng.permutation(power_law_freq(h, k, alpha, cap))
    expect = np.maximum(1, np.round(freq * n * 1.02 + 3 * np.sqrt(freq * n) + 3)).astype(np.int64)
    indices_parts, counts = [], np.zeros(h, np.int64)
    block = 8192
    for lo in range(0, h, block):
        hi = min(h, lo + block)
        m = expect[lo:hi]
        p = np.repeat(freq[lo:hi], m)
        gaps = rng.geometric(p).astype(np.int64)
        seg = np.repeat(np.arange(hi - lo), m)
        starts = np.concatenate([[0], np.cumsum(m)[:-1]])
        cs = np.cumsum(gaps)
        cs -= np.repeat(cs[starts] - gaps[starts], m)  # per-feature cumulative sum
        rows = cs - 1
        keep = rows < n
        indices_parts.append(rows[keep].astype(np.int32))
        counts[lo:hi] = np.bincount(seg[keep], minlength=hi - lo)
    indices = np.concatenate(indices_parts)
    del indices_parts
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    data = rng.exponential(size=len(indices)).astype(np.float32)
    return sp.csc_matrix((data, indices, indptr), shape=(n, h)), freq


def synth_latency(n: int, k: int = 20, n_queries: int = 200) -> None:
    from saefe.search.feature_rank import brute_force_rank

    t0 = time.perf_counter()
    csc, freq = synthetic_csc(n)
    gen_s = time.perf_counter() - t0
    counts = np.diff(csc.indptr)
    print(f"\n## 4. feature mode on {n:,} synthetic images (d_hidden {csc.shape[1]:,}, mean "
          f"{csc.nnz / n:.1f} active/image, {csc.nnz / 1e6:.0f}M non-zeros, {(csc.data.nbytes + csc.indices.nbytes) / 2**30:.2f} GiB; "
          f"generated in {gen_s:.1f}s)")
    print(f"posting list length: median {np.median(counts):.0f}, p90 {np.percentile(counts, 90):.0f}, "
          f"p99 {np.percentile(counts, 99):.0f}, max {counts.max():,}\n")
    ranker = FeatureRanker(csc, n)
    rng = np.random.default_rng(1)
    order = np.argsort(counts)
    rows = []
    # 10-feature mixes: uniform feature ids (what a random slider pick touches), then mixes whose
    # features have ~T/10 postings each (T = postings touched), up to the most frequent features.
    scenarios = [("uniform ids", None)] + [(f"~{t:,} postings", t) for t in (1_000, 10_000, 100_000, 1_000_000)]
    for name, target in scenarios:
        mixes = []
        nq = n_queries if (target or 0) < 1_000_000 else max(20, n_queries // 5)
        for _ in range(nq):
            if target is None:
                ids = rng.choice(csc.shape[1], 10, replace=False)
            else:
                centre = np.searchsorted(counts[order], target // 10)
                lo, hi = max(0, centre - 200), min(len(order), centre + 200)
                ids = rng.choice(order[lo:hi], 10, replace=False)
            ws = rng.uniform(0.1, 1.0, 10) * np.where(rng.random(10) < 0.2, -1, 1)
            mixes.append((np.sort(ids), ws))
        touched = np.median([ranker.n_postings(i) for i, _ in mixes])
        row = [name, f"{touched:,.0f}"]
        for method in ("sort", "dense", "auto"):
            ranker.rank(*mixes[0], k, method=method)  # warm (allocates the dense buffer once)
            ts = []
            for ids, ws in mixes:
                t = time.perf_counter()
                ranker.rank(ids, ws, k, method=method)
                ts.append(time.perf_counter() - t)
            p50, p99 = pct(ts)
            row += [f"{p50:.3f}", f"{p99:.3f}"]
        ts = []
        for ids, ws in mixes[:5]:  # brute force: full sparse mat-vec over every image
            t = time.perf_counter()
            w = np.zeros(csc.shape[1], np.float32)
            w[ids] = ws
            s = csc @ w
            top = np.argpartition(-s, k)[:k]
            top[np.lexsort((top, -s[top]))]
            ts.append(time.perf_counter() - t)
        row.append(f"{np.median(ts) * 1000:.0f}")
        if True:  # exactness against brute force (ties by id), every scenario
            for ids, ws in mixes[:2]:
                bi, _ = brute_force_rank(csc, ids, ws, k, n)
                assert np.array_equal(ranker.rank(ids, ws, k)[0], bi), f"mismatch in {name}"
        rows.append(row)
    print(table(rows, ["10-feature mix", "postings", "sort p50", "p99", "dense p50", "p99", "auto p50", "p99",
                       "brute p50"]))
    print("(ms; k=20; sort = np.unique merge, dense = preallocated score buffer + touched list, "
          "auto = dense from max(20k, N/4) postings; brute = codes @ w over all images + top-k; "
          "every scenario checked equal to brute force incl. tie order)")
    print("direction mode at 1M (FAISS flat / IVF / HNSW over 1152-d vectors): see benchmarks/bench_index.py")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", default="index/demo")
    ap.add_argument("--n-synth", type=int, default=1_000_000, help="synthetic corpus size (0: skip)")
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    if args.index and os.path.exists(args.index):
        from saefe.search.engine import Engine

        engine = Engine.open(args.index)
        if engine.attributes is None or engine.profiles is None:
            print(f"{args.index} has no attributes.parquet or label profiles; skipping the demo tables")
        else:
            demo_quality(engine)
            demo_latency(engine, args.queries)
    else:
        print(f"no index at {args.index}; build the demo with `python scripts/build_index.py`")
    if args.n_synth:
        synth_latency(args.n_synth, n_queries=args.queries)
    print(f"\ntotal benchmark time {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
