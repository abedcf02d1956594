"""Convert an original SAEFE checkpoint (.pt) to this project's format, without running its code.

The original saved ``torch.save({"model": state_dict, "config": TrainConfig(model=SAEConfig(...),
lr, weight_decay, batch_size, epochs, compile)})`` with ``TrainConfig`` pickled from the training
script's ``__main__`` and ``SAEConfig`` from a module named ``model``. Such a pickle names those
classes as globals, so a plain ``torch.load`` would import / call whatever the file names. Here
the file is read with torch's weights-only unpickler, and the only extra globals it may name are
``__main__.TrainConfig`` and ``model.SAEConfig`` (plus ``__main__.SAEConfig``), each mapped to an
inert stand-in class that just collects attributes. Any other global (``os.system``, a class of
the attacker's choosing, ...) makes the load fail before anything runs, and the import is refused.

    saefe import-sae sae.pt --out weights/original [--model-id google/siglip-so400m-patch14-384]
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from saefe.errors import SaefeError
from saefe.manifest import EncoderInfo, file_sha256
from saefe.sae.model import SAEConfig, TopKSAE

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "google/siglip-so400m-patch14-384"
DEFAULT_IMAGE_SIZE = 384


class _Inert:
    """Stands in for a pickled config class: accepts any args, runs nothing, keeps attributes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args = args
        self.__dict__.update({k: v for k, v in kwargs.items() if isinstance(k, str)})

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


class OriginalTrainConfig(_Inert):
    """Stand-in for the original's ``__main__.TrainConfig``."""


class OriginalSAEConfig(_Inert):
    """Stand-in for the original's ``model.SAEConfig``."""


ALLOWED_GLOBALS = [
    (OriginalTrainConfig, "__main__.TrainConfig"),
    (OriginalSAEConfig, "model.SAEConfig"),
    (OriginalSAEConfig, "__main__.SAEConfig"),
]


def _safe_load(path: Path) -> Any:
    """torch's weights-only unpickler plus the inert stand-ins above: no other global can load."""
    if not path.is_file():
        raise SaefeError(f"no checkpoint file at {path}")
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (bad zip), EOFError (truncated), ...
        msg = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        m = re.search(r"GLOBAL ([\w.]+)", str(e)) or re.search(r"unsupported GLOBAL ([\w.]+)", str(e))
        if m or "global" in str(e).lower() or "reduce" in str(e).lower():
            what = m.group(1) if m else msg
            raise SaefeError(
                f"refusing {path}: it refers to {what}, which is not part of the original SAEFE checkpoint "
                "format (allowed: tensors, __main__.TrainConfig, model.SAEConfig); nothing from the file was run"
            ) from None
        raise SaefeError(f"cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: {msg}); is it complete?") from None


def _plain(v: Any) -> Any:
    """JSON-safe copy of an original config value (dtypes and devices become strings)."""
    if isinstance(v, _Inert):
        return {k: _plain(x) for k, x in v.as_dict().items()}
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def _attr(obj: Any, name: str) -> Any:
    if isinstance(obj, _Inert):
        return obj.as_dict().get(name)
    if isinstance(obj, dict):
        return obj.get(name)
    return None


def parse_checkpoint(obj: Any, top_k: int | None = None) -> tuple[SAEConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(SAEConfig, state dict with seed names, original config as plain JSON) from a loaded file."""
    if isinstance(obj, dict) and "model" in obj:
        state, orig_cfg = obj["model"], obj.get("config")
    elif isinstance(obj, dict) and any(str(k).endswith("up_proj.weight") for k in obj):
        state, orig_cfg = obj, None  # a bare state dict
    else:
        raise SaefeError("checkpoint is not in the original SAEFE format (expected a dict with 'model' and 'config')")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SaefeError("checkpoint's 'model' entry is not a state dict of tensors")
    # torch.compile'd models save their parameters under _orig_mod.
    state = {re.sub(r"^(_orig_mod\.|module\.)+", "", str(k)): v for k, v in state.items()}
    known = {"up_proj.weight", "up_proj.bias", "down_proj.weight", "down_proj.bias"}
    extra = sorted(set(state) - known)
    if extra:
        raise SaefeError(f"checkpoint has tensors the top-k SAE does not: {extra}")
    if "up_proj.weight" not in state or "down_proj.weight" not in state:
        raise SaefeError(f"checkpoint lacks up_proj.weight / down_proj.weight (has {sorted(state)})")
    W = state["up_proj.weight"]
    if W.ndim != 2:
        raise SaefeError(f"up_proj.weight has shape {tuple(W.shape)}, expected (d_hidden, d_emb)")
    d_hidden, d_emb = int(W.shape[0]), int(W.shape[1])

    model_cfg = _attr(orig_cfg, "model") if orig_cfg is not None else None
    if model_cfg is None and isinstance(orig_cfg, OriginalSAEConfig):
        model_cfg = orig_cfg
    k = _attr(model_cfg, "top_k") if model_cfg is not None else None
    if top_k is not None:
        if k is not None and int(k) != int(top_k):
            log.warning("overriding the checkpoint's top_k %s with %s", k, top_k)
        k = top_k
    if k is None:
        raise SaefeError("checkpoint records no SAEConfig.top_k; pass --k")
    for name, val in (("d_emb", d_emb), ("d_hidden", d_hidden)):
        rec = _attr(model_cfg, name) if model_cfg is not None else None
        if rec is not None and int(rec) != val:
            raise SaefeError(f"checkpoint config says {name}={rec} but up_proj.weight has shape {tuple(W.shape)}")
    config = SAEConfig(
        d_emb=d_emb, d_hidden=d_hidden, top_k=int(k),
        up_proj_bias="up_proj.bias" in state, down_proj_bias="down_proj.bias" in state, pre_bias=False,
    )
    expected = {"up_proj.weight": (d_hidden, d_emb), "down_proj.weight": (d_emb, d_hidden), "up_proj.bias": (d_hidden,), "down_proj.bias": (d_emb,)}
    for name, t in state.items():
        if tuple(t.shape) != expected[name]:
            raise SaefeError(f"{name} has shape {tuple(t.shape)}, expected {expected[name]}")
        if not t.is_floating_point():
            raise SaefeError(f"{name} has dtype {t.dtype}, expected a floating-point tensor")
        if not torch.isfinite(t).all():
            raise SaefeError(f"{name} contains NaN or inf values")
    state = {k2: v.to(torch.float32) for k2, v in state.items()}
    return config, state, _plain(orig_cfg) if orig_cfg is not None else {}


def import_sae(
    path: str | Path,
    out_dir: str | Path,
    model_id: str = DEFAULT_MODEL_ID,
    image_size: int = DEFAULT_IMAGE_SIZE,
    top_k: int | None = None,
    name: str | None = None,
) -> TopKSAE:
    """Convert ``path`` to ``out_dir`` (model.safetensors + config.json); returns the SAE."""
    path, out = Path(path), Path(out_dir)
    config, state, orig = parse_checkpoint(_safe_load(path), top_k)
    info = EncoderInfo(model_id=model_id, embedding_dim=config.d_emb, image_size=(image_size, image_size))
    sae = TopKSAE(config, info)
    sae.load_state_dict(state)
    sae.save_pretrained(
        out,
        extra={
            "name": name or out.name,
            "imported_from": {"file": str(path.resolve()), "sha256": file_sha256(path), "original_config": orig},
        },
    )
    return sae.eval()
