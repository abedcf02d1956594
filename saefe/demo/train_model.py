"""Train the demo's tiny SigLIP on the demo world: ``saefe train-demo-model`` /
``python scripts/train_demo_model.py``.

The recipe (known to work at this scale on 2 CPU cores in ~10 minutes):

1. **Vision tower**, trained from scratch on demo images drawn with seeds of its own (10_000+,
   never the demo corpus' seed 0): cosine-softmax heads on the L2-normalised image embedding
   predict the planted emotion, gender and age, and a small decoder reconstructs a 16x16
   thumbnail of the input from the same embedding, while a spread term (per-dimension variance
   floor + isotropy of the batch covariance) keeps the variance from piling into the ~10 label
   directions. The heads make the labels linear directions of the space; reconstruction and
   spread keep nuisance detail (position, colours, clutter) in many directions, so the space does
   not collapse onto the 48 label classes and the SAE has structure to find.
2. **Text tower**, LiT-style, against the frozen image embeddings with SigLIP's sigmoid loss:
   each caption (captions.py: synonyms, templates, partial captions such as "a man") is scored
   against a pool of images, and every image that fits all the attributes the caption states is
   a positive. SigLIP's default logit bias (-10, tuned for 32k batches) stalls learning at a
   pool of a few thousand, so scale starts at 10 and bias at the log-odds of the pool's
   positive share, and both learn 10x faster than the tower (else they barely move in 600 steps).

Seeds are fixed and the thread count is set; the model directory gets the model in SigLIP's
format (tiny_model.write_model_dir), the tokenizer and ``training_record.json`` (data seeds,
recipe, metrics measured through the real loading path, weight SHA-256).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from saefe.demo.tiny_model import DEMO_MODEL_ID, RECORD, WEIGHTS, TinySiglipConfig

log = logging.getLogger(__name__)


@dataclass
class DemoTrainConfig:
    """Data, recipe and run settings; ``model`` holds the architecture."""

    model: TinySiglipConfig = field(default_factory=TinySiglipConfig)
    train_seed: int = 10_000  # demo generator seed of the training images (demo corpus: 0)
    n_train: int = 8_000
    val_seed: int = 10_001
    n_val: int = 2_000
    # stage 1: vision tower
    vision_epochs: int = 2
    vision_batch: int = 128  # >= the embedding dim, for a full-rank batch covariance
    vision_lr: float = 1e-3
    vision_weight_decay: float = 0.05
    head_scale: float = 10.0  # cosine-softmax temperature of the label heads
    recon_weight: float = 4.0
    recon_size: int = 16  # side of the reconstructed thumbnail
    spread_weight: float = 0.05  # variance floor + isotropy of the embedding (see _spread_loss)
    spread_std: float = 0.5  # floor on each dimension's std, in units of 1/sqrt(dim)
    # stage 2: text tower
    text_steps: int = 600
    text_batch: int = 128  # captions per step
    text_pool: int = 2048  # images each caption is scored against (its own among them)
    text_lr: float = 1e-3
    caption_noise: float = 0.3  # share of captions given an uninformative extra word
    init_logit_scale: float = 10.0
    # run
    seed: int = 0
    threads: int = 2
    bf16: bool = True  # bfloat16 autocast in training (CPUs with AVX512-BF16/AMX: ~1.7x faster)
    fp16_weights: bool = True
    workers: int | None = None  # image-drawing processes (default: CPU count, at most 4)
    progress: bool = True

    @classmethod
    def tiny(cls) -> "DemoTrainConfig":
        """Seconds-long run for tests: same code path, toy sizes."""
        return cls(
            model=TinySiglipConfig(hidden_size=32, intermediate_size=64, vision_layers=1, text_layers=1, num_heads=2,
                                   image_size=32, patch_size=8, vocab_size=256),
            n_train=96, n_val=48, vision_epochs=1, vision_batch=32, text_steps=3, text_batch=16, text_pool=64,
            bf16=False, workers=1, progress=False,
        )


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step")


# -- stage 1 ------------------------------------------------------------------------------------


def _spread_loss(zn, floor: float):
    """Keep the batch's variance spread over many directions: a VICReg-style floor on each
    dimension's std plus ``d * sum(eig^2) - 1`` of the trace-normalised covariance (0 when
    isotropic; d / participation ratio - 1 otherwise). Without it the label heads put ~90% of the
    variance into the ~10 label directions and the SAE finds little else to code."""
    import torch
    import torch.nn.functional as F

    d = zn.shape[1]
    u = (zn - zn.mean(0)) * d ** 0.5  # unit per-dimension std when spread evenly
    std = torch.sqrt(u.var(0) + 1e-4)
    cov = (u.T @ u) / max(1, len(u) - 1)
    cn = cov / torch.diagonal(cov).sum()
    return F.relu(floor - std).mean() + (d * cn.pow(2).sum() - 1)


def train_vision(model, data, cfg: DemoTrainConfig) -> dict:
    """Heads + reconstruction on the vision tower (in place); returns the last losses."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from saefe.demo.train_data import to_model_input

    vm = model.vision_model.train()
    d = cfg.model.hidden_size
    n_cls = (8, 2, 3)
    torch.manual_seed(cfg.seed + 1)
    cls = nn.Linear(d, sum(n_cls), bias=False)
    dec = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, 3 * cfg.recon_size ** 2))
    params = [*vm.parameters(), *cls.parameters(), *dec.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=cfg.vision_weight_decay)
    n = len(data)
    per_epoch = max(1, n // cfg.vision_batch)
    total = per_epoch * cfg.vision_epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, total, max(1, total // 20)))
    gen = torch.Generator().manual_seed(cfg.seed)
    labels = torch.as_tensor(np.stack([data.emotion, data.gender, data.age], 1))
    pool = data.pixels.shape[-1] // cfg.recon_size
    bar = _bar(total, "vision tower", cfg.progress)
    hist: list[list[float]] = []
    for _epoch in range(cfg.vision_epochs):
        perm = torch.randperm(n, generator=gen)
        for b in range(per_epoch):
            idx = perm[b * cfg.vision_batch:(b + 1) * cfg.vision_batch]
            x = to_model_input(data.pixels[idx.numpy()])
            flip = torch.rand(len(idx), generator=gen) < 0.5  # mirroring keeps every label
            x[flip] = x[flip].flip(-1)
            target = F.avg_pool2d(x, pool).flatten(1)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                z = vm(pixel_values=x).pooler_output
            zn = F.normalize(z.float(), dim=-1)
            logits = cfg.head_scale * zn @ F.normalize(cls.weight, dim=-1).T
            y = labels[idx]
            parts = logits.split(n_cls, dim=1)
            loss_cls = sum(F.cross_entropy(p, y[:, j]) for j, p in enumerate(parts))
            loss_rec = F.mse_loss(dec(zn), target)
            loss_spread = _spread_loss(zn, cfg.spread_std)
            loss = loss_cls + cfg.recon_weight * loss_rec + cfg.spread_weight * loss_spread
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            acc = [float((p.argmax(1) == y[:, j]).float().mean()) for j, p in enumerate(parts)]
            hist.append([loss_cls.item(), loss_rec.item(), *acc, loss_spread.item()])
            if bar is not None:
                bar.update(1)
                if len(hist) % 20 == 0:
                    m = np.mean(hist[-20:], axis=0)
                    bar.set_postfix(cls=f"{m[0]:.3f}", rec=f"{m[1]:.3f}", spread=f"{m[5]:.3f}", emo=f"{m[2]:.2f}", gen=f"{m[3]:.2f}", age=f"{m[4]:.2f}")
    if bar is not None:
        bar.close()
    vm.eval()
    last = np.mean(hist[-max(1, min(50, len(hist))):], axis=0)
    return {"steps": total, "loss_labels": float(last[0]), "loss_reconstruction": float(last[1]),
            "loss_spread": float(last[5]),
            "train_accuracy": {"emotion": float(last[2]), "gender": float(last[3]), "age": float(last[4])}}


def embed_pixels(model, pixels_u8, batch: int = 256) -> np.ndarray:
    """L2-normalised image embeddings of uint8 processor-sized pixels (float32, no autocast)."""
    import torch
    import torch.nn.functional as F

    from saefe.demo.train_data import to_model_input

    out = []
    with torch.inference_mode():
        for i in range(0, len(pixels_u8), batch):
            z = model.vision_model(pixel_values=to_model_input(pixels_u8[i:i + batch])).pooler_output
            out.append(F.normalize(z.float(), dim=-1).numpy())
    return np.concatenate(out)


# -- stage 2 ------------------------------------------------------------------------------------


def train_text(model, tokenizer, image_emb: np.ndarray, data, cfg: DemoTrainConfig) -> dict:
    """Sigmoid-loss alignment of the text tower (and logit scale/bias) to frozen image embeddings."""
    import torch
    import torch.nn.functional as F

    from saefe.demo.captions import captions_for_labels, positives

    for p in model.vision_model.parameters():
        p.requires_grad_(False)
    tm = model.text_model.train()
    emb = torch.as_tensor(image_emb, dtype=torch.float32)
    n = len(emb)
    rng = np.random.default_rng(cfg.seed + 2)
    E, G, A = data.emotion, data.gender, data.age
    B, M = min(cfg.text_batch, n), max(min(cfg.text_pool, n), min(cfg.text_batch, n))

    def batch():
        ci = rng.integers(n, size=B)
        texts, mentions = captions_for_labels(E[ci], G[ci], A[ci], rng, noise=cfg.caption_noise)
        pool = np.concatenate([ci, rng.integers(n, size=M - B)])
        y = positives(mentions, E[pool], G[pool], A[pool])
        ids = tokenizer(texts, padding="max_length", truncation=True, max_length=cfg.model.max_text_len,
                        return_tensors="pt")["input_ids"]
        return ids, pool, y

    # Start the bias at the log-odds of a positive pair (SigLIP's -10 assumes 32k-image batches).
    share = float(np.mean([batch()[2].mean() for _ in range(4)]))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(cfg.init_logit_scale))
        model.logit_bias.fill_(math.log(share / (1 - share)))
    params = [*tm.parameters(), model.logit_scale, model.logit_bias]
    # Scale and bias move 10x faster: at a few hundred steps they would barely leave their start.
    opt = torch.optim.AdamW([{"params": list(tm.parameters())},
                             {"params": [model.logit_scale, model.logit_bias], "lr": 10 * cfg.text_lr, "weight_decay": 0.0}],
                            lr=cfg.text_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, cfg.text_steps, max(1, cfg.text_steps // 20)))
    bar = _bar(cfg.text_steps, "text tower", cfg.progress)
    hist: list[float] = []
    for _step in range(cfg.text_steps):
        ids, pool, y = batch()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            t = tm(input_ids=ids).pooler_output
        t = F.normalize(t.float(), dim=-1)
        logits = t @ emb[pool].T * model.logit_scale.exp() + model.logit_bias
        sign = torch.as_tensor(y, dtype=torch.float32) * 2 - 1
        loss = -F.logsigmoid(sign * logits).sum(1).mean() / M  # SigLIP's sum over pairs, per pair
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        hist.append(loss.item())
        if bar is not None:
            bar.update(1)
            if len(hist) % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(hist[-20:]):.4f}", scale=f"{model.logit_scale.exp().item():.1f}",
                                bias=f"{model.logit_bias.item():.2f}")
    if bar is not None:
        bar.close()
    tm.eval()
    for p in model.vision_model.parameters():
        p.requires_grad_(True)
    return {"steps": cfg.text_steps, "positive_share": share, "loss": float(np.mean(hist[-50:])),
            "logit_scale": float(model.logit_scale.exp().item()), "logit_bias": float(model.logit_bias.item())}


# -- the whole run --------------------------------------------------------------------------------


def validation_metrics(model_dir: Path, val) -> dict:
    """Quality of the saved model, loaded through the real from_pretrained path, on ``val``."""
    from saefe.demo.corpus import DEMO_EMOTIONS, DEMO_TEXT_PROMPTS
    from saefe.demo.quality import compound_prompts, dims_for_variance, precision_at_k, single_prompts, zero_shot_accuracy
    from saefe.demo.train_data import to_model_input
    from saefe.ingest.encoder import SiglipEncoder

    enc = SiglipEncoder.from_pretrained(str(model_dir), device="cpu")
    img = enc.embed_pixels(to_model_input(val.pixels))
    labels = (val.emotion, val.gender, val.age)
    single = single_prompts()
    compound = compound_prompts(labels, min_count=20)
    p_single = precision_at_k(enc.embed_texts([p.text for p in single]), img, single, labels)
    p_comp = precision_at_k(enc.embed_texts([p.text for p in compound]), img, compound, labels)
    zs = zero_shot_accuracy(enc.embed_texts([DEMO_TEXT_PROMPTS[e] for e in DEMO_EMOTIONS]), img, val.emotion)
    return {
        "images": len(val), "seed": val.seed,
        "text_p@20_single": float(p_single.mean()),
        "text_p@20_compound": float(p_comp.mean()) if len(p_comp) else None,
        "compound_prompts": len(compound), "zero_shot_emotion_accuracy": zs,
        "dims_99pct_variance": dims_for_variance(img), "embedding_dim": int(img.shape[1]),
    }


def head_accuracy(image_emb: np.ndarray, data, val_emb: np.ndarray, val) -> dict:
    """Nearest-class-mean accuracy on the validation images (class means from the training set)."""
    out = {}
    for name in ("emotion", "gender", "age"):
        y, yv = getattr(data, name), getattr(val, name)
        means = np.stack([image_emb[y == c].mean(0) for c in range(int(y.max()) + 1)])
        out[name] = float((np.argmax(val_emb @ means.T, 1) == yv).mean())
    return out


def train_demo_model(out_dir: str | os.PathLike, cfg: DemoTrainConfig | None = None) -> dict:
    """Run both stages and write a complete model directory to ``out_dir``; returns the record.

    The directory is written next to ``out_dir`` and swapped in only when complete, so an
    interrupted run never leaves a half-written model where the demo looks for it."""
    import importlib.metadata as md

    import torch
    from transformers import SiglipModel

    from saefe.demo.captions import TEMPLATES
    from saefe.demo.tiny_model import sha256_file, siglip_config, train_tokenizer, write_model_dir
    from saefe.demo.train_data import render_images
    from saefe.manifest import write_json_atomic

    cfg = cfg or DemoTrainConfig()
    out = Path(out_dir)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    timings: dict[str, float] = {}
    try:
        data = render_images(cfg.train_seed, cfg.n_train, cfg.model.image_size, workers=cfg.workers, progress=cfg.progress)
        val = render_images(cfg.val_seed, cfg.n_val, cfg.model.image_size, workers=cfg.workers, progress=cfg.progress)
        timings["draw_images_s"] = time.time() - t0
        tok = train_tokenizer(tmp, cfg.model.vocab_size, cfg.model.max_text_len)
        torch.manual_seed(cfg.seed)
        model = SiglipModel(siglip_config(cfg.model, len(tok)))
        t = time.time()
        vision = train_vision(model, data, cfg)
        timings["vision_s"] = time.time() - t
        t = time.time()
        train_emb = embed_pixels(model, data.pixels)
        val_emb = embed_pixels(model, val.pixels)
        vision["val_nearest_class_mean_accuracy"] = head_accuracy(train_emb, data, val_emb, val)
        text = train_text(model, tok, train_emb, data, cfg)
        timings["text_s"] = time.time() - t
        write_model_dir(model.eval(), tmp, cfg.model, fp16=cfg.fp16_weights)
        metrics = validation_metrics(tmp, val)
        timings["total_s"] = time.time() - t0
        record = {
            "model_id": DEMO_MODEL_ID,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": {p: md.version(p) for p in ("torch", "transformers", "sentencepiece", "numpy")},
            "data": {
                "generator": "saefe.demo.corpus (_sample_spec + render_demo_image), size 128, "
                             f"resized to {cfg.model.image_size} by the model's SiglipImageProcessor",
                "train": {"seed": cfg.train_seed, "images": f"0..{cfg.n_train - 1}"},
                "validation": {"seed": cfg.val_seed, "images": f"0..{cfg.n_val - 1}"},
                "captions": f"saefe.demo.captions: {len(TEMPLATES)} templates, synonyms, partial captions",
            },
            "recipe": {
                "vision": "cosine-softmax heads (emotion, gender, age) on the L2-normalised embedding + "
                          f"{cfg.recon_weight} x MSE reconstruction of a {cfg.recon_size}px thumbnail; "
                          "AdamW, warmup + cosine, random mirroring",
                "text": "LiT: vision frozen; SigLIP sigmoid loss, every image fitting all stated attributes "
                        "is a positive; logit scale starts at "
                        f"{cfg.init_logit_scale}, bias at the log-odds of the positive share",
                "weights": "float16 safetensors" if cfg.fp16_weights else "float32 safetensors",
            },
            "config": asdict(cfg),
            "stages": {"vision": vision, "text": text},
            "metrics": metrics,
            "timings": {k: round(v, 1) for k, v in timings.items()},
            "threads": cfg.threads,
            "weights_sha256": sha256_file(tmp / WEIGHTS),
        }
        write_json_atomic(tmp / RECORD, record)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        return record
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
