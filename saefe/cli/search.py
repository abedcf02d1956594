"""``saefe search``: ranked images as JSON (or a table) for a label, expression, features,
text or image query, in direction or exact feature-space mode."""

from __future__ import annotations

import argparse
import json
import sys

from saefe.search.dedup import dedup_option
from saefe.search.engine import DEMO_INDEX, MODES, Engine, Term
from saefe.errors import SaefeError


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", default=DEMO_INDEX, help=f"index dir (default {DEMO_INDEX})")
    p.add_argument("--sae", help="SAE dir (default: the one the index's build recorded)")
    p.add_argument("--labels", help="label profiles dir (default: SAE_DIR/labels)")
    p.add_argument("--model", help="encoder for text/image queries (default: the index's)")
    p.add_argument("--clip-server", help="embed text/image queries through this clip_server URL")
    p.add_argument("--backend", help="search a running meme-search-engine backend at this URL instead of the local index")


def open_engine(args: argparse.Namespace) -> Engine:
    return Engine.open(args.index, sae_dir=args.sae, labels_dir=args.labels, model=args.model,
                       clip_server=args.clip_server, backend=getattr(args, "backend", None))


def parse_feature(spec: str) -> tuple[int, float]:
    """``ID=W`` (or a bare ``ID``, weight 1)."""
    fid, _, w = spec.partition("=")
    try:
        return int(fid.strip().lstrip("#f")), float(w) if w else 1.0
    except ValueError:
        raise SaefeError(f"bad --feature {spec!r}: expected ID=WEIGHT, e.g. 123=0.5") from None


def terms_from_args(args: argparse.Namespace) -> list[Term]:
    terms: list[Term] = []
    if args.label:
        terms.append(Term("label", args.label))
    if args.expr:
        terms.append(Term("expr", args.expr))
    if args.feature:
        terms.append(Term("features", dict(parse_feature(f) for f in args.feature)))
    if args.text:
        terms.append(Term("text", args.text, args.text_weight))
    if args.image:
        try:
            with open(args.image, "rb") as f:
                terms.append(Term("image", f.read(), args.image_weight))
        except OSError as e:
            raise SaefeError(f"cannot read --image {args.image}: {e.strerror}") from None
    if not terms:
        raise SaefeError("give a query: --label, --expr, --feature ID=W, --text or --image")
    return terms


def search_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    q = p.add_argument_group("query (terms are combined)")
    q.add_argument("--label", help="a label's mix, e.g. Esteem")
    q.add_argument("--expr", help='label arithmetic, e.g. "Esteem - Male + Adult" or "Excitement + 0.5*Peace"')
    q.add_argument("--feature", action="append", metavar="ID=W", help="a feature with a weight (repeatable)")
    q.add_argument("--text", help="text query")
    q.add_argument("--text-weight", type=float, default=1.0)
    q.add_argument("--image", help="image file query")
    q.add_argument("--image-weight", type=float, default=1.0)
    p.add_argument("--mode", choices=MODES, default="direction",
                   help="direction: cosine to the mixed decoder direction; features: exact sum_j w_j a_j(image)")
    p.add_argument("--k", type=int, default=20, help="number of results")
    p.add_argument("--offset", type=int, default=0, help="skip this many results (paging: --offset 20 for page 2)")
    p.add_argument("--where", action="append", metavar="COND", default=[],
                   help="metadata filter, repeatable (all must hold): subreddit=pics, 'width>=512', 'path=memes/*', "
                        "'subreddit=pics|aww', 'date<2024-06-01'")
    p.add_argument("--dedup-threshold", type=float, default=None,
                   help="collapse near-duplicates at this cosine, keeping the best of each group "
                        "(default: the index's setting, else 0.95)")
    p.add_argument("--no-dedup", action="store_true", help="show near-duplicates as separate results")
    p.add_argument("--export", metavar="FILE", help="also write the results to FILE (.csv or .json: paths, scores, features)")
    p.add_argument("--json", action="store_true", help="print a JSON list of {id, score, path/url, ...}")
    p.add_argument("--bias", action="store_true", help="also print the demographic make-up of the results")
    add_debias_arguments(p)


def add_debias_arguments(p: argparse.ArgumentParser) -> None:
    from saefe.search.debias import DEFAULT_POOL, METHODS

    d = p.add_argument_group("bias attenuation")
    d.add_argument("--debias", metavar="METHOD", help=f"{', '.join(METHODS)} or a combination like ablate+rerank")
    d.add_argument("--protect", metavar="ATTR[,ATTR]", help="protected attributes, e.g. gender or gender,age")
    d.add_argument("--target", default="corpus", help="group shares to aim for: corpus (default), parity or Male=0.5,Female=0.5")
    d.add_argument("--pool", type=int, default=DEFAULT_POOL,
                   help=f"rerank: candidates re-ranked; ablate/project: where the query's neighbourhood is sought (default {DEFAULT_POOL})")
    d.add_argument("--ablate-threshold", type=float,
                   help="ablate: corpus-wide |excess share| that ties a feature to the attribute (0.2); features that "
                        "separate the groups among the query's nearest images (Cohen's d >= 0.5) are tied too")
    d.add_argument("--no-calibrate", action="store_true",
                   help="ablate/project at full strength (features removed, plain projection) instead of the least "
                        "strength that meets the target")


