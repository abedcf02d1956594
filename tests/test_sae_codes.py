"""encode-sae: sparse codes beside the index, resumable, tied to the SAE that made them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from saefe.errors import CorpusError, IncompatibleError, SaefeError
from saefe.manifest import EncoderInfo
from saefe.sae.model import SAEConfig, TopKSAE
from saefe.sae.codes import CODES_JSON, encode_corpus, load_codes
from saefe.sae.metrics import planted_data
from saefe.ingest.store import write_store

INFO = EncoderInfo("demo/tiny-siglip", 24, (64, 64))


def _sae(path, seed=0, info=INFO, d=24):
    torch.manual_seed(seed)
    m = TopKSAE(SAEConfig(d, 96, 5, up_proj_bias=True, pre_bias=True), info)
    with torch.no_grad():
        m.up_proj.bias.normal_(0, 0.05)
        m.down_proj.bias.normal_(0, 0.05)
    m.save_pretrained(path)
    return m


@pytest.fixture
def index(tmp_path):
    x, _ = planted_data(700, 24, 40, 3, seed=5)
    write_store(tmp_path / "index", x, None, INFO)
    return tmp_path / "index", x


def test_codes_round_trip(index, tmp_path):
    idx, x = index
    sae = _sae(tmp_path / "weights" / "mysae")
    out = encode_corpus(idx, tmp_path / "weights" / "mysae", chunk_size=128, progress=False)
    assert out == idx / "codes" / "mysae"
    csr, csc = load_codes(idx, tmp_path / "weights" / "mysae")
    assert csr.shape == csc.shape == (700, 96)
    assert sp.isspmatrix_csr(csr) and sp.isspmatrix_csc(csc)
    assert (csr != csc).nnz == 0
    v = torch.from_numpy(np.asarray(x, dtype=np.float16).astype(np.float32))  # the store keeps fp16
    values, indices = sae.encode(v)
    dense = torch.zeros(700, 96).scatter(-1, indices, values).detach().numpy()
    assert np.allclose(csr.toarray(), dense, atol=1e-6)
    assert csr.getnnz(axis=1).max() <= 5 and csr.nnz > 0 and (csr.data > 0).all()
    for i in (0, 333, 699):  # row i == sae.encode(vector i)
        row = csr.getrow(i)
        vi, ii = sae.encode(v[i])
        keep = vi > 0
        assert sorted(row.indices.tolist()) == sorted(ii[keep].tolist())
    meta = json.loads((out / CODES_JSON).read_text())
    assert meta["sae"]["name"] == "mysae" and meta["sae"]["config"]["top_k"] == 5
    assert len(meta["sae"]["weights_sha256"]) == 64
    assert meta["index"]["count"] == 700 and meta["index"]["encoder"] == INFO.to_dict()
    assert not (out / "chunks").exists()
    # by name too
    csr2, _ = load_codes(idx, "mysae")
    assert (csr2 != csr).nnz == 0
    # pickles are refused by the loader
    with np.load(out / "codes_csr.npz", allow_pickle=False) as z:
        assert z["data"].dtype == np.float32


def test_resume_from_committed_chunks(index, tmp_path, monkeypatch):
    idx, _ = index
    _sae(tmp_path / "s")
    out = encode_corpus(idx, tmp_path / "s", chunk_size=100, progress=False, stop_after_chunks=3)
    committed = sorted(p.name for p in (out / "chunks").glob("*.npz"))
    assert committed == ["000000.npz", "000001.npz", "000002.npz"]
    assert not (out / CODES_JSON).exists()
    with pytest.raises(SaefeError, match="no SAE codes|incomplete"):
        load_codes(idx, tmp_path / "s")
    # the resumed run must not recompute the committed chunks
    calls = []
    orig = TopKSAE.encode

    def counting(self, x):
        calls.append(len(x))
        return orig(self, x)

    monkeypatch.setattr(TopKSAE, "encode", counting)
    encode_corpus(idx, tmp_path / "s", chunk_size=100, progress=False)
    assert sum(calls) == 400
    monkeypatch.setattr(TopKSAE, "encode", orig)
    csr, _ = load_codes(idx, tmp_path / "s")
    fresh = encode_corpus(idx, tmp_path / "s", chunk_size=100, progress=False, overwrite=True)
    csr2, _ = load_codes(idx, tmp_path / "s")
    assert (csr != csr2).nnz == 0 and fresh == out


def test_codes_refuse_a_different_sae(index, tmp_path):
    idx, _ = index
    _sae(tmp_path / "w" / "s", seed=0)
    encode_corpus(idx, tmp_path / "w" / "s", chunk_size=256, progress=False)
    _sae(tmp_path / "w" / "s", seed=1)  # retrained under the same name
    with pytest.raises(IncompatibleError, match="different|sha256.*re-run"):
        load_codes(idx, tmp_path / "w" / "s")
    encode_corpus(idx, tmp_path / "w" / "s", chunk_size=256, progress=False)  # re-encoding fixes it
    load_codes(idx, tmp_path / "w" / "s")


def test_sae_refuses_mismatched_index(index, tmp_path):
    idx, _ = index
    _sae(tmp_path / "other", info=EncoderInfo("openai/clip-vit-base-patch32", 24))
    with pytest.raises(IncompatibleError, match="clip-vit-base-patch32.*tiny-siglip|tiny-siglip.*clip-vit-base-patch32"):
        encode_corpus(idx, tmp_path / "other", progress=False)
    _sae(tmp_path / "wide", info=EncoderInfo("demo/tiny-siglip", 32), d=32)
    with pytest.raises(IncompatibleError, match="dimension 24.*d_emb 32"):
        encode_corpus(idx, tmp_path / "wide", progress=False)


def test_nan_in_store_is_a_clear_error(tmp_path):
    x, _ = planted_data(50, 24, 10, 2, seed=1)
    x[17, 3] = np.inf
    write_store(tmp_path / "index", x, None, INFO)
    _sae(tmp_path / "s")
    with pytest.raises(CorpusError, match="non-finite.*row 17"):
        encode_corpus(tmp_path / "index", tmp_path / "s", progress=False)


def test_cli_encode_sae(index, tmp_path, capsys):
    from saefe.cli.main import main

    idx, _ = index
    _sae(tmp_path / "s")
    assert main(["encode-sae", "--index", str(idx), "--sae", str(tmp_path / "s"), "--no-progress"]) == 0
    assert "700 images" in capsys.readouterr().out
    assert main(["encode-sae", "--index", str(idx), "--sae", str(tmp_path / "missing")]) == 2
