"""``auto`` never keeps an approximate index that does not beat exact search, records why in
index.json, and follows a memory budget."""

from __future__ import annotations

import numpy as np
import pytest

from saefe.errors import SaefeError
from saefe.ingest.autoindex import plan_kinds
from saefe.ingest.index import IndexConfig, VectorIndex, memory_estimate, parse_bytes
from saefe.manifest import read_json


@pytest.fixture(scope="module")
def x():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(3000, 24)).astype(np.float32)  # isotropic: nothing for an ANN index to exploit
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_fallback_to_exact_is_recorded(x, tmp_path):
    # a recall target no index can reach (whatever the timings): exact it is
    vi = VectorIndex.build(x, IndexConfig(flat_max=1000, target_recall=1.01))
    assert vi.kind == "flat-fp16" and vi.params["fallback"] is True, vi.params
    vi.save(tmp_path)
    p = read_json(tmp_path / "index.json")
    m = p["measured"]
    assert m["candidate"] == "hnsw" and 0 <= m["recall_at_10"] <= 1 and m["speedup"] > 0 and m["held_out_queries"] == 200
    assert m["target_recall"] == 1.01 and "(recall)" in p["choice"]
    assert p["choice"].startswith("flat-fp16 (exact scan): hnsw reached recall@10") and p["memory_bytes"] == 3000 * 24 * 2
    _, ids = VectorIndex.load(tmp_path).search(x[:5], 1)
    assert list(ids[:, 0]) == [0, 1, 2, 3, 4]  # the fallback is exact


def test_kept_candidate_is_recorded(x):
    vi = VectorIndex.build(x, IndexConfig(flat_max=1000, min_speedup=0, target_recall=0.0))
    assert vi.kind == "hnsw" and "fallback" not in vi.params
    assert vi.params["choice"].startswith("hnsw: recall@10") and vi.params["measured"]["exact_kind"] == "flat-fp16"


def test_memory_budget_picks_kind_and_quantisation():
    n, d = 1_000_000, 1152
    cfg = IndexConfig()
    assert plan_kinds(cfg, n, d, False)[:2] == ("hnsw", "flat-fp16")
    small = IndexConfig(max_memory=memory_estimate("ivf-sq8", n, d) + 1)
    cand, exact, notes = plan_kinds(small, n, d, False)
    assert (cand, exact) == ("ivf-sq8", "flat-sq8") and "rules out hnsw" in notes[0]
    with pytest.raises(SaefeError, match="no index over 1000000 x 1152 vectors fits"):
        plan_kinds(IndexConfig(max_memory=parse_bytes("100M")), n, d, False)
    assert plan_kinds(IndexConfig(), 500, d, False)[:2] == (None, "flat")
    assert parse_bytes("4G") == 4 << 30 and parse_bytes("512MiB") == 512 << 20 and parse_bytes(None) == 0
    with pytest.raises(SaefeError, match="memory size"):
        parse_bytes("lots")


def test_budget_small_corpus_uses_compressed_exact(x):
    vi = VectorIndex.build(x, IndexConfig(max_memory=3000 * 24 * 2 + 10))  # fp32 flat does not fit
    assert vi.kind == "flat-fp16" and vi.params["memory_bytes"] <= 3000 * 24 * 2 + 10
