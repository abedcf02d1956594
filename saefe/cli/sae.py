"""CLI glue."""

from __future__ import annotations


import saefe.sae.train as _train
import saefe.sae.original as _import
import saefe.sae.codes as _encode

# ---- from saefe.sae.train

def train_arguments(p) -> None:
    p.add_argument("--index", required=True, help="index dir (from `saefe build`)")
    p.add_argument("--out", required=True, help="output SAE dir, e.g. weights/NAME")
    p.add_argument("--d-hidden", type=int, default=None, help="latents (default 8 x d_emb; 262144 for SigLIP-SO400M on CUDA)")
    p.add_argument("--k", type=int, default=None, help="active latents per input (default d_hidden/64, at most 128)")
    p.add_argument("--epochs", type=int, default=_train.TrainConfig.epochs)
    p.add_argument("--batch-size", type=int, default=None, help="default 4096 on CUDA, 256 on CPU")
    p.add_argument("--lr", type=float, default=None, help="default 3e-3*sqrt(4096/d_hidden), at most 1e-2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    for flag, default, help_ in (
        ("pre-bias", _train.TrainConfig.pre_bias, "learned pre-encoder bias (input centring)"),
        ("unit-norm", _train.TrainConfig.unit_norm, "unit-norm decoder columns"),
        ("auxk", _train.TrainConfig.auxk, "AuxK loss reviving dead latents"),
        ("up-proj-bias", _train.TrainConfig.up_proj_bias, "encoder bias"),
    ):
        p.add_argument(f"--{flag}", dest=flag.replace("-", "_"), action="store_true", default=default, help=f"{help_} (default {'on' if default else 'off'})")
        p.add_argument(f"--no-{flag}", dest=flag.replace("-", "_"), action="store_false")
    p.add_argument("--topk-impl", choices=sorted(_train.FORWARDS), default="sparse", help="training top-k implementation (default sparse)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (a re-run resumes)")
    p.add_argument("--checkpoint-every", type=float, default=300.0, help="seconds between checkpoints")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint and start over")
    p.add_argument("--no-progress", action="store_true")


def run_train(args) -> int:
    cfg = _train.TrainConfig(
        index_dir=args.index, out_dir=args.out, d_hidden=args.d_hidden, k=args.k, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, val_fraction=args.val_fraction, device=args.device,
        pre_bias=args.pre_bias, unit_norm=args.unit_norm, auxk=args.auxk, up_proj_bias=args.up_proj_bias,
        topk_impl=args.topk_impl, max_steps=args.max_steps, checkpoint_every_s=args.checkpoint_every,
        resume=not args.restart, progress=not args.no_progress,
    )
    res = _train.train_sae(cfg)
    if not res.completed:
        print(f"stopped at step {res.steps}; checkpoint in {res.out_dir / _train.CKPT_DIR} (re-run the same command to resume)")
        return 0
    from saefe.sae.metrics import format_metrics

    print(f"SAE saved to {res.out_dir} ({res.steps} steps, {res.seconds:.1f}s{', resumed' if res.resumed else ''})")
    print(format_metrics(res.metrics))
    print(f"report: {res.out_dir / 'report.json'}  histogram: {res.out_dir / 'activation_hist.png'}")
    return 0

# ---- from saefe.sae.original

def import_arguments(p) -> None:
    p.add_argument("checkpoint", help="original SAEFE .pt checkpoint")
    p.add_argument("--out", required=True, help="output SAE dir, e.g. weights/NAME")
    p.add_argument("--model-id", default=_import.DEFAULT_MODEL_ID, help=f"encoder the SAE was trained on (default {_import.DEFAULT_MODEL_ID})")
    p.add_argument("--image-size", type=int, default=_import.DEFAULT_IMAGE_SIZE, help="that encoder's input size (default 384)")
    p.add_argument("--k", type=int, default=None, help="top-k, only for checkpoints that do not record it")


def run_import(args) -> int:
    sae = _import.import_sae(args.checkpoint, args.out, model_id=args.model_id, image_size=args.image_size, top_k=args.k)
    c = sae.config
    print(
        f"imported {args.checkpoint} -> {args.out}: d_emb {c.d_emb}, d_hidden {c.d_hidden}, k {c.top_k}, "
        f"up_proj bias {'yes' if c.up_proj_bias else 'no'}, encoder {args.model_id}"
    )
    return 0

# ---- from saefe.sae.codes

def encode_arguments(p) -> None:
    p.add_argument("--index", required=True, help="index dir")
    p.add_argument("--sae", required=True, help="SAE dir, e.g. weights/NAME")
    p.add_argument("--chunk-size", type=int, default=65536, help="rows per committed chunk (resume unit)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per SAE forward (default: fits ~0.5 GB on CPU, 2 GB on GPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true", help="recompute even if up to date")
    p.add_argument("--ray", metavar="ADDRESS", help="encode chunks as parallel Ray tasks: local, auto or ray://host:port")
    p.add_argument("--no-progress", action="store_true")


def run_encode(args) -> int:
    out = _encode.encode_corpus(
        args.index, args.sae, chunk_size=args.chunk_size, device=args.device, batch_size=args.batch_size,
        progress=not args.no_progress, overwrite=args.overwrite, ray=args.ray,
    )
    meta = _encode.read_json(out / _encode.CODES_JSON)
    print(f"codes for {meta['shape'][0]} images x {meta['shape'][1]} features (mean L0 {meta['mean_l0']:.1f}) in {out}")
    return 0
