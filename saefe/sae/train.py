"""Train a top-k SAE on an index's embeddings: ``saefe train-sae --index DIR --out weights/NAME``.

The store's fp16 vectors are read memory-mapped (loaded whole when they fit comfortably), split
into train / validation by a seeded permutation, and shuffled per epoch by ``PCG64(seed, epoch)``,
so a resumed run sees exactly the batches it would have seen. Checkpoints (``OUT/checkpoint/``)
are a safetensors file of model + Adam state + dead-latent tracker and a JSON file with
step / epoch / batch / RNG (the JSON is written last and is the commit point); nothing is
pickled. A finished run writes ``model.safetensors`` + ``config.json`` (with the encoder
manifest), ``report.json`` and ``activation_hist.png``, and removes the checkpoint.

The training step never builds a dense (batch, d_hidden) gradient: the dense pre-activations
are computed without autograd only to choose the top-k, the k selected values are recomputed
differentiably from k encoder rows (``TopKSAE.gather_values``), and decoding is an
``embedding_bag`` over k decoder columns, so both backward passes touch k rows per input.

Options from current top-k SAE practice (``--pre-bias``, ``--unit-norm``, ``--auxk``) are
switched by flags; their defaults follow ``benchmarks/bench_sae_quality.py`` (see DEFAULTS).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from saefe.errors import CorpusError, SaefeError
from saefe.manifest import EncoderInfo
from saefe.sae.checkpoint import CKPT_DIR, CKPT_JSON, load_checkpoint, restore, save_checkpoint  # noqa: F401
from saefe.sae.model import SAEConfig, TopKSAE

log = logging.getLogger(__name__)

RESUME_KEYS = ("d_hidden", "k", "batch_size", "seed", "val_fraction", "pre_bias", "unit_norm", "auxk", "up_proj_bias")


@dataclass
class TrainConfig:
    index_dir: str
    out_dir: str
    d_hidden: int | None = None  # None: 8 x d_emb (262144 for d_emb 1152 on CUDA, the reference)
    k: int | None = None  # None: d_hidden // 64, clipped to 1..128
    epochs: int = 10
    batch_size: int | None = None  # None: 4096 on CUDA, 256 on CPU
    lr: float | None = None  # None: 3e-3 * sqrt(4096 / d_hidden), at most 1e-2
    seed: int = 0
    val_fraction: float = 0.1
    device: str = "auto"
    # options (defaults justified by benchmarks/bench_sae_quality.py; see the report there)
    # planted 2048 atoms / 256-d / 16 active, d_hidden 4096, k 16, 12 epochs (H200 run): atoms
    # recovered / FVU: baseline 86.8% / 0.296, +pre-bias 88.2% / 0.290, +unit-norm 98.6% / 0.232,
    # +auxk 75.9% / 0.343, all three 97.9% / 0.234. AuxK helped only on the easier 1024/8 set
    # (100% vs 98.7%) and at d_hidden = #atoms (with unit-norm: dead 1.1% vs 31.6%), so it is opt-in.
    pre_bias: bool = True  # centre inputs on a learned pre-encoder bias (= decoder bias, init at the data mean)
    unit_norm: bool = True  # unit-norm decoder columns (projected gradient + renormalise after each step)
    auxk: bool = False  # auxiliary loss on the top dead latents reconstructing the residual
    auxk_coef: float = 1 / 32
    k_aux: int | None = None  # None: d_emb // 2
    dead_after: int | None = None  # samples without firing before a latent counts as dead; None: see train_on_vectors
    up_proj_bias: bool = True
    topk_impl: str = "sparse"  # "sparse" (gather / embedding_bag backward), "dense" (topk + scatter), "seed" (kthvalue + where)
    weight_decay: float = 0.0
    lr_decay: float = 0.2  # fraction of the steps, at the end, over which lr decays linearly to 0
    max_steps: int | None = None  # stop (with a checkpoint) after this many steps in total
    checkpoint_every_s: float = 300.0
    resume: bool = True
    progress: bool = True
    name: str | None = None  # SAE name recorded in config.json; default: out dir name


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    epochs_done: int
    completed: bool
    resumed: bool
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# the three ways of computing a training step's reconstruction (same maths, different cost)


def forward_sparse(model: TopKSAE, x: torch.Tensor):
    """Returns (x_hat, values, indices, pre); pre = the no-grad dense pre-activations.

    One top-(k+1) under no_grad picks the latents and the seed's strict threshold; the k
    values are then recomputed with autograd from k encoder rows (sparse backward)."""
    k = model.config.top_k
    with torch.no_grad():
        pre = model.pre_activations(x)
        h = F.relu(pre)
        if k < h.shape[-1]:
            top, idx = torch.topk(h, k + 1, dim=-1, sorted=True)
            kth1, indices = top[..., k:], idx[..., :k]
        else:
            kth1 = torch.zeros_like(h[..., :1])
            indices = torch.arange(h.shape[-1], device=h.device).expand_as(h)
    raw = F.relu(model.gather_values(x, indices))
    values = torch.where(raw > kth1, raw, torch.zeros_like(raw))
    return model.decode(values, indices), values, indices, pre


def forward_dense(model: TopKSAE, x: torch.Tensor):
    """Baseline: dense autograd through torch.topk + scatter and a dense decoder matmul."""
    pre = model.pre_activations(x)
    h = F.relu(pre)
    values, indices = torch.topk(h, model.config.top_k, dim=-1, sorted=False)
    dense = torch.zeros_like(h).scatter(-1, indices, values)
    return model.down_proj(dense), values, indices, pre.detach()


def forward_seed(model: TopKSAE, x: torch.Tensor):
    """The seed's formulation: kthvalue + where over the dense activations, dense decode."""
    pre = model.pre_activations(x)
    h = F.relu(pre)
    kth = torch.kthvalue(h, h.shape[-1] - model.config.top_k, dim=-1, keepdim=True).values
    dense = torch.where(h > kth, h, torch.zeros_like(h))
    values, indices = torch.topk(dense.detach(), model.config.top_k, dim=-1, sorted=False)
    return model.down_proj(dense), values, indices, pre.detach()


