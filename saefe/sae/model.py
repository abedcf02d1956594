"""The top-k sparse autoencoder, whole, in one file (seed semantics, nanoGPT-sized).

    a = TopK(ReLU(up_proj(x - b_pre)))      keep values strictly greater than the k-th largest
    x_hat = down_proj(a)                    feature j's direction = down_proj.weight[:, j]

Tensor names are the original's (``up_proj.weight`` d_hidden x d_emb, ``up_proj.bias``,
``down_proj.weight`` d_emb x d_hidden, ``down_proj.bias``) so its state dicts load as they are.
``pre_bias`` (off for imported checkpoints) subtracts ``down_proj.bias`` before encoding, which
centres the input on the decoder's bias as in current top-k SAE practice.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from saefe.errors import IncompatibleError, SaefeError
from saefe.manifest import EncoderInfo, write_json_atomic

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass
class SAEConfig:
    d_emb: int = 1152
    d_hidden: int = 262144
    top_k: int = 128
    up_proj_bias: bool = False
    down_proj_bias: bool = True
    pre_bias: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class TopKSAE(nn.Module):
    def __init__(self, config: SAEConfig, encoder_info: EncoderInfo | None = None):
        super().__init__()
        if not 0 < config.top_k <= config.d_hidden:
            raise SaefeError(f"top_k must be in 1..d_hidden ({config.d_hidden}), got {config.top_k}")
        self.config = config
        self.encoder_info = encoder_info
        self.up_proj = nn.Linear(config.d_emb, config.d_hidden, bias=config.up_proj_bias)
        self.down_proj = nn.Linear(config.d_hidden, config.d_emb, bias=config.down_proj_bias)
        # Decoder starts as the encoder's transpose (seed). It is stored column-major, i.e.
        # down_proj.weight (d_emb, d_hidden) is the transpose view of a contiguous (d_hidden,
        # d_emb) buffer, so feature j's direction is one contiguous row of down_proj.weight.T and
        # the sparse decode (embedding_bag) and its backward touch only k rows per input. The
        # state dict still holds down_proj.weight with shape (d_emb, d_hidden) (seed layout).
        self.down_proj.weight = nn.Parameter(self.up_proj.weight.detach().clone().T)
        with torch.no_grad():
            if self.down_proj.bias is not None:
                self.down_proj.bias.zero_()

    # -- the model -----------------------------------------------------------------------
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """x . W_enc[j] + b_j for every feature j, before ReLU and gating."""
        if self.config.pre_bias and self.down_proj.bias is not None:
            x = x - self.down_proj.bias
        return self.up_proj(x)

    def select(self, pre: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Seed gating on pre-activations: (values, indices), each (..., k).

        Values are ReLU(pre) at the k largest positions, zeroed where not strictly greater
        than the (k+1)-th largest ReLU value, which is exactly the seed's
        ``h > kthvalue(h, d_hidden - k)`` rule, ties included.
        """
        k = self.config.top_k if k is None else k
        h = F.relu(pre)
        if k >= h.shape[-1]:
            values, indices = h, torch.arange(h.shape[-1], device=h.device).expand_as(h)
            return values, indices
        top, indices = torch.topk(h, k + 1, dim=-1, sorted=True)
        values = top[..., :k]
        values = torch.where(values > top[..., k:], values, torch.zeros_like(values))
        return values, indices[..., :k]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse codes: (values, indices), each (..., k); values >= 0 (ReLU, then top-k)."""
        return self.select(self.pre_activations(x))

    def gather_values(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Pre-activations at ``indices`` only, differentiable: (x - b_pre) . W_enc[j] + b_j.

        Training computes the dense pre-activations without autograd just to pick the top-k,
        then recomputes these k values here, so the backward is k rows per input instead of a
        dense (batch, d_hidden) gradient and matmul.
        """
        if self.config.pre_bias and self.down_proj.bias is not None:
            x = x - self.down_proj.bias
        rows = F.embedding(indices, self.up_proj.weight)  # (..., k, d_emb)
        out = torch.einsum("...kd,...d->...k", rows, x.to(rows.dtype))
        if self.up_proj.bias is not None:
            out = out + self.up_proj.bias[indices]
        return out

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Sum of the selected decoder columns (embedding_bag: never a dense (N, d_hidden))."""
        table = self.down_proj.weight.T  # (d_hidden, d_emb), contiguous rows
        lead = indices.shape[:-1]
        idx = indices.reshape(-1, indices.shape[-1])
        w = values.reshape(-1, values.shape[-1]).to(table.dtype)
        out = F.embedding_bag(idx, table, per_sample_weights=w, mode="sum").reshape(*lead, table.shape[1])
        if self.down_proj.bias is not None:
            out = out + self.down_proj.bias
        return out

    def dense_codes(self, x: torch.Tensor) -> torch.Tensor:
        """The seed's formulation: ReLU, then keep values strictly greater than the k-th largest."""
        h = F.relu(self.pre_activations(x))
        kth = torch.kthvalue(h, h.shape[-1] - self.config.top_k, dim=-1, keepdim=True).values
        return torch.where(h > kth, h, torch.zeros_like(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(*self.encode(x))

    @property
    def directions(self) -> torch.Tensor:
        """(d_emb, d_hidden): column j is feature j's direction in embedding space."""
        return self.down_proj.weight

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        """Unit-norm decoder columns (keeps activations comparable across features)."""
        w = self.down_proj.weight
        w.div_(w.norm(dim=0, keepdim=True).clamp_min(1e-8))

    # -- persistence (transformers-style) ------------------------------------------------
    def save_pretrained(self, out_dir: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = out / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / WEIGHTS_NAME)
        cfg: dict[str, Any] = {"sae": asdict(self.config), "model_type": "saefe-topk-sae"}
        if self.encoder_info is not None:
            cfg["encoder"] = self.encoder_info.to_dict()
        if extra:
            cfg.update(extra)
        write_json_atomic(out / CONFIG_NAME, cfg)
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "TopKSAE":
        from safetensors.torch import load_file

        p = Path(path)
        if not (p / CONFIG_NAME).exists() or not (p / WEIGHTS_NAME).exists():
            raise SaefeError(
                f"no SAE at {p} (expected {CONFIG_NAME} and {WEIGHTS_NAME}); train one with "
                "`saefe train-sae` or convert one with `saefe import-sae`"
            )
        cfg = json.loads((p / CONFIG_NAME).read_text())
        config = SAEConfig.from_dict(cfg["sae"])
        info = EncoderInfo.from_dict(cfg["encoder"]) if "encoder" in cfg else None
        model = cls(config, info)
        state = load_file(str(p / WEIGHTS_NAME))
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if expected != got:
            raise SaefeError(f"SAE weights at {p} do not match its config: expected {expected}, got {got}")
        model.load_state_dict(state)
        return model.to(device).eval()

    def check_input(self, info: EncoderInfo | None, dim: int, what: str) -> None:
        """Refuse embeddings from another encoder or of another dimension, naming both sides."""
        if dim != self.config.d_emb:
            raise IncompatibleError(f"{what} has dimension {dim} but the SAE expects d_emb {self.config.d_emb}")
        if info is not None and self.encoder_info is not None:
            self.encoder_info.check_compatible(info, "the SAE", what)
