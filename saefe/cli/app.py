"""``saefe app`` / ``python app_gradio.py``: serve the Gradio configuration tool over an index."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

BUILD_CMD = "python scripts/build_index.py"
REPO = Path(__file__).resolve().parents[2]


def default_index() -> Path:
    for cand in (Path("index/demo"), REPO / "index" / "demo"):
        if (cand / "manifest.json").exists():
            return cand
    return Path("index/demo")


def app_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", help=f"index dir (default: index/demo, built by `{BUILD_CMD}`)")
    p.add_argument("--sae", help="SAE dir, e.g. weights/NAME (default: the one the index's build recorded)")
    p.add_argument("--labels", help="label profiles dir (default: SAE_DIR/labels)")
    p.add_argument("--model", help="encoder for text/image queries (default: the index's)")
    p.add_argument("--clip-server", help="embed text/image queries through this clip_server URL")
    p.add_argument("--backend", help="search a running meme-search-engine backend at this URL instead of the local FAISS index")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, default=7860)


def run_app(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    index = Path(args.index) if args.index else default_index()
    if not (index / "manifest.json").exists():
        hint = f"build the demo with `{BUILD_CMD}`" if not args.index else \
            f"build one with `{BUILD_CMD} --images DIR --out {index}`"
        print(f"error: no index at {index}; {hint} (or pass --index DIR)", file=sys.stderr)
        return 2
    from saefe.serve.app import launch
    from saefe.search.engine import Engine

    engine = Engine.open(index, sae_dir=args.sae, labels_dir=args.labels, model=args.model,
                         clip_server=args.clip_server, backend=args.backend)
    print(f"serving {index} on http://{args.host}:{args.port}", flush=True)
    launch(engine, host=args.host, port=args.port)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (app_gradio.py): same options as ``saefe app``."""
    from saefe.errors import SaefeError

    p = argparse.ArgumentParser(prog="app_gradio.py", description="Serve the SAEFE configuration tool (Gradio).")
    app_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its AVX probing is not news
    try:
        return run_app(args)
    except SaefeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
