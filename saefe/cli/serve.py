"""CLI glue."""

from __future__ import annotations

import logging

import saefe.serve.clip_server as _clip
import saefe.serve.backend_server as _backend

log = logging.getLogger("saefe.cli")

# ---- from saefe.serve.clip_server

def clip_arguments(parser) -> None:
    parser.add_argument("--model", default="demo", help="model id or local dir (default: demo, the built-in tiny model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="port to listen on (0 picks a free one)")
    parser.add_argument("--batch", type=int, default=_clip.DEFAULT_BATCH, help=f"most items per request (default {_clip.DEFAULT_BATCH})")
    parser.add_argument("--max-pixels", type=int, default=_clip.DEFAULT_MAX_PIXELS,
                        help=f"refuse images with more pixels than this (default {_clip.DEFAULT_MAX_PIXELS})")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda when present)")


def run_clip(args) -> int:
    from saefe.ingest.encoder import SiglipEncoder
    from saefe.errors import SaefeError

    if args.batch < 1:
        raise SaefeError(f"--batch must be at least 1, got {args.batch}")
    encoder = SiglipEncoder.from_pretrained(args.model, device=args.device)
    app = _clip.make_app(encoder, batch=args.batch, max_pixels=args.max_pixels)

    log.info(
        "serve-clip: model %s (dim %d, image %s) batch %d", encoder.info.model_id,
        encoder.info.embedding_dim, list(encoder.info.image_size), args.batch,
    )
    _clip.serve_forever(app, args.host, args.port, "serve-clip")
    return 0

# ---- from saefe.serve.backend_server

def backend_arguments(parser) -> None:
    parser.add_argument("--index", required=True, help="index dir (from `saefe build`)")
    parser.add_argument("--sae", default=None, help="SAE dir (weights/NAME): its labels become predefined embeddings")
    parser.add_argument("--model", default=None, help="encoder for text/image terms (default: the index's own)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="port to listen on (0 picks a free one)")
    parser.add_argument("--max-k", type=int, default=_backend.MAX_K, help=f"most results per request (default {_backend.MAX_K})")
    parser.add_argument("--dedup-threshold", type=float, default=None,
                        help="collapse near-duplicates at this cosine by default (default: the index's setting, "
                             "else 0.95; requests may override; 0: off)")
    parser.add_argument("--no-watch", action="store_true", help="do not reopen the index when a build updates it")


def run_backend(args) -> int:
    from saefe.errors import SaefeError
    from saefe.search.dedup import dedup_option
    from saefe.search.engine import Engine
    from saefe.search.live import LiveEngine

    if args.max_k < 1:
        raise SaefeError(f"--max-k must be at least 1, got {args.max_k}")
    dedup = dedup_option(args.dedup_threshold)
    live = LiveEngine(lambda: Engine.open(args.index, model=args.model, sae_dir=args.sae), args.index,
                      check_every=float("inf") if args.no_watch else 2.0)
    engine = live.engine
    log.info(
        "serve-backend: %s, %d images, d_emb %d, %d predefined embeddings, generation %d",
        args.index, engine.n_total, engine.dim, len(engine.predefined), live.generation,
    )
    _backend.serve_forever(_backend.make_app(live, max_k=args.max_k, dedup_threshold=dedup), args.host, args.port,
                           "serve-backend")
    return 0
