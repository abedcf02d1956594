"""Debias benchmark: bias attenuation methods on a labelled corpus, and on a second corpus that has
no annotations at all (demographics estimated by the probes).

Tables:
  1. per method (the seed's label query, its arithmetic variants, ablate, project, rerank and
     combinations) at k = 20 and 100, for the label most skewed on gender (or --label): label
     precision, group shares, |gap| to the corpus share, MaxSkew, NDKL, query latency
     (saefe.analysis.debias_eval, the same as `saefe evaluate --debias`);
  2. how far the calibrated projection moves the other labels' queries (cosine to the original
     query, top-20 overlap with the undebiased results, the lambda it picked);
  3. second corpus: a plain image folder drawn from another demo seed, indexed with the same
     encoder and searched with the first corpus' SAE, profiles and probes: estimated vs true male
     share of a top-50, probe accuracy there, and rerank / project+rerank judged on the truth.
  Then the issue's targets, each with PASS / MISS.

Re-runnable on any demo build (the lead re-runs it on the final demo):

    python -m saefe.cli.main build --out /tmp/d/index --sae-out /tmp/d/weights
    python benchmarks/bench_debias.py --index /tmp/d/index --work /tmp/d/second
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from procstat import table  # noqa: E402


def unrelated_queries(engine, skip: str, k: int = 20) -> None:
    from saefe.search.debias import DebiasConfig
    from saefe.search.engine import Term

    attrs = engine.attributes
    demo = {g for gs in engine.demographics.groups().values() for g in gs}
    labels = [l for l in engine.profiles.labels if l not in demo and l != skip and " " not in l and l in attrs.columns]
    cfg = DebiasConfig.parse("project", ["gender"])
    rows = []
    for l in labels:
        q0 = engine.query_vector([Term("label", l)])
        plain = [r.id for r in engine.search([Term("label", l)], k=k)]
        res = engine.search([Term("label", l)], k=k, debias=cfg)
        p = res.info.projection
        truth = attrs[l].to_numpy().astype(bool)
        male = attrs["Male"].to_numpy().astype(bool)
        ids = [r.id for r in res]
        rows.append([l, f"{p['lambda']:.2f}", f"{p['cosine_to_query']:.3f}", f"{len(set(plain) & set(ids)) / k:.0%}",
                     f"{male[plain].mean():.0%} -> {male[ids].mean():.0%}", f"{truth[plain].mean():.0%} -> {truth[ids].mean():.0%}"])
        del q0
    print(f"\n2. calibrated projection (gender) on the other labels' queries, k = {k}")
    print(table(rows, ["label", "lambda", "cos(q, q')", "top-k overlap", "male share", "precision"]))


def second_corpus(engine, work: Path, seed: int, n: int, label: str, force: bool) -> dict:
    """Build (once) a plain folder index from another demo seed; evaluate estimates and rerank."""
    import pandas as pd

    from saefe.demo.corpus import DemoConfig, generate_demo
    from saefe.ingest.build import BuildConfig, build_index
    from saefe.search.bias import measure_demographics
    from saefe.search.debias import DebiasConfig
    from saefe.search.engine import Engine, Term

    work.mkdir(parents=True, exist_ok=True)
    corpus = generate_demo(work / "corpus", DemoConfig(n=n, seed=seed), progress=False)
    t0 = time.time()
    build_index(BuildConfig(out=str(work / "index"), images=str(corpus.images_dir), model=engine.info.model_id,
                            progress=False, force=force))
    est_file = work / "index" / "estimated_demographics.parquet"
    if force and est_file.exists():
        est_file.unlink()
    e2 = Engine.open(work / "index", sae_dir=engine.sae_dir)
    print(f"\n3. second corpus: {n} images of demo seed {seed} as a plain folder ({work / 'index'}, built/opened in "
          f"{time.time() - t0:.1f}s); no annotations; SAE, profiles and probes from {engine.sae_dir}")
    dem = e2.demographics
    print(f"   demographics: {dem.describe_available()}")
    ann = pd.read_csv(corpus.annotations)  # truth, read only to judge the estimates
    by_name = dict(zip(ann["Filename"], range(len(ann))))
    order = [by_name[os.path.basename(str(p))] for p in e2.store.metadata["path"]]
    truth = ann.iloc[order].reset_index(drop=True)
    male = (truth["Gender"] == "Male").to_numpy()
    lab = truth[label].to_numpy().astype(bool)
    g = dem.attributes["gender"]
    acc = float(((g.hard() == 0) == male).mean())
    print(f"   gender probe accuracy on this corpus: {acc:.1%}; true corpus male share {male.mean():.1%}, "
          f"estimated {g.base_rates()[0]:.1%}")
    print(f"   {label} images: {int(lab.sum())}, of them {int((lab & ~male).sum())} female: a top-100 at the corpus "
          f"share needs ~{round(100 * (1 - male.mean()))} female {label} images")
    out = {"corpus_male": float(male.mean()), "probe_accuracy": acc}
    rows = []
    for name, spec in [("none", None), ("rerank", "rerank"), ("ablate", "ablate"), ("project", "project"),
                       ("project+rerank", "project+rerank")]:
        cfg = DebiasConfig.parse(spec, ["gender"]) if spec else None
        for k in (20, 50, 100):
            res = e2.search([Term("label", label)], k=k, debias=cfg)
            ids = np.array([r.id for r in res])
            est = measure_demographics(ids, dem).shares["gender"]["Male"]
            rows.append([name, k, f"{est:.0%}", f"{male[ids].mean():.0%}", f"{abs(est - male[ids].mean()):.2f}",
                         f"{abs(male[ids].mean() - male.mean()):.2f}", f"{lab[ids].mean():.0%}"])
            out[(name, k)] = {"est": est, "true": float(male[ids].mean()), "prec": float(lab[ids].mean())}
    print(table(rows, ["method", "k", "male (est.)", "male (true)", "|est-true|", "|true-corpus|", f"{label} prec"]))
    return out


def main(argv=None) -> int:
    from saefe.analysis.debias_eval import evaluate_debias, format_debias
    from saefe.search.engine import Engine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", default="index/demo")
    ap.add_argument("--sae", help="SAE dir (default: the index's)")
    ap.add_argument("--label", help="label to debias (default: the most skewed on gender)")
    ap.add_argument("--work", default="/tmp/saefe_bench_debias", help="where the second corpus is built")
    ap.add_argument("--second-seed", type=int, default=1)
    ap.add_argument("--second-n", type=int, default=3000, help="images in the second corpus (the demo's size: "
                    "smaller ones hold too few images of the label's minority group for a fair top-100)")
    ap.add_argument("--no-second", action="store_true")
    ap.add_argument("--force", action="store_true", help="rebuild the second corpus' index and estimates")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    engine = Engine.open(args.index, sae_dir=args.sae)
    print(f"index {args.index}: {len(engine.store)} images, SAE {engine.sae_dir} (d_hidden {engine.sae.config.d_hidden})")
    ev = evaluate_debias(engine, args.label, ["gender"], (20, 100))
    print("\n1. " + format_debias(ev))
    unrelated_queries(engine, ev.label)
    sec = None if args.no_second else second_corpus(engine, Path(args.work), args.second_seed, args.second_n,
                                                     ev.label, args.force)
    corpus = ev.base_rates["gender"]["Male"]

    def rows_of(method, mode="direction"):
        return {r.k: r for r in ev.rows if r.method == method and r.mode == mode}

    print("\ntargets (demo, label %r, protecting gender, corpus male share %.0f%%):" % (ev.label, 100 * corpus))
    rr = rows_of("rerank")
    for k, r in sorted(rr.items()):
        ok = r.gap <= 0.10 and r.precision >= 0.95
        print(f"  rerank k={k}: |gap| {r.gap:.2f} <= 0.10, precision {r.precision:.0%} >= 95%: {'PASS' if ok else 'MISS'}")
    for m in ("project+rerank", "ablate+rerank"):
        for k, r in sorted(rows_of(m).items()):
            print(f"  ({m} k={k}: |gap| {r.gap:.2f}, precision {r.precision:.0%})")
    for k in (20, 100):
        cands = [rows_of(m).get(k) for m in ("ablate", "project", "ablate+project")] + [rows_of("ablate", "features").get(k)]
        cands = [r for r in cands if r is not None]
        for r in cands:
            print(f"  ({r.method} ({r.mode}) k={k}: |gap| {r.gap:.2f}, precision {r.precision:.0%}: "
                  f"{'meets' if r.gap <= 0.15 and r.precision >= 0.90 else 'misses'} 0.15 at 90%)")
        ok = [r for r in cands if r.gap <= 0.15 and r.precision >= 0.90]
        best = min(cands, key=lambda r: (r.gap > 0.15 or r.precision < 0.9, r.gap, -r.precision))
        stretch = any(r.gap <= 0.10 and r.precision >= 0.95 for r in cands)
        print(f"  best of ablate/project k={k}: {best.method} ({best.mode}) |gap| {best.gap:.2f}, precision "
              f"{best.precision:.0%}: {'PASS' if ok else 'MISS'} (stretch 0.10 at 95%: {'PASS' if stretch else 'MISS'})")
    if sec:
        r = sec[("none", 50)]
        print(f"  second corpus top-50 estimated male share {r['est']:.0%} vs true {r['true']:.0%}: "
              f"{'PASS' if abs(r['est'] - r['true']) <= 0.10 else 'MISS'}")
        for k in (20, 100):
            r = sec[("rerank", k)]
            ok = abs(r["true"] - sec["corpus_male"]) <= 0.10 and r["prec"] >= 0.95
            print(f"  second corpus rerank k={k}: true |gap| {abs(r['true'] - sec['corpus_male']):.2f}, precision "
                  f"{r['prec']:.0%}: {'PASS' if ok else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
