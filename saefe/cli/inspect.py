"""``saefe inspect``: a feature's top and bottom images, activation frequency and tied labels."""

from __future__ import annotations

import argparse
import json
import sys

from saefe.cli.search import add_engine_arguments, open_engine


def inspect_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    p.add_argument("feature", type=int, help="feature id")
    p.add_argument("--k", type=int, default=8, help="images at each end")
    p.add_argument("--json", action="store_true")


def run_inspect(args: argparse.Namespace) -> int:
    rep = open_engine(args).inspect_feature(args.feature, args.k)
    if args.json:
        json.dump({"feature": rep.feature, "frequency": rep.frequency, "labels": rep.labels,
                   "top": [r.to_json() for r in rep.top], "bottom": [r.to_json() for r in rep.bottom]},
                  sys.stdout, indent=1)
        print()
        return 0
    freq = "unknown" if rep.frequency is None else f"{rep.frequency:.2%}"
    print(f"feature {rep.feature}: fires on {freq} of images")
    print("most tied labels: " + (", ".join(f"{l} ({s:+.3f})" for l, s in rep.labels) or "none"))
    for title, rows in (("top", rep.top), ("bottom", rep.bottom)):
        print(f"{title} (pre-activation):")
        for r in rows:
            print(f"  {r.score:+.4f}  id={r.id:<8d} {r.metadata.get('path') or r.metadata.get('url') or ''}")
    return 0
