"""Encoder throughput (images/s): the built-in tiny SigLIP on this machine and, with --so400m on a
GPU, the full ViT-SO400M-14 @384 architecture with random weights (speed needs no real weights).

Measures the model alone (pre-processed pixels) and the whole path (PIL images through the
processor), so the table shows where time goes.

    python benchmarks/bench_encoder.py
    python benchmarks/bench_encoder.py --so400m --device cuda
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def so400m_encoder(device: str):
    """google/siglip-so400m-patch14-384's architecture, random weights, via the same class."""
    import torch
    from transformers import PreTrainedTokenizerFast, SiglipConfig, SiglipImageProcessor, SiglipModel
    from tokenizers import Tokenizer, models

    from saefe.ingest.encoder import SiglipEncoder

    cfg = SiglipConfig(
        text_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                         vocab_size=32000, max_position_embeddings=64),
        vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                           image_size=384, patch_size=14),
    )
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        model = SiglipModel(cfg).to(dtype).eval()
    proc = SiglipImageProcessor(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "<pad>": 1}, unk_token="<unk>")),
                                  unk_token="<unk>", pad_token="<pad>")
    return SiglipEncoder(model, proc, tok, "so400m-random", device, batch_size=64)


def bench(enc, n_images: int, batch: int, warmup: int = 1) -> dict[str, float]:
    import torch
    from PIL import Image

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)) for _ in range(batch)]
    enc.batch_size = batch
    sync = torch.cuda.synchronize if enc.device.startswith("cuda") else (lambda: None)
    px = enc.preprocess(imgs)
    with torch.inference_mode():
        for _ in range(warmup):
            enc.image_features(px)
        sync()
        t = time.perf_counter()
        reps = max(1, n_images // batch)
        for _ in range(reps):
            enc.image_features(px)
        sync()
        model_s = (time.perf_counter() - t) / (reps * batch)
    t = time.perf_counter()
    reps_e2e = max(1, reps // 2)
    for _ in range(reps_e2e):
        enc.embed_images(imgs)
    sync()
    e2e_s = (time.perf_counter() - t) / (reps_e2e * batch)
    t = time.perf_counter()
    for _ in range(reps_e2e):
        enc.preprocess(imgs)
    pre_s = (time.perf_counter() - t) / (reps_e2e * batch)
    return {"model img/s": 1 / model_s, "end-to-end img/s": 1 / e2e_s, "preprocess img/s": 1 / pre_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--so400m", action="store_true", help="also the full SO400M architecture (GPU advised)")
    ap.add_argument("--n", type=int, default=1024, help="images per measurement")
    args = ap.parse_args()
    import torch

    from saefe.ingest.encoder import SiglipEncoder, pick_device

    device = pick_device(args.device)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}"
          + (f", {torch.cuda.get_device_name()}" if device.startswith("cuda") else ""))
    rows = []
    tiny = SiglipEncoder.from_pretrained("demo", device=device)
    rows.append(("tiny SigLIP (64px, d=128)", device, 64, bench(tiny, args.n, 64)))
    if args.so400m:
        big = so400m_encoder(device)
        for b in (32, 128) if device.startswith("cuda") else (8,):
            rows.append(("SO400M-14 @384 (random)", device + (" fp16" if device.startswith("cuda") else ""), b,
                         bench(big, args.n if device.startswith("cuda") else 16, b)))
    print("\n| model | device | batch | model img/s | end-to-end img/s | preprocess img/s |")
    print("|---|---|---|---|---|---|")
    for name, dev, b, r in rows:
        print(f"| {name} | {dev} | {b} | {r['model img/s']:.0f} | {r['end-to-end img/s']:.0f} | {r['preprocess img/s']:.0f} |")


if __name__ == "__main__":
    main()