FORWARDS: dict[str, Callable] = {"sparse": forward_sparse, "dense": forward_dense, "seed": forward_seed}


# --------------------------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    if device in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SaefeError(f"device {device!r} requested but CUDA is not available on this machine")
    return torch.device(device)


def default_sizes(d_emb: int, d_hidden: int | None, k: int | None, device: torch.device) -> tuple[int, int]:
    if d_hidden is None:
        d_hidden = 262144 if (d_emb == 1152 and device.type == "cuda") else 8 * d_emb
    if k is None:
        k = 128 if d_hidden >= 65536 else max(1, min(128, d_hidden // 64))
    if not 0 < k <= d_hidden:
        raise SaefeError(f"k must be in 1..d_hidden ({d_hidden}), got {k}")
    return int(d_hidden), int(k)


def default_lr(d_hidden: int) -> float:
    """3e-3 at d_hidden 4096 (planted benchmark), scaled by 1/sqrt(d_hidden), at most 1e-2."""
    return min(1e-2, 3e-3 * math.sqrt(4096 / d_hidden))


def check_finite(vectors: np.ndarray, what: str, chunk: int = 65536) -> None:
    for s in range(0, len(vectors), chunk):
        block = np.asarray(vectors[s : s + chunk])
        ok = np.isfinite(block).all(axis=1)
        if not ok.all():
            bad = int(np.flatnonzero(~ok)[0]) + s
            n_bad = int((~ok).sum())
            raise CorpusError(
                f"{what} has non-finite values (NaN/inf), first at row {bad} ({n_bad} bad rows in rows "
                f"{s}..{s + len(block) - 1}); rebuild the index or drop those rows"
            )


def split_ids(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if n < 2:
        raise CorpusError(f"need at least 2 vectors to train an SAE, the index has {n}")
    if not 0 < val_fraction < 1:
        raise SaefeError(f"val_fraction must be in (0, 1), got {val_fraction}")
    perm = np.random.Generator(np.random.PCG64([seed, 0xC0DE])).permutation(n)
    n_val = min(n - 1, max(1, int(round(val_fraction * n))))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class _Data:
    """Train vectors on the device when they fit, else batches gathered from the memmap."""

    def __init__(self, vectors: np.ndarray, ids: np.ndarray, device: torch.device, budget_bytes: int):
        self.vectors, self.ids, self.device = vectors, ids, device
        self.resident: torch.Tensor | None = None
        if len(ids) * vectors.shape[1] * 2 <= budget_bytes:
            arr = np.asarray(vectors[ids] if len(ids) != len(vectors) else vectors, dtype=np.float16)
            self.resident = torch.from_numpy(np.ascontiguousarray(arr)).to(device)

    def batch(self, pos: np.ndarray) -> torch.Tensor:
        """Rows at positions ``pos`` of the train split (float32 on the device)."""
        if self.resident is not None:
            return self.resident[torch.as_tensor(pos, device=self.device)].float()
        rows = self.ids[np.sort(pos)]
        return torch.from_numpy(np.asarray(self.vectors[rows], dtype=np.float32)).to(self.device, non_blocking=True)


def _epoch_perm(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n)


def _key(cfg: TrainConfig, d_hidden: int, k: int, batch: int, n: int, info: EncoderInfo) -> dict[str, Any]:
    return {
        "d_hidden": d_hidden,
        "k": k,
        "batch_size": batch,
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "pre_bias": cfg.pre_bias,
        "unit_norm": cfg.unit_norm,
        "auxk": cfg.auxk,
        "up_proj_bias": cfg.up_proj_bias,
        "index_count": n,
        "encoder": info.to_dict(),
    }


def train_sae(cfg: TrainConfig) -> TrainResult:
    """Train (or resume training) an SAE on the store at ``cfg.index_dir``; see module doc."""
    from saefe.ingest.store import EmbeddingStore

    store = EmbeddingStore.open(cfg.index_dir)
    vectors, info = store.vectors, store.encoder_info
    if vectors.ndim != 2 or vectors.shape[1] != info.embedding_dim:
        raise CorpusError(f"index at {store.dir} has vectors of shape {vectors.shape} but its manifest says dim {info.embedding_dim}")
    check_finite(vectors, f"index at {store.dir}")
    return train_on_vectors(cfg, vectors, info, index_manifest=store.manifest)


def train_on_vectors(
    cfg: TrainConfig,
    vectors: np.ndarray,
    info: EncoderInfo,
    index_manifest: dict[str, Any] | None = None,
    sae_init: Callable[[TopKSAE], None] | None = None,
) -> TrainResult:
    """The training loop over an (N, d) array (memmap or in memory); see the module doc."""
    run = _Trainer(cfg, vectors, info, sae_init)
    run.resume()
    if not run.loop():
        save_checkpoint(run.out, run.model, run.opt, run.since, run.ckpt_state())
        log.info("stopped at step %d (max_steps); re-run to resume", run.step)
        return TrainResult(run.out, run.step, run.ep, False, run.resumed, time.time() - run.t0)
    return run.finish(index_manifest)


class _Trainer:
    """One training run's state: set-up, resume, the step, the loop, and the final report."""

    def __init__(self, cfg: TrainConfig, vectors: np.ndarray, info: EncoderInfo,
                 sae_init: Callable[[TopKSAE], None] | None) -> None:
        self.t0 = time.time()
        self.cfg, self.vectors, self.info = cfg, vectors, info
        self.out = Path(cfg.out_dir)
        self.device = device = resolve_device(cfg.device)
        n, d_emb = int(vectors.shape[0]), int(vectors.shape[1])
        self.n = n
        d_hidden, k = default_sizes(d_emb, cfg.d_hidden, cfg.k, device)
        self.d_hidden = d_hidden
        batch = int(cfg.batch_size or (4096 if device.type == "cuda" else 256))
        self.lr = float(cfg.lr or default_lr(d_hidden))
        if cfg.topk_impl not in FORWARDS:
            raise SaefeError(f"topk_impl must be one of {sorted(FORWARDS)}, got {cfg.topk_impl!r}")
        self.forward = FORWARDS[cfg.topk_impl]
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.train_ids, self.val_ids = split_ids(n, cfg.val_fraction, cfg.seed)
        self.n_train = n_train = len(self.train_ids)
        self.batch = batch = min(batch, n_train)
        self.steps_per_epoch = math.ceil(n_train / batch)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.key = _key(cfg, d_hidden, k, batch, n, info)

        torch.manual_seed(cfg.seed)
        config = SAEConfig(d_emb=d_emb, d_hidden=d_hidden, top_k=k, up_proj_bias=cfg.up_proj_bias,
                           down_proj_bias=True, pre_bias=cfg.pre_bias)
        self.model = model = TopKSAE(config, info).to(device)
        model.check_input(info, d_emb, "the training index")
        budget = (8 << 30) if device.type == "cuda" else (2 << 30)
        self.data = _Data(vectors, self.train_ids, device, budget)
        self._init_weights(sae_init)
        self.opt = torch.optim.Adam(model.parameters(), lr=self.lr, betas=(0.9, 0.999), eps=6.25e-10,
                                    weight_decay=cfg.weight_decay)
        self.since = torch.zeros(d_hidden, dtype=torch.int64, device=device)
        self.step, self.epoch, self.bstart, self.ep, self.b = 0, 0, 0, 0, 0
        self.resumed = False
        self.history: list[dict[str, float]] = []
        # variance of the data (sum over dims), for a scale-free loss: loss = batch FVU estimate
        with torch.no_grad():
            probe = self.data.batch(np.arange(min(n_train, 65536)))
            self.data_var = float(((probe - probe.mean(0)) ** 2).sum(-1).mean().clamp_min(1e-12))
        # dead: no firing in 10x the mean interval of a uniform latent (d_hidden / k samples), or a
        # quarter epoch if longer; at most 10M samples (the OpenAI top-k SAE recipe's threshold)
        self.dead_after = int(cfg.dead_after or min(10_000_000, max(10 * d_hidden // k, n_train // 4)))
        self.k_aux = int(min(cfg.k_aux or d_emb // 2, d_hidden))
        self.decay_start = self.total_steps * (1 - cfg.lr_decay)

    def _init_weights(self, sae_init: Callable[[TopKSAE], None] | None) -> None:
        """Initialisation beyond the seed's (decoder = encoder transpose is kept)."""
        cfg, model = self.cfg, self.model
        with torch.no_grad():
            if cfg.pre_bias:
                sample = np.random.Generator(np.random.PCG64(cfg.seed)).permutation(self.n_train)
                model.down_proj.bias.copy_(self.data.batch(np.sort(sample[: min(self.n_train, 65536)])).mean(0))
            if cfg.unit_norm:
                model.normalise_decoder()
                model.up_proj.weight.copy_(model.down_proj.weight.T)
            if sae_init is not None:
                sae_init(model)

    def resume(self) -> None:
        """Continue from a checkpoint made with the same settings (else refuse, naming the diff)."""
        out, key = self.out, self.key
        ckpt = load_checkpoint(out) if self.cfg.resume else None
        if ckpt is None and (out / CKPT_DIR).exists():
            shutil.rmtree(out / CKPT_DIR)
        if ckpt is None:
            return
        state, tensors = ckpt
        if state.get("key") != key:
            diff = {kk: (state.get("key", {}).get(kk), key[kk]) for kk in key if state.get("key", {}).get(kk) != key[kk]}
            raise SaefeError(
                f"checkpoint in {out / CKPT_DIR} was made with other settings {diff} (checkpoint, now); "
                "re-run with the same settings to resume, or with --restart to start over"
            )
        self.since = restore(self.model, self.opt, tensors, self.device)
        for g in self.opt.param_groups:
            g["lr"] = self.lr
        self.step, self.epoch, self.bstart = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
        self.ep, self.b = self.epoch, self.bstart
        self.history = list(state.get("history", []))
        self.resumed = True
        log.info("resuming %s from step %d (epoch %d, batch %d)", out, self.step, self.epoch, self.bstart)

    def lr_factor(self, s: int) -> float:
        """Constant, then linear to 0 over the last ``lr_decay`` of the steps."""
        if s < self.decay_start:
            return 1.0
        return max(0.0, (self.total_steps - s) / max(self.total_steps - self.decay_start, 1))

    def ckpt_state(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.ep, "batch_in_epoch": self.b, "key": self.key, "lr": self.lr,
                "history": self.history[-200:],
                "rng": {"data_order": "numpy PCG64([seed, epoch]).permutation(n_train)", "seed": self.cfg.seed},
                "total_steps": self.total_steps, "time": time.time()}

    def train_step(self, x: torch.Tensor):
        """One optimiser step on batch ``x`` (n, d_emb); returns (loss, err, aux_loss)."""
        cfg, model = self.cfg, self.model
        x_hat, values, indices, pre = self.forward(model, x)
        err = x - x_hat
        loss = (err**2).sum(-1).mean() / self.data_var
        aux_loss = None
        dead = self.since >= self.dead_after
        n_dead = int(dead.sum())
        if cfg.auxk and n_dead > 0:
            with torch.no_grad():
                aux_idx = torch.topk(pre.masked_fill(~dead, float("-inf")), min(self.k_aux, n_dead), dim=-1,
                                     sorted=False).indices
            aux_vals = F.relu(model.gather_values(x, aux_idx))
            e_hat = F.embedding_bag(aux_idx, model.down_proj.weight.T, per_sample_weights=aux_vals, mode="sum")
            e = err.detach()
            aux_loss = ((e - e_hat) ** 2).sum() / ((e - e.mean(0)) ** 2).sum().clamp_min(1e-12)
            if torch.isfinite(aux_loss):
                loss = loss + cfg.auxk_coef * aux_loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in self.opt.param_groups:
            g["lr"] = self.lr * self.lr_factor(self.step)
        if cfg.unit_norm:  # keep decoder columns on the unit sphere: drop the radial gradient
            with torch.no_grad():
                w, g = model.down_proj.weight, model.down_proj.weight.grad
                if g is not None:
                    g.sub_(w * (g * w).sum(0, keepdim=True))
        self.opt.step()
        if cfg.unit_norm:
            model.normalise_decoder()
        with torch.no_grad():
            fired = torch.bincount(indices[values > 0].flatten(), minlength=self.d_hidden) > 0
            self.since += x.shape[0]
            self.since[fired] = 0
        return loss, err, aux_loss

    def _log(self, bar, loss, err, aux_loss) -> None:
        fvu = float((err.detach() ** 2).sum(-1).mean() / self.data_var)
        if not math.isfinite(fvu):
            raise SaefeError(f"training diverged at step {self.step} (loss {fvu}); try a lower --lr")
        dead_frac = float((self.since >= self.dead_after).double().mean())
        self.history.append({"step": self.step, "fvu": round(fvu, 6), "dead": round(dead_frac, 6),
                             **({"aux": round(float(aux_loss.detach()), 6)} if aux_loss is not None else {})})
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}", fvu=f"{fvu:.4f}", dead=f"{dead_frac:.1%}", ep=self.ep)

    def loop(self) -> bool:
        """Run the epochs; True when finished, False when stopped at ``max_steps``.
        Ctrl-C saves a checkpoint first; checkpoints are also saved every ``checkpoint_every_s``."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        bar = tqdm(total=self.total_steps, initial=min(self.step, self.total_steps), disable=not cfg.progress,
                   desc=f"train-sae {self.out.name}", unit="step", dynamic_ncols=True)
        last_ckpt = time.time()
        self.model.train()
        try:
            while self.ep < cfg.epochs:
                perm = _epoch_perm(self.n_train, cfg.seed, self.ep)
                self.b = self.bstart if self.ep == self.epoch else 0
                while self.b < self.steps_per_epoch:
                    if cfg.max_steps is not None and self.step >= cfg.max_steps:
                        return False
                    x = self.data.batch(perm[self.b * self.batch : (self.b + 1) * self.batch])
                    loss, err, aux_loss = self.train_step(x)
                    self.step += 1
                    self.b += 1
                    if self.step % 10 == 0 or self.b == self.steps_per_epoch:
                        self._log(bar, loss, err, aux_loss)
                    bar.update(1)
                    if time.time() - last_ckpt > cfg.checkpoint_every_s:
                        save_checkpoint(self.out, self.model, self.opt, self.since, self.ckpt_state())
                        last_ckpt = time.time()
                self.ep += 1
                self.b = 0
        except KeyboardInterrupt:
            save_checkpoint(self.out, self.model, self.opt, self.since, self.ckpt_state())
            raise
        finally:
            bar.close()
        return True

    def finish(self, index_manifest: dict[str, Any] | None) -> TrainResult:
        """Save the SAE, evaluate on validation, write the report, drop the checkpoint."""
        from saefe.sae import metrics as sae_metrics

        cfg, out = self.cfg, self.out
        self.model.eval()
        name = cfg.name or out.name
        training = {
            "name": name,
            "lr": self.lr, "epochs": cfg.epochs, "steps": self.step, "batch_size": self.batch, "seed": cfg.seed,
            "val_fraction": cfg.val_fraction, "n_train": self.n_train, "n_val": len(self.val_ids),
            "options": {"pre_bias": cfg.pre_bias, "unit_norm": cfg.unit_norm, "auxk": cfg.auxk,
                        "auxk_coef": cfg.auxk_coef, "k_aux": self.k_aux, "dead_after": self.dead_after,
                        "topk_impl": cfg.topk_impl, "weight_decay": cfg.weight_decay, "lr_decay": cfg.lr_decay},
            "device": str(self.device),
        }
        index_part = {"dir": str(Path(cfg.index_dir).resolve()), "count": self.n}
        if index_manifest is not None:
            index_part["manifest"] = {kk: index_manifest.get(kk) for kk in ("format_version", "encoder", "count", "dim")
                                      if kk in index_manifest}
        self.model.save_pretrained(out, extra={"name": name, "training": training, "index": index_part})
        metrics, counts = sae_metrics.evaluate(self.model, self.vectors, self.val_ids, batch=min(1024, self.batch * 4),
                                               device=self.device)
        sae_metrics.write_report(out, metrics, counts, extra={
            "training": {**training, "seconds": round(time.time() - self.t0, 2), "history": self.history[-50:]},
            "index": index_part})
        if (out / CKPT_DIR).exists():
            shutil.rmtree(out / CKPT_DIR)
        return TrainResult(out, self.step, self.ep, True, self.resumed, time.time() - self.t0, metrics)


# --------------------------------------------------------------------------------------------
# CLI