def debias_from_args(args: argparse.Namespace):
    """A DebiasConfig, or None without --debias (then --protect/--target are refused)."""
    from saefe.search.debias import DebiasConfig

    if not getattr(args, "debias", None):
        if getattr(args, "protect", None):
            raise SaefeError("--protect goes with --debias METHOD (rerank, ablate, project)")
        return None
    return DebiasConfig.parse(args.debias, args.protect, args.target, pool=args.pool,
                              threshold=args.ablate_threshold, calibrate=not args.no_calibrate)


def describe_debias(info) -> str:
    parts = [f"debias {'+'.join(info.methods)} protecting " + ", ".join(f"{a} ({info.sources[a]})" for a in info.protect)]
    parts.append("target " + "; ".join(f"{a}: " + ", ".join(f"{g} {s:.0%}" for g, s in t.items())
                                       for a, t in info.targets.items()))
    if info.ablated:
        strength = info.ablation.get("strength", 1.0) if info.ablation else 1.0
        parts.append(f"ablated {strength:.0%} of {len(info.ablated)} features' weight "
                     f"({', '.join(f'f{f}' for f in info.ablated[:8])}{', ...' if len(info.ablated) > 8 else ''})")
    if info.projection:
        parts.append(f"projection lambda {info.projection['lambda']:.2f} (cosine to the query {info.projection['cosine_to_query']:.3f})")
    if info.rerank:
        parts.append(f"re-ranked {info.rerank['pool']} candidates")
    if info.met is not None:
        parts.append("target met" if info.met else "target NOT met")
    return "; ".join(parts) + "".join(f"\nnote: {n}" for n in info.notes)


def run_search(args: argparse.Namespace) -> int:
    from saefe.search.filters import Filter

    debias = debias_from_args(args)
    where = Filter.parse(args.where)  # a bad condition fails before the index is opened
    if debias is not None and (where or args.offset):
        raise SaefeError("--where and --offset do not combine with --debias yet")
    engine = open_engine(args)
    terms = terms_from_args(args)
    page = None
    if debias is not None:  # fair re-ranking reorders whole lists: no paging or collapse on top
        results = engine.search(terms, k=args.k, mode=args.mode, debias=debias)
    else:
        page = engine.search_page(terms, k=args.k, mode=args.mode, offset=args.offset, where=where,
                                  dedup=dedup_option(args.dedup_threshold, on=not args.no_dedup))
        results = page.results
    info = getattr(results, "info", None)
    if args.export:
        from saefe.search.export import export_results

        print(f"wrote {export_results(engine, results, args.export, offset=args.offset)}", file=sys.stderr)
    if args.json:
        payload = [r.to_json() for r in results]
        if args.bias or info is not None:
            payload = {"results": payload}
            if args.bias:
                payload["bias"] = engine.bias(results).by_attribute()
            if info is not None:
                payload["debias"] = info.to_dict()
                if args.bias:
                    plain = engine.search(terms, k=args.k, mode=args.mode)
                    payload["bias_before"] = engine.bias(plain).by_attribute()
        json.dump(payload, sys.stdout, indent=1)
        print()
        return 0
    for rank, r in enumerate(results, args.offset + 1):
        name = r.metadata.get("path") or r.metadata.get("url") or ""
        dup = f"  (+{len(r.group) - 1} near-duplicates)" if r.group and len(r.group) > 1 else ""
        print(f"{rank:4d}  {r.score:+.4f}  id={r.id:<8d} {name}{dup}")
    if page is not None and page.matching is not None:
        print(f"filter {page.filter}: {page.matching} of {engine.n_total} images match")
    if page is not None and page.has_more:
        print(f"more: --offset {page.next_offset}")
    if info is not None:
        print(describe_debias(info))
    if args.bias:
        rep = engine.bias(results)
        for attr, shares in rep.shares.items():
            parts = ", ".join(f"{g} {s:.0%} (corpus {rep.base_rates[attr][g]:.0%})" for g, s in shares.items())
            src = f" [{rep.sources.get(attr, 'labels')}]" if rep.estimated.get(attr) else ""
            print(f"{attr}{src}: {parts}; MaxSkew {rep.max_skew[attr]:+.2f}, NDKL {rep.ndkl[attr]:.3f}")
    return 0
