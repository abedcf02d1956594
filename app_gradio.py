#!/usr/bin/env python
"""Serve the SAEFE configuration tool (a Gradio Blocks app) over a local index.

    python app_gradio.py                              # the demo: index/demo + weights/demo
    python app_gradio.py --index index/NAME --sae weights/NAME --host 0.0.0.0 --port 7860
    python app_gradio.py --backend http://host:1707   # search a meme-search-engine backend
    python app_gradio.py --clip-server http://host:1708  # embed text/image queries remotely

Named API endpoints for gradio_client: /search, /search_text, /search_image, /inspect_feature,
/image_features, /bias, /labels (see the page's "Use via API" link).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

BUILD_CMD = "python scripts/build_index.py"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--index", help="index dir (default: index/demo, built by `python scripts/build_index.py`)")
    p.add_argument("--sae", help="SAE dir, e.g. weights/NAME (default: the one the index's build recorded)")
    p.add_argument("--labels", help="label profiles dir (default: SAE_DIR/labels)")
    p.add_argument("--model", help="encoder for text/image queries (default: the index's)")
    p.add_argument("--clip-server", help="embed text/image queries through this clip_server URL")
    p.add_argument("--backend", help="search a running meme-search-engine backend at this URL instead of the local FAISS index")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def default_index() -> Path:
    for cand in (Path("index/demo"), ROOT / "index" / "demo"):
        if (cand / "manifest.json").exists():
            return cand
    return Path("index/demo")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    index = Path(args.index) if args.index else default_index()
    if not (index / "manifest.json").exists():
        hint = f"build the demo with `{BUILD_CMD}`" if not args.index else \
            f"build one with `{BUILD_CMD} --images DIR --out {index}`"
        print(f"error: no index at {index}; {hint} (or pass --index DIR)", file=sys.stderr)
        return 2
    from saefe.engine import Engine
    from saefe.errors import SaefeError

    try:
        engine = Engine.open(index, sae_dir=args.sae, labels_dir=args.labels, model=args.model,
                             clip_server=args.clip_server, backend=args.backend)
        from saefe.app import launch

        print(f"serving {index} on http://{args.host}:{args.port}", flush=True)
        launch(engine, host=args.host, port=args.port)
    except SaefeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
