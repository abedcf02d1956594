#!/usr/bin/env python
"""Regenerate docs/screenshots/*.png from the demo index (index/demo, built by
scripts/build_index.py) in headless Chromium.

It runs tests/test_app_browser.py against that index, so the screenshots come from exactly the
clicks the browser test checks (Debian's /usr/bin/chromium driven by Playwright; no browser
download). Options: --index DIR, --out DIR.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--index", default=str(REPO / "index" / "demo"))
    p.add_argument("--out", default=str(REPO / "docs" / "screenshots"))
    args = p.parse_args()
    if not (Path(args.index) / "manifest.json").exists():
        print(f"error: no index at {args.index}; build the demo first: python scripts/build_index.py", file=sys.stderr)
        return 2
    index = Path(args.index).resolve()
    try:  # shown in the page header: keep it short and machine-independent
        index = index.relative_to(REPO)
    except ValueError:
        pass
    env = dict(os.environ, SAEFE_APP_INDEX=str(index), SAEFE_SCREENSHOTS=str(Path(args.out).resolve()))
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", str(REPO / "tests" / "test_app_browser.py")]
    return subprocess.call(cmd, env=env, cwd=REPO)


if __name__ == "__main__":
    sys.exit(main())
