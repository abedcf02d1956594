"""CLI glue."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from saefe.errors import SaefeError
import json
import numpy as np

import saefe.analysis.saliency as _saliency
import saefe.analysis.evaluate as _evaluate

log = logging.getLogger("saefe.cli")

# ---- from saefe.analysis.saliency

def saliency_arguments(p: argparse.ArgumentParser) -> None:
    from saefe.cli.search import add_engine_arguments

    add_engine_arguments(p)
    p.add_argument("--image", required=True, help="image file to explain")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--feature", action="append", metavar="ID[=W]",
                   help="an SAE feature (its decoder column); repeat to mix several")
    q.add_argument("--expr", help='label arithmetic, e.g. "Esteem - Male + Adult"')
    q.add_argument("--label", help="a label's mix, e.g. Esteem")
    p.add_argument("--n", type=int, default=_saliency.DEFAULT_N, help=f"noisy copies (default {_saliency.DEFAULT_N})")
    p.add_argument("--sigma", type=float, default=_saliency.DEFAULT_SIGMA,
                   help=f"noise scale, times std of the pixel tensor (default {_saliency.DEFAULT_SIGMA})")
    p.add_argument("--batch", type=int, default=8, help="copies per forward/backward pass")
    p.add_argument("--seed", type=int, default=0, help="noise seed (reproducible maps)")
    p.add_argument("--alpha", type=float, default=0.5, help="heat map opacity in the _saliency.overlay")
    p.add_argument("--cmap", default=_saliency.DEFAULT_CMAP, help="matplotlib colormap")
    p.add_argument("--out", required=True, help="output PNG (the _saliency.overlay)")
    p.add_argument("--heat-out", help="also save the raw heat map (.npy, or a greyscale image)")
    p.add_argument("--no-progress", action="store_true")


def _term(args):
    from saefe.search.engine import Term
    from saefe.cli.search import parse_feature

    if args.feature:
        return Term("features", dict(parse_feature(f) for f in args.feature))
    if args.expr:
        return Term("expr", args.expr)
    return Term("label", args.label)


def run_saliency(args: argparse.Namespace) -> int:
    from saefe.cli.search import open_engine

    if args.clip_server:
        raise SaefeError("saliency needs gradients through a local model; drop --clip-server")
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ""):
        log.warning("writing PNG data to %s", out)
    n, sigma, batch = _saliency._check_params(args.n, args.sigma, args.batch)
    image = _saliency.load_image(args.image)  # fail fast, before loading models
    engine = open_engine(args)
    term = _term(args)
    direction = engine.direction(engine.mix(term))
    encoder = engine.encoder

    from tqdm import tqdm

    bar = tqdm(total=n, desc="_saliency.smoothgrad", unit="copy", disable=args.no_progress)

    def step(done: int, total: int) -> None:
        bar.update(done - bar.n)

    try:
        heat = _saliency.smoothgrad(encoder, image, direction, n=n, sigma=sigma, progress=step, batch=batch, seed=args.seed)
    finally:
        bar.close()
    img = _saliency.overlay(image, heat, alpha=args.alpha, cmap=args.cmap)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        img.save(out, format="PNG")
        if args.heat_out:
            hp = Path(args.heat_out)
            if hp.suffix.lower() == ".npy":
                np.save(hp, heat)
            else:
                from PIL import Image

                Image.fromarray((heat * 255 + 0.5).astype(np.uint8), "L").save(hp)
    except OSError as e:
        raise SaefeError(f"cannot write {e.filename or out}: {e.strerror}") from None
    what = {"features": f"feature(s) {', '.join(args.feature or [])}", "expr": f"expression {args.expr!r}",
            "label": f"label {args.label!r}"}[term.kind]
    print(f"saliency of {what} on {args.image} ({heat.shape[1]}x{heat.shape[0]} model input, n={n}, "
          f"sigma={sigma:g}) -> {out}")
    return 0

# ---- from saefe.analysis.evaluate

def evaluate_arguments(p: argparse.ArgumentParser) -> None:
    from saefe.search.engine import DEMO_INDEX

    p.add_argument("--index", default=DEMO_INDEX, help=f"index dir (default {DEMO_INDEX})")
    p.add_argument("--sae", help="SAE dir (default: the one the index's build recorded)")
    p.add_argument("--labels", help="label profiles dir for the bias searches (default: SAE_DIR/labels)")
    p.add_argument("--model", help="encoder for the zero-shot text prompts (default: the index's)")
    p.add_argument("--annotations", help="EMOTIC-style CSV (Filename + 0/1 label columns, Gender, Age, VAD); "
                   "required except for --debias alone")
    p.add_argument("--test-fraction", type=float, default=0.3, help="share of annotated images held out (default 0.3)")
    p.add_argument("--seed", type=int, default=0, help="train/test split seed")
    p.add_argument("--penalty", choices=("l1", "l2"), default="l1", help="SAE probe regularisation (default l1)")
    p.add_argument("--C", type=float, default=1.0, help="inverse regularisation strength of the probes")
    p.add_argument("--only", nargs="+", metavar="LABEL", help="evaluate only these labels")
    p.add_argument("--prompts", help="zero-shot prompts: JSON {label: prompt} or CSV/TSV label,prompt")
    p.add_argument("--no-zero-shot", action="store_true", help="skip the text-prompt baseline")
    p.add_argument("--k", type=int, default=20, help="top-k for the bias measurement")
    p.add_argument("--bias-label", default=_evaluate.DEFAULT_BIAS_LABEL, help=f"label query (default {_evaluate.DEFAULT_BIAS_LABEL})")
    p.add_argument("--bias-expr", default=_evaluate.DEFAULT_BIAS_EXPR,
                   help=f'attenuating expression (default "{_evaluate.DEFAULT_BIAS_EXPR}"); "" to skip')
    p.add_argument("--no-bias", action="store_true", help="skip the bias measurement")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    d = p.add_argument_group("debias methods (on the index's true labels)")
    d.add_argument("--debias", nargs="?", const="default", metavar="M1,M2",
                   help="table of debias methods (default: none, seed arithmetic, ablate, project, rerank and "
                        "combinations) for --bias-label at k = 20 and 100; or a comma list, e.g. none,rerank,ablate+rerank")
    d.add_argument("--protect", default="gender", help="protected attributes for --debias (default gender)")
    d.add_argument("--target", default="corpus", help="--debias target: corpus, parity or Male=0.5,Female=0.5")
    d.add_argument("--most-skewed", action="store_true", help="--debias: evaluate the label most skewed on the first attribute")


def _run_debias_table(args: argparse.Namespace) -> int:
    from saefe.analysis.debias_eval import DEFAULT_METHODS, evaluate_debias, format_debias
    from saefe.search.debias import parse_protect
    from saefe.search.engine import Engine

    engine = Engine.open(args.index, sae_dir=args.sae, labels_dir=args.labels, model=args.model)
    methods = DEFAULT_METHODS if args.debias == "default" else [m.strip() for m in args.debias.split(",") if m.strip()]
    ks = sorted({20, 100} if args.k == 20 else {args.k})
    ev = evaluate_debias(engine, None if args.most_skewed else args.bias_label, parse_protect(args.protect), ks,
                         methods, args.target)
    if args.json:
        json.dump(_evaluate._clean(ev.to_dict()), sys.stdout, indent=1)
        print()
    else:
        print(format_debias(ev))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    import pandas as pd

    from saefe.labels.annotations import read_annotations
    from saefe.search.engine import Engine, _check_k

    k = _check_k(args.k)
    if args.debias and not args.annotations:
        return _run_debias_table(args)
    if not args.annotations:
        raise SaefeError("--annotations is required (except for --debias alone)")
    if not 0.0 < args.test_fraction < 1.0:
        raise SaefeError(f"--test-fraction must be strictly between 0 and 1, got {args.test_fraction}")
    engine = Engine.open(args.index, sae_dir=args.sae, labels_dir=args.labels, model=args.model)
    engine.require_sae()
    membership = read_annotations(args.annotations, engine.store)
    from saefe.demo.corpus import DEMO_TEXT_PROMPTS

    # the demo's labels have hand-written prompts; a user's file overrides them
    overrides = {lab: p for lab, p in DEMO_TEXT_PROMPTS.items() if lab in membership.labels}
    if args.prompts:
        from saefe.labels.prompts import read_prompts

        overrides.update(read_prompts(args.prompts))
    rep = _evaluate.EvalReport(0, 0, 0, args.seed, args.penalty, float(args.C))
    _evaluate.evaluate_labels(engine, membership, args.test_fraction, args.seed, args.penalty, args.C, labels=args.only,
                    prompts=overrides, zero_shot=not args.no_zero_shot, report=rep)
    if not args.no_bias:
        if engine.profiles is None:
            rep.notes.append("bias skipped: no label profiles for this SAE (build them with `saefe labels`)")
        else:
            attrs = pd.DataFrame(membership.matrix.astype(np.uint8), columns=list(membership.labels))
            _evaluate.evaluate_bias(engine, attrs, args.bias_label, args.bias_expr or None, k, report=rep)
    if args.json:
        json.dump(rep.to_dict(), sys.stdout, indent=1)
        print()
    else:
        print(_evaluate.format_report(rep))
    if args.debias:
        print()
        return _run_debias_table(args)
    return 0
