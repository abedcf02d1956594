"""``saefe train-demo-model``: arguments and printing; the work is in saefe.demo.train_model."""

from __future__ import annotations

import argparse
from dataclasses import replace


def train_model_arguments(p: argparse.ArgumentParser) -> None:
    from saefe.demo.tiny_model import SHIPPED_DIR
    from saefe.demo.train_model import DemoTrainConfig as C

    p.add_argument("--out", default=str(SHIPPED_DIR), help=f"model dir to write (default: the shipped one, {SHIPPED_DIR})")
    p.add_argument("--n-train", type=int, default=C.n_train, help="training images (demo generator, --train-seed)")
    p.add_argument("--train-seed", type=int, default=C.train_seed, help="demo generator seed of the training images (the demo corpus uses 0)")
    p.add_argument("--n-val", type=int, default=C.n_val)
    p.add_argument("--val-seed", type=int, default=C.val_seed)
    p.add_argument("--vision-epochs", type=int, default=C.vision_epochs)
    p.add_argument("--text-steps", type=int, default=C.text_steps)
    p.add_argument("--seed", type=int, default=C.seed, help="model init and batch order")
    p.add_argument("--threads", type=int, default=C.threads, help="torch threads (fixed, for repeatable runs)")
    p.add_argument("--no-bf16", action="store_true", help="train the vision tower in float32 (slower on CPUs with BF16)")
    p.add_argument("--tiny", action="store_true", help="toy sizes that train in seconds (a smoke test, not a useful model)")
    p.add_argument("--no-progress", action="store_true")


def run_train_model(args: argparse.Namespace) -> int:
    from saefe.demo.train_model import DemoTrainConfig, train_demo_model
    from saefe.errors import SaefeError

    base = DemoTrainConfig.tiny() if args.tiny else DemoTrainConfig()
    over = dict(seed=args.seed, threads=args.threads, progress=not args.no_progress)
    if not args.tiny:
        over.update(n_train=args.n_train, train_seed=args.train_seed, n_val=args.n_val, val_seed=args.val_seed,
                    vision_epochs=args.vision_epochs, text_steps=args.text_steps, bf16=not args.no_bf16)
    cfg = replace(base, **over)
    if cfg.train_seed == 0 or cfg.val_seed == 0:
        raise SaefeError("seed 0 draws the demo corpus itself; train and validate on other seeds (default 10000/10001)")
    if min(cfg.n_train, cfg.n_val) < 16:
        raise SaefeError(f"need at least 16 training and validation images, got {cfg.n_train} and {cfg.n_val}")
    rec = train_demo_model(args.out, cfg)
    m, t = rec["metrics"], rec["timings"]
    print(f"demo model: {args.out} ({t['total_s']:.0f}s: images {t['draw_images_s']:.0f}s, vision {t['vision_s']:.0f}s, text {t['text_s']:.0f}s)")
    print(f"validation ({m['images']} images, seed {m['seed']}): text P@20 single {m['text_p@20_single']:.3f}, "
          f"compound {m['text_p@20_compound'] or float('nan'):.3f}; zero-shot emotion {m['zero_shot_emotion_accuracy']:.3f}; "
          f"99% variance in {m['dims_99pct_variance']}/{m['embedding_dim']} dims")
    print("rebuild the demo with it: python scripts/build_index.py --force")
    return 0
