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
from saefe.sae.codes import CODES_JSON, encode_corpus, load_codes, open_codes
from saefe.sae.codes_store import ARRAYS, merge_chunks, open_arrays
from saefe.search.feature_rank import FeatureRanker
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
    # plain .npy arrays (no pickles), memory-mapped by open_codes
    assert np.load(out / "csr_data.npy", allow_pickle=False).dtype == np.float32
    assert meta["schema_version"] == 2 and not list(out.glob("*.npz"))
    mcsr, mcsc = open_codes(idx, "mysae")
    assert isinstance(mcsc.indices, np.memmap) and isinstance(mcsr.data, np.memmap)
    assert (mcsr.to_scipy() != csr).nnz == 0 and (mcsc.to_scipy() != csc).nnz == 0
    ids, w = np.array([3, 7, 11, 40]), np.array([1.0, -0.5, 2.0, 0.3])
    for a, b in zip(FeatureRanker(mcsc, 700).rank(ids, w, 25), FeatureRanker(csc, 700).rank(ids, w, 25)):
        assert np.array_equal(a, b)


def test_schema_1_npz_codes_are_still_read(index, tmp_path):
    idx, _ = index
    _sae(tmp_path / "s")
    out = encode_corpus(idx, tmp_path / "s", chunk_size=256, progress=False)
    csr, csc = load_codes(idx, tmp_path / "s")
    meta = json.loads((out / CODES_JSON).read_text())
    for name in ARRAYS:  # rewrite as an older saefe left it
        (out / f"{name}.npy").unlink()
    sp.save_npz(out / "codes_csr.npz", csr, compressed=False)
    sp.save_npz(out / "codes_csc.npz", csc, compressed=False)
    meta.pop("schema_version")
    meta["format"] = "saefe-sae-codes-1"
    (out / CODES_JSON).write_text(json.dumps(meta))
    old_csr, old_csc = open_codes(idx, tmp_path / "s")
    assert (old_csr != csr).nnz == 0 and (old_csc != csc).nnz == 0
    (out / "codes_csc.npz").unlink()
    with pytest.raises(SaefeError, match="older saefe.*re-run `saefe encode-sae --overwrite`"):
        open_codes(idx, tmp_path / "s")


def test_merge_drops_zeros_and_sorts_postings(tmp_path):
    v = np.array([[0.5, 0.0, 2.0], [1.0, 3.0, 0.0], [0.0, 0.0, 0.0], [4.0, 1.5, 0.25]], np.float32)
    i = np.array([[4, 1, 0], [0, 2, 4], [1, 2, 3], [3, 0, 4]], np.int32)
    chunks = [lambda: (v[:2], i[:2]), lambda: (v[2:], i[2:])]
    assert merge_chunks(chunks, 4, 5, tmp_path) == 7
    csr, csc = open_arrays(tmp_path, (4, 5))
    dense = np.zeros((4, 5), np.float32)
    for r in range(4):
        for c in range(3):
            dense[r, i[r, c]] += v[r, c]
    assert np.array_equal(csr.to_scipy().toarray(), dense) and np.array_equal(csc.to_scipy().toarray(), dense)
    assert csr.indices.tolist() == [0, 4, 0, 2, 0, 3, 4] and csc.indices.tolist() == [0, 1, 3, 1, 3, 0, 3]
    with pytest.raises(SaefeError, match="4 rows, expected 5"):
        merge_chunks(chunks, 5, 5, tmp_path / "x")


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
