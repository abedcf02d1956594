"""Training checkpoints: safetensors (model, Adam moments, dead-latent tracker, torch RNG) plus a
JSON file with counters and the settings key. The JSON is written last and is the commit point,
so a run killed mid-save resumes from the previous checkpoint; nothing is pickled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from saefe.errors import SaefeError
from saefe.manifest import read_json, write_json_atomic
from saefe.sae.model import TopKSAE

CKPT_DIR = "checkpoint"
CKPT_JSON = "state.json"




def _ckpt_tensors(model: TopKSAE, opt: torch.optim.Optimizer, since: torch.Tensor) -> dict[str, torch.Tensor]:
    t: dict[str, torch.Tensor] = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                t[f"optim.{names[id(p)]}.{key}"] = val.detach().contiguous().cpu()
    t["tracker.samples_since_fired"] = since.detach().cpu()
    t["rng.torch"] = torch.get_rng_state()
    return t


def save_checkpoint(out: Path, model, opt, since, state: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    ck = out / CKPT_DIR
    ck.mkdir(parents=True, exist_ok=True)
    fname = f"state-{state['step']:09d}.safetensors"
    tmp = ck / (fname + ".tmp")
    save_file(_ckpt_tensors(model, opt, since), str(tmp))
    os.replace(tmp, ck / fname)
    write_json_atomic(ck / CKPT_JSON, {**state, "tensors": fname, "format": "saefe-sae-checkpoint-1"})
    for old in ck.glob("state-*.safetensors"):
        if old.name != fname:
            old.unlink(missing_ok=True)


def load_checkpoint(out: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    from safetensors.torch import load_file

    ck = out / CKPT_DIR
    if not (ck / CKPT_JSON).exists():
        return None
    try:
        state = read_json(ck / CKPT_JSON)
        tensors = load_file(str(ck / state["tensors"]))
    except Exception as e:  # corrupt checkpoint: say so, let the user restart
        raise SaefeError(f"checkpoint in {ck} is unreadable ({e}); re-run with --restart to train from scratch") from e
    return state, tensors


def restore(model: TopKSAE, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], device) -> torch.Tensor:
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    params = dict(model.named_parameters())
    for name, p in params.items():
        st = {}
        for key in ("step", "exp_avg", "exp_avg_sq"):
            t = tensors.get(f"optim.{name}.{key}")
            if t is not None:
                # Adam keeps 'step' on the CPU; moments follow the parameter's device and layout
                st[key] = t.clone() if key == "step" else torch.empty_like(p).copy_(t)
        if st:
            opt.state[p] = st
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    return tensors["tracker.samples_since_fired"].to(device)
