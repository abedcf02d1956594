"""``saefe audit LABEL --protect gender``: the label's top features, each one's tie to the
protected attribute and an example strip, flagging the ones that carry the bias (the features
``--debias ablate`` zeroes)."""

from __future__ import annotations

import argparse
import json
import sys

from saefe.errors import SaefeError


def audit_arguments(p: argparse.ArgumentParser) -> None:
    from saefe.analysis.audit import DEFAULT_THRESHOLD
    from saefe.cli.search import add_engine_arguments

    p.add_argument("label", help="the label to audit, e.g. Esteem")
    add_engine_arguments(p)
    p.add_argument("--protect", required=True, metavar="ATTR[,ATTR]", help="protected attribute(s), e.g. gender")
    p.add_argument("--top", type=int, default=10, help="features listed (the label's largest mean activations)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"|excess share| that flags a feature (default {DEFAULT_THRESHOLD})")
    p.add_argument("--examples", type=int, default=5, help="images in each feature's example strip")
    p.add_argument("--json", action="store_true", help="print the audit as JSON")


def run_audit(args: argparse.Namespace) -> int:
    from saefe.analysis.audit import audit_label, format_audit
    from saefe.cli.search import open_engine
    from saefe.search.debias import parse_protect

    if args.top < 1:
        raise SaefeError(f"--top must be at least 1, got {args.top}")
    attrs = parse_protect(args.protect)
    if not attrs:
        raise SaefeError("--protect needs an attribute, e.g. gender")
    engine = open_engine(args)
    reports = [audit_label(engine, args.label, a, top=args.top, threshold=args.threshold, examples=args.examples)
               for a in attrs]
    if args.json:
        json.dump([r.to_dict() for r in reports], sys.stdout, indent=1)
        print()
    else:
        print("\n\n".join(format_audit(r) for r in reports))
    return 0
