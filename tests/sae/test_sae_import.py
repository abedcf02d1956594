"""import-sae: original .pt checkpoints are converted without running any code from them."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from saefe.errors import SaefeError
from saefe.sae.model import TopKSAE
from saefe.sae.original import import_sae


@pytest.fixture
def original_classes(monkeypatch):
    """TrainConfig in a fake __main__ and SAEConfig in a module named `model`, as the original pickled them."""
    fake_main = types.ModuleType("__main__")
    model_mod = types.ModuleType("model")

    @dataclasses.dataclass
    class SAEConfig:
        d_emb: int = 16
        d_hidden: int = 64
        top_k: int = 6
        up_proj_bias: bool = False
        device: str = "cuda"
        dtype: torch.dtype = torch.bfloat16

    @dataclasses.dataclass
    class TrainConfig:
        model: SAEConfig = dataclasses.field(default_factory=SAEConfig)
        lr: float = 4e-4
        weight_decay: float = 0.0
        batch_size: int = 4096
        epochs: int = 10
        compile: bool = True

    SAEConfig.__module__, SAEConfig.__qualname__ = "model", "SAEConfig"
    TrainConfig.__module__, TrainConfig.__qualname__ = "__main__", "TrainConfig"
    model_mod.SAEConfig = SAEConfig
    fake_main.TrainConfig = TrainConfig
    monkeypatch.setitem(sys.modules, "model", model_mod)
    monkeypatch.setitem(sys.modules, "__main__", fake_main)
    return fake_main, TrainConfig, SAEConfig


class _Seed(nn.Module):
    def __init__(self, d, h, k, bias):
        super().__init__()
        self.k = k
        self.up_proj = nn.Linear(d, h, bias=bias)
        self.down_proj = nn.Linear(h, d)
        with torch.no_grad():
            self.down_proj.bias.normal_(0, 0.1)

    def forward(self, x):
        h = F.relu(self.up_proj(x))
        kth = torch.kthvalue(h, h.shape[-1] - self.k, dim=-1, keepdim=True).values
        return self.down_proj(torch.where(h > kth, h, torch.zeros_like(h)))


@pytest.mark.parametrize("bias,compiled", [(False, False), (True, True)])
def test_import_happy_path(original_classes, tmp_path, bias, compiled):
    _, TrainConfig, SAEConfig = original_classes
    seed = _Seed(16, 64, 6, bias)
    sd = seed.state_dict()
    if compiled:  # torch.compile'd models save under _orig_mod.
        sd = {f"_orig_mod.{k}": v for k, v in sd.items()}
    torch.save({"model": sd, "config": TrainConfig(model=SAEConfig(up_proj_bias=bias))}, tmp_path / "orig.pt")
    sae = import_sae(tmp_path / "orig.pt", tmp_path / "out")
    assert sae.config.top_k == 6 and sae.config.up_proj_bias == bias and not sae.config.pre_bias
    raw = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(raw) == set(seed.state_dict())
    back = TopKSAE.from_pretrained(tmp_path / "out")
    x = torch.randn(20, 16)
    assert torch.allclose(back(x), seed(x), atol=1e-5)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["encoder"] == {"model_id": "google/siglip-so400m-patch14-384", "embedding_dim": 16, "image_size": [384, 384], "normalisation": "l2"}
    orig = cfg["imported_from"]["original_config"]
    assert orig["lr"] == 4e-4 and orig["model"]["dtype"] == "torch.bfloat16" and orig["model"]["top_k"] == 6


def test_import_cli_with_model_id(original_classes, tmp_path, capsys):
    from saefe.cli.main import main

    _, TrainConfig, SAEConfig = original_classes
    torch.save({"model": _Seed(16, 64, 6, False).state_dict(), "config": TrainConfig()}, tmp_path / "orig.pt")
    assert main(["import-sae", str(tmp_path / "orig.pt"), "--out", str(tmp_path / "w"), "--model-id", "/models/siglip-base"]) == 0
    assert "d_hidden 64" in capsys.readouterr().out
    assert TopKSAE.from_pretrained(tmp_path / "w").encoder_info.model_id == "/models/siglip-base"


def test_malicious_checkpoint_is_refused_and_nothing_runs(original_classes, tmp_path, capsys):
    from saefe.cli.main import main

    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": _Seed(16, 64, 6, False).state_dict(), "config": Evil()}, tmp_path / "evil.pt")
    # the file really is an exploit: an unrestricted unpickler would have run it
    assert b"system" in (tmp_path / "evil.pt").read_bytes()
    with pytest.raises(SaefeError, match="refusing .*system"):
        import_sae(tmp_path / "evil.pt", tmp_path / "out")
    assert main(["import-sae", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "out")]) == 2
    assert "refusing" in capsys.readouterr().err
    assert not marker.exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_malicious_file_really_calls_os_system(tmp_path):
    """Control for the test above, read without executing: the checkpoint's pickle imports
    os.system and REDUCEs it, so an unrestricted loader would have run the command."""
    import pickletools
    import zipfile

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"config": Evil()}, tmp_path / "evil.pt")
    with zipfile.ZipFile(tmp_path / "evil.pt") as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(data)]
    assert ("GLOBAL", f"{os.system.__module__} system") in ops and ("REDUCE", None) in ops


def test_unknown_global_is_refused(original_classes, tmp_path):
    fake_main, TrainConfig, _ = original_classes

    @dataclasses.dataclass
    class Other:
        x: int = 1

    Other.__module__, Other.__qualname__ = "__main__", "Other"
    fake_main.Other = Other
    torch.save({"model": _Seed(16, 64, 6, False).state_dict(), "config": TrainConfig(), "extra": Other()}, tmp_path / "o.pt")
    with pytest.raises(SaefeError, match="__main__.Other"):
        import_sae(tmp_path / "o.pt", tmp_path / "out")


def test_corrupt_and_truncated_files(original_classes, tmp_path):
    _, TrainConfig, _ = original_classes
    torch.save({"model": _Seed(16, 64, 6, False).state_dict(), "config": TrainConfig()}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint at all" * 10)
    for name in ("trunc.pt", "junk.pt"):
        with pytest.raises(SaefeError, match="cannot read"):
            import_sae(tmp_path / name, tmp_path / "out")
    with pytest.raises(SaefeError, match="no checkpoint file"):
        import_sae(tmp_path / "missing.pt", tmp_path / "out")


def test_wrong_contents_are_refused(original_classes, tmp_path):
    _, TrainConfig, SAEConfig = original_classes
    sd = _Seed(16, 64, 6, False).state_dict()
    torch.save({"model": sd, "config": TrainConfig(model=SAEConfig(d_hidden=128))}, tmp_path / "a.pt")
    with pytest.raises(SaefeError, match="d_hidden=128"):
        import_sae(tmp_path / "a.pt", tmp_path / "out")
    torch.save({"model": {**sd, "encoder.extra": torch.zeros(3)}, "config": TrainConfig()}, tmp_path / "b.pt")
    with pytest.raises(SaefeError, match="encoder.extra"):
        import_sae(tmp_path / "b.pt", tmp_path / "out")
    torch.save([1, 2, 3], tmp_path / "c.pt")
    with pytest.raises(SaefeError, match="not in the original SAEFE format"):
        import_sae(tmp_path / "c.pt", tmp_path / "out")
    nan = dict(sd)
    nan["up_proj.weight"] = sd["up_proj.weight"].clone()
    nan["up_proj.weight"][0, 0] = float("nan")
    torch.save({"model": nan, "config": TrainConfig()}, tmp_path / "d.pt")
    with pytest.raises(SaefeError, match="NaN"):
        import_sae(tmp_path / "d.pt", tmp_path / "out")
