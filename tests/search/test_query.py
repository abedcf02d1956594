"""Filters, paging, near-duplicate collapse and export on a small synthetic index (no images)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from saefe.errors import SaefeError
from saefe.ingest.index import IndexConfig, VectorIndex
from saefe.ingest.store import write_store
from saefe.manifest import EncoderInfo
from saefe.search import query as Q
from saefe.search.dedup import group_near_duplicates
from saefe.search.engine import Engine
from saefe.search.feature_rank import FeatureRanker, brute_force_rank
from saefe.search.filters import Filter, FilterError

N, D, H = 600, 32, 48


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    x[100:105] = x[50] + 0.01 * rng.normal(size=(5, D))  # five near-copies of row 50
    x[200] = x[7]  # an exact copy
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    md = pd.DataFrame({
        "path": [f"{['memes', 'pics', 'art'][i % 3]}/img_{i:04d}.jpg" for i in range(N)],
        "subreddit": np.array(["pics", "aww", "memes", "art"])[np.arange(N) % 4],
        "width": (np.arange(N) * 7) % 1024,
        "date": [f"2024-{1 + i % 12:02d}-01" for i in range(N)],
    })
    d = tmp_path_factory.mktemp("q") / "index"
    store = write_store(d, x, md, EncoderInfo("test/model", D))
    vi = VectorIndex.build(np.asarray(store.vectors), IndexConfig(kind="flat"))
    e = Engine(store, vi)
    codes = sp.random(N, H, density=0.1, random_state=1, format="csr", dtype=np.float32)
    codes.data = np.abs(codes.data) + 0.01
    e.__dict__["ranker"] = FeatureRanker(codes.tocsc(), N)
    e._codes = codes
    return e


def test_filter_parsing_and_masks(eng):
    md = eng.store.metadata
    m = Filter.parse(["subreddit=pics|aww", "width>=512", "path=memes/*"]).mask(md)
    want = md["subreddit"].isin(["pics", "aww"]) & (md["width"] >= 512) & md["path"].str.startswith("memes/")
    assert np.array_equal(m, want.to_numpy()) and m.any()
    assert np.array_equal(Filter.parse("date<2024-03-01").mask(md), (md["date"] < "2024-03-01").to_numpy())
    assert np.array_equal(Filter.parse(["subreddit!=pics"]).mask(md), (md["subreddit"] != "pics").to_numpy())
    assert np.array_equal(Filter.parse({"width": {">": 100, "<=": 200}}).mask(md), md["width"].between(101, 200).to_numpy())
    with pytest.raises(FilterError, match="no metadata column 'colour'"):
        Filter.parse(["colour=red"]).mask(md)
    with pytest.raises(FilterError, match="bad filter"):
        Filter.parse(["width"])
    with pytest.raises(FilterError, match="numbers"):
        Filter.parse(["width>=wide"]).mask(md)


@pytest.mark.parametrize("exact_max", [10**9, 0])  # exact scan of the selected rows / FAISS ID selector
def test_filtered_direction_search_is_exact_over_the_selection(eng, monkeypatch, exact_max):
    monkeypatch.setattr(Q, "EXACT_SCAN_MAX", exact_max)
    q = eng.store.vectors_f32([3])[0]
    where = ["subreddit=aww", "width<800"]
    page = Q.search_vector_page(eng, q, k=15, where=where, dedup=None)
    mask = Filter.parse(where).mask(eng.store.metadata)
    s = eng.store.vectors_f32() @ q
    s[~mask] = -np.inf
    truth = np.argsort(-s, kind="stable")[:15]
    assert [r.id for r in page.results] == list(truth) and page.matching == int(mask.sum())


def test_filtered_feature_ranking_matches_brute_force(eng):
    ids, ws = np.array([1, 5, 9]), np.array([1.0, -0.5, 0.7])
    mask = Filter.parse(["subreddit=memes"]).mask(eng.store.metadata)
    got_ids, got_s = Q.masked_rank(eng.ranker, ids, ws, 40, mask)
    all_ids, all_s = brute_force_rank(eng._codes, ids, ws, N)
    keep = mask[all_ids]
    assert list(got_ids) == list(all_ids[keep][:40])
    assert np.allclose(got_s, all_s[keep][:40], atol=1e-5)
    page = Q.rank_features_page(eng, ids, ws, k=10, offset=5, where=["subreddit=memes"], dedup=None)
    assert [r.id for r in page.results] == list(all_ids[keep][5:15])


def test_pages_concatenate_to_the_longer_list(eng):
    q = eng.store.vectors_f32([11])[0]
    for dedup in (None, 0.95):
        whole = Q.search_vector_page(eng, q, k=30, dedup=dedup)
        pages = [Q.search_vector_page(eng, q, k=10, offset=o, dedup=dedup) for o in (0, 10, 20)]
        assert [r.id for p in pages for r in p.results] == [r.id for r in whole.results]
        assert all(p.has_more for p in pages)
    last = Q.search_vector_page(eng, q, k=10, offset=N - 5, dedup=None)
    assert len(last.results) == 5 and not last.has_more
    with pytest.raises(SaefeError, match="offset must be"):
        Q.search_vector_page(eng, q, k=10, offset=-1)


def test_near_duplicates_collapse_into_groups(eng):
    q = eng.store.vectors_f32([50])[0]
    page = Q.search_vector_page(eng, q, k=5, dedup=0.95)
    top = page.results[0]
    assert top.id in (50, 100, 101, 102, 103, 104) and sorted(top.group) == [50, 100, 101, 102, 103, 104]
    assert top.to_json()["group_size"] == 6
    ids = [r.id for r in page.results]
    v = eng.store.vectors_f32(ids)
    sims = v @ v.T
    assert (sims[~np.eye(len(ids), dtype=bool)] < 0.95).all()  # no two shown results are near-duplicates
    off = Q.search_vector_page(eng, q, k=5, dedup=None)
    assert len({r.id for r in off.results} & {50, 100, 101, 102, 103, 104}) == 5
    exact = Q.search_vector_page(eng, eng.store.vectors_f32([7])[0], k=3, dedup=0.95)
    assert sorted(exact.results[0].group) == [7, 200]


def test_grouping_is_greedy_in_rank_order():
    v = np.array([[1, 0], [0.99, 0.141], [0, 1], [0.96, 0.28]], np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    g = group_near_duplicates(v, 0.95)
    assert list(g.leaders) == [0, 2] and [list(m) for m in g.members] == [[0, 1, 3], [2]]


def test_export_csv_and_json(eng, tmp_path):
    from saefe.search.export import export_results

    page = Q.search_vector_page(eng, eng.store.vectors_f32([50])[0], k=4, dedup=0.95)
    j = json.loads(export_results(eng, page.results, tmp_path / "r.json").read_text())
    assert [r["id"] for r in j] == [r.id for r in page.results] and j[0]["rank"] == 1 and j[0]["group_size"] == 6
    assert {"path", "score", "subreddit"} <= set(j[0])
    c = pd.read_csv(export_results(eng, page.results, tmp_path / "r.csv"))
    assert list(c["id"]) == [r.id for r in page.results]
    with pytest.raises(SaefeError, match=".csv or .json"):
        export_results(eng, page.results, tmp_path / "r.txt")

