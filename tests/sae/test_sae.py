"""The top-k SAE model: seed semantics, persistence, original state dicts, input checks."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from saefe.errors import IncompatibleError, SaefeError
from saefe.manifest import EncoderInfo
from saefe.sae.model import SAEConfig, TopKSAE

INFO = EncoderInfo("google/siglip-so400m-patch14-384", 16, (384, 384))


def _model(bias=True, pre_bias=False, seed=0, d=16, h=64, k=5):
    torch.manual_seed(seed)
    m = TopKSAE(SAEConfig(d, h, k, up_proj_bias=bias, down_proj_bias=True, pre_bias=pre_bias), EncoderInfo("google/siglip-so400m-patch14-384", d, (384, 384)))
    with torch.no_grad():
        if bias:
            m.up_proj.bias.normal_(0, 0.05)
        m.down_proj.bias.normal_(0, 0.1)
    return m


class SeedSAE(nn.Module):
    """The original's formulation, written out independently as the reference."""

    def __init__(self, d_emb, d_hidden, top_k, bias):
        super().__init__()
        self.top_k = top_k
        self.up_proj = nn.Linear(d_emb, d_hidden, bias=bias)
        self.down_proj = nn.Linear(d_hidden, d_emb)

    def forward(self, x):
        h = F.relu(self.up_proj(x))
        kth = torch.kthvalue(h, h.shape[-1] - self.top_k, dim=-1, keepdim=True).values
        return self.down_proj(torch.where(h > kth, h, torch.zeros_like(h)))


def test_decoder_initialised_as_encoder_transpose():
    m = TopKSAE(SAEConfig(16, 64, 5))
    assert torch.equal(m.down_proj.weight, m.up_proj.weight.T)
    assert m.down_proj.weight.shape == (16, 64)
    assert torch.count_nonzero(m.down_proj.bias) == 0
    # a copy, not a tie: training one must not move the other
    with torch.no_grad():
        m.up_proj.weight.add_(1.0)
    assert not torch.equal(m.down_proj.weight, m.up_proj.weight.T)


@pytest.mark.parametrize("bias,pre_bias", [(False, False), (True, False), (True, True)])
def test_encode_decode_match_dense_seed_codes(bias, pre_bias):
    m = _model(bias, pre_bias)
    x = torch.randn(50, 16)
    values, indices = m.encode(x)
    assert values.shape == indices.shape == (50, 5)
    assert (values >= 0).all()
    dense = torch.zeros(50, 64).scatter(-1, indices, values)
    assert torch.allclose(dense, m.dense_codes(x), atol=1e-6)
    assert torch.allclose(m.decode(values, indices), m.down_proj(m.dense_codes(x)), atol=1e-5)
    assert torch.allclose(m(x), m.decode(values, indices))
    # leading dims are kept
    v3, i3 = m.encode(x.reshape(5, 10, 16))
    assert torch.allclose(m.decode(v3, i3).reshape(50, 16), m(x), atol=1e-6)


def test_ties_follow_the_seed_strict_rule():
    """Values equal to the (k+1)-th largest are dropped, as the seed's h > kthvalue does."""
    m = TopKSAE(SAEConfig(4, 8, 3, up_proj_bias=False, down_proj_bias=False))
    with torch.no_grad():
        m.up_proj.weight.copy_(torch.tensor([[1.0, 0, 0, 0]] * 8) * torch.tensor([5, 4, 3, 3, 1, 0, 0, 0.0])[:, None])
    x = torch.tensor([[1.0, 0, 0, 0]])  # pre-activations 5,4,3,3,1,0,0,0 : the 3s tie at k / k+1
    values, indices = m.encode(x)
    dense = torch.zeros(1, 8).scatter(-1, indices, values)
    assert torch.equal(dense, m.dense_codes(x))
    assert int((dense > 0).sum()) == 2  # 5 and 4 only


def test_matches_an_independent_seed_model():
    m = _model(bias=True)
    seed = SeedSAE(16, 64, 5, True)
    seed.load_state_dict(m.state_dict())
    x = torch.randn(30, 16)
    assert torch.allclose(m(x), seed(x), atol=1e-5)


def test_save_load_round_trip_exact_tensor_names(tmp_path):
    m = _model(bias=True, pre_bias=True)
    m.save_pretrained(tmp_path / "sae")
    raw = load_file(str(tmp_path / "sae" / "model.safetensors"))
    assert set(raw) == {"up_proj.weight", "up_proj.bias", "down_proj.weight", "down_proj.bias"}
    assert raw["up_proj.weight"].shape == (64, 16) and raw["down_proj.weight"].shape == (16, 64)
    assert torch.equal(raw["down_proj.weight"], m.down_proj.weight.detach())
    cfg = json.loads((tmp_path / "sae" / "config.json").read_text())
    assert cfg["encoder"]["model_id"] == INFO.model_id and cfg["sae"]["top_k"] == 5
    back = TopKSAE.from_pretrained(tmp_path / "sae")
    assert back.config == m.config and back.encoder_info == m.encoder_info
    x = torch.randn(7, 16)
    assert torch.equal(back(x), m(x))
    no_bias = _model(bias=False)
    no_bias.save_pretrained(tmp_path / "nb")
    assert "up_proj.bias" not in load_file(str(tmp_path / "nb" / "model.safetensors"))


def test_loads_an_original_state_dict_as_is():
    seed = SeedSAE(16, 64, 5, bias=False)
    m = TopKSAE(SAEConfig(16, 64, 5, up_proj_bias=False))
    m.load_state_dict(seed.state_dict())  # names and shapes are the original's
    x = torch.randn(9, 16)
    assert torch.allclose(m(x), seed(x), atol=1e-5)
    assert torch.equal(m.directions[:, 3], seed.down_proj.weight[:, 3])


def test_weights_not_matching_config_are_refused(tmp_path):
    m = _model()
    m.save_pretrained(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "config.json").read_text())
    cfg["sae"]["d_hidden"] = 128
    (tmp_path / "sae" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SaefeError, match="do not match"):
        TopKSAE.from_pretrained(tmp_path / "sae")
    with pytest.raises(SaefeError, match="no SAE at"):
        TopKSAE.from_pretrained(tmp_path / "missing")


def test_refuses_other_encoder_or_dimension():
    m = _model()
    m.check_input(EncoderInfo("/models/siglip-so400m-patch14-384", 16), 16, "the index")  # same weights, local copy
    with pytest.raises(IncompatibleError, match="siglip-so400m.*clip-vit|clip-vit.*siglip-so400m"):
        m.check_input(EncoderInfo("openai/clip-vit-base-patch32", 16), 16, "the index")
    with pytest.raises(IncompatibleError, match="dimension 32.*d_emb 16"):
        m.check_input(EncoderInfo("google/siglip-so400m-patch14-384", 32), 32, "the index")
