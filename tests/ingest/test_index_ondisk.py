"""ivfpq-ondisk: built in shards (resumable), merged on disk, searched with exact re-ranking."""

from __future__ import annotations

import json

import numpy as np
import pytest

from saefe.errors import SaefeError
from saefe.ingest import index_ondisk
from saefe.ingest.index import IndexConfig, VectorIndex, _exact_search, build_saved_index
from saefe.ingest.index_ondisk import OnDiskIndex, OnDiskParams
from saefe.ingest.index_sizing import estimate_disk, estimate_memory, kinds_within
from saefe.ingest.store import write_store
from saefe.manifest import EncoderInfo

D = 32


def clustered(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, D))
    x = centres[rng.integers(0, 40, n)] + 0.5 * rng.normal(size=(n, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("ondisk") / "index"
    write_store(d, clustered(3000), None, EncoderInfo("demo/tiny", D))
    return d


def _cfg(**ondisk) -> IndexConfig:
    return IndexConfig(kind="ivfpq-ondisk", use_gpu=False, ondisk={"nlist": 16, "pq_m": 8, "nbits": 6, "shard_size": 1000, **ondisk})


def test_all_lists_and_full_rerank_give_exact_search(store):
    vi = build_saved_index(store, _cfg(nprobe=16, rerank=3000))
    assert isinstance(vi, OnDiskIndex) and vi.kind == "ivfpq-ondisk" and vi.ntotal == 3000
    assert not (store / "index_shards").exists()
    again = VectorIndex.load(store)  # through the generic loader, from the files alone
    assert isinstance(again, OnDiskIndex) and again.params["nprobe"] == 16
    vectors = np.load(store / "vectors.npy")
    q = clustered(20, seed=9)
    s, ids = again.search(q, 10)
    es, eids = _exact_search(vectors, q, 10)
    assert np.array_equal(ids, eids)
    # scores are the exact cosines from the fp16 store, not PQ estimates
    assert np.allclose(s, np.einsum("qd,qkd->qk", q, vectors[ids].astype(np.float32)), atol=1e-5)
    info = json.loads((store / "index.json").read_text())
    assert (store / info["ivfdata"]).stat().st_size >= 3000 * (6 + 8)  # 8 codes of 6 bits + an int64 id each


def test_tuned_search_and_bad_queries(store):
    vi = build_saved_index(store, _cfg())
    assert 1 <= vi.params["nprobe"] <= 16 and vi.params["rerank"] >= 10
    s, ids = vi.search(clustered(1, seed=3)[0], 5)
    assert ids.shape == (1, 5) and (np.diff(s[0]) <= 1e-6).all()
    with pytest.raises(SaefeError, match="dimension"):
        vi.search(np.zeros(D + 1, np.float32), 5)
    with pytest.raises(SaefeError, match="NaN"):
        vi.search(np.full(D, np.nan, np.float32), 5)


def test_interrupted_fill_resumes_from_written_shards(store, monkeypatch):
    calls = []
    real = index_ondisk.fill_shard

    def flaky(trained, vectors, lo, hi, out):
        calls.append(lo)
        if lo == 2000 and len(calls) == 3:
            raise KeyboardInterrupt  # the build is killed while filling the third shard
        return real(trained, vectors, lo, hi, out)

    monkeypatch.setattr(index_ondisk, "fill_shard", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_saved_index(store, _cfg(nprobe=16, rerank=3000, train_size=2500))
    assert sorted(p.name for p in (store / "index_shards").glob("shard_*.faiss")) == ["shard_00000.faiss", "shard_00001.faiss"]
    calls.clear()
    vi = build_saved_index(store, _cfg(nprobe=16, rerank=3000, train_size=2500))
    assert calls == [2000]  # only the missing shard is filled again
    assert vi.ntotal == 3000 and len(list(store.glob("index-*.ivfdata"))) == 1  # the old lists file is gone


def test_memory_estimates_choose_ondisk_past_the_budget():
    n, d = 100_000_000, 1152
    assert estimate_memory("ivfpq-ondisk", n, d) < 1 << 30 < estimate_memory("hnsw", n, d)
    assert estimate_memory("flat", 1000, d) == 1000 * d * 4 + (32 << 20)
    assert estimate_disk("ivfpq-ondisk", n, d) == n * (64 + 8)
    assert kinds_within(n, d, 2 << 30) == ["ivfpq-ondisk"]
    assert kinds_within(1_000_000, d, 64 << 30)[0] == "hnsw"
    with pytest.raises(SaefeError):
        estimate_memory("nope", n, d)


def test_tiny_corpora_drop_opq_and_shrink_codes():
    p = OnDiskParams().resolve(500, 128)
    assert p.opq_dim == 0 and p.nbits < 8 and p.factory(128).startswith("IVF")
    big = OnDiskParams().resolve(5_000_000, 1152)
    assert big.factory(1152) == "OPQ64_256,IVF8192_HNSW32,PQ64"


def test_cli_build_with_ondisk_index(tmp_path, capsys):
    from saefe.cli.main import main as cli
    from fixtures.folders import make_folder

    root = make_folder(tmp_path / "corpus")
    out = tmp_path / "index"
    assert cli(["build", "--images", str(root), "--out", str(out), "--index-type", "ivfpq-ondisk", "--no-progress"]) == 0
    assert "index type ivfpq-ondisk" in capsys.readouterr().out
    vi = VectorIndex.load(out)
    vectors = np.load(out / "vectors.npy").astype(np.float32)
    _, ids = vi.search(vectors[:3], 1)
    assert ids[:, 0].tolist() == [0, 1, 2]  # each stored image finds itself
    assert json.loads((out / "manifest.json").read_text())["index_type"] == "ivfpq-ondisk"


def test_auto_goes_on_disk_only_when_nothing_in_ram_fits_the_budget():
    from saefe.ingest.autoindex import wants_ondisk

    n, d = 100_000_000, 1152
    assert wants_ondisk(IndexConfig(max_memory=2 << 30), n, d)  # not even flat-sq8 (115 GB) fits
    assert not wants_ondisk(IndexConfig(max_memory=600 << 30), n, d)  # HNSW fits: stays in RAM
    assert not wants_ondisk(IndexConfig(), n, d)  # no budget: no reason to leave RAM
    assert not wants_ondisk(IndexConfig(kind="hnsw", max_memory=2 << 30), n, d)  # a kind asked for wins
    assert not wants_ondisk(IndexConfig(max_memory=1 << 20), n, d)  # the on-disk index's own part does not fit


def test_auto_past_the_budget_builds_the_ondisk_index_and_says_why(store, tmp_path, monkeypatch):
    import shutil

    from saefe.ingest import autoindex

    d = tmp_path / "index"
    shutil.copytree(store, d)
    monkeypatch.setattr(autoindex, "wants_ondisk", lambda cfg, n, dim: True)  # a 3k store fits any real budget
    cfg = IndexConfig(kind="auto", use_gpu=False, max_memory=64 << 20,
                      ondisk={"nlist": 16, "pq_m": 8, "nbits": 6, "shard_size": 1000})
    vi = build_saved_index(d, cfg)
    assert isinstance(vi, OnDiskIndex) and "no in-RAM index" in vi.params["choice"]
