"""Engine, FeatureRanker, bias metrics and the search CLI: correctness against brute force and
bad inputs. Runs on a small synthetic index (no images, no training) built once per session."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from saefe.search.bias import measure_bias
from saefe.search.engine import Engine, Term
from saefe.errors import IncompatibleError, SaefeError, SteeringError
from saefe.search.feature_rank import FeatureRanker, brute_force_rank

from fixtures.synthetic import LABELS, build_synthetic  # noqa: F401

@pytest.fixture(scope="session")
def synth(tmp_path_factory, demo_encoder):
    return build_synthetic(tmp_path_factory.mktemp("synth"), demo_encoder.info)


@pytest.fixture(scope="session")
def engine(synth):
    return Engine.open(synth[0])


# -- FeatureRanker against brute force -------------------------------------------------------


def _random_codes(rng, n, h, density):
    m = sp.random(n, h, density=density, random_state=int(rng.integers(1 << 30)), format="csr", dtype=np.float32)
    m.data = np.round(m.data * 4) / 4 + 0.25  # coarse values: many exact ties
    return m


@pytest.mark.parametrize("method", ["auto", "sort", "dense"])
def test_rank_equals_brute_force(method):
    rng = np.random.default_rng(1)
    for trial in range(120):
        n, h = int(rng.integers(5, 200)), int(rng.integers(3, 40))
        m = _random_codes(rng, n, h, float(rng.uniform(0.02, 0.4)))
        n_total = n + int(rng.integers(0, 4))  # images with no codes at all
        r = FeatureRanker(m.tocsc(), n_total)
        ids = rng.choice(h, size=int(rng.integers(1, min(h, 6) + 1)), replace=False)
        ws = np.round(rng.normal(size=len(ids)) * 2) / 2  # negative weights included
        if not ws.any():
            ws[0] = 1.0
        k = int(rng.integers(1, n_total + 3))
        got_i, got_s = r.rank(ids, ws, k, method=method)
        ref_i, ref_s = brute_force_rank(m, ids, ws, k, n_total)
        assert np.array_equal(got_i, ref_i), (trial, got_i, ref_i)
        np.testing.assert_allclose(got_s, ref_s, atol=1e-5)


def test_rank_zero_fill_and_negative_order():
    # 6 images; feature 0 fires on 1 (2.0) and 4 (1.0); feature 1 on 2 (3.0) and 4 (1.0)
    dense = np.zeros((6, 2), np.float32)
    dense[1, 0], dense[4, 0], dense[2, 1], dense[4, 1] = 2.0, 1.0, 3.0, 1.0
    r = FeatureRanker(sp.csc_matrix(dense), 6)
    ids, s = r.rank([0, 1], [1.0, -1.0], k=6)
    # scores: 1 -> +2, 4 -> 0 (1 - 1), 2 -> -3, others 0: positives, zeros by id, negatives
    assert ids.tolist() == [1, 0, 3, 4, 5, 2]
    assert s.tolist() == [2.0, 0.0, 0.0, 0.0, 0.0, -3.0]
    ids, _ = r.rank([0], [1.0], k=10)  # k > corpus: everything once
    assert sorted(ids.tolist()) == list(range(6)) and ids[:2].tolist() == [1, 4]


@pytest.mark.parametrize("ids,ws,msg", [
    ([], [], "all sliders are zero"),
    ([0], [0.0], "all sliders are zero"),
    ([5], [1.0], "out of range"),
    ([-1], [1.0], "out of range"),
    ([0], [float("nan")], "finite"),
    ([0, 1], [1.0], "weights"),
])
def test_rank_bad_inputs(ids, ws, msg):
    r = FeatureRanker(sp.csc_matrix(np.eye(3, 5, dtype=np.float32)), 3)
    with pytest.raises(SteeringError, match=msg):
        r.rank(ids, ws, 2)


# -- Engine ----------------------------------------------------------------------------------


def test_feature_mode_equals_brute_force(engine):
    from saefe.labels.profiles import compute_codes

    codes = compute_codes(engine.store, engine.sae)
    for mix in ({0: 1.0, 3: -0.5}, {5: 1.0}, {1: 0.3, 2: 0.3, 60: -1.0}):
        res = engine.search([Term("features", mix)], k=25, mode="features")
        ref_i, ref_s = brute_force_rank(codes, list(mix), list(mix.values()), 25, len(engine.store))
        assert [r.id for r in res] == ref_i.tolist()
        np.testing.assert_allclose([r.score for r in res], ref_s, atol=1e-5)


def test_feature_mode_label_term_weights(engine):
    a = engine.search([Term("label", "Esteem")], k=10, mode="features")
    b = engine.search([Term("label", "Esteem", 2.0)], k=10, mode="features")
    assert [r.id for r in a] == [r.id for r in b]
    np.testing.assert_allclose([2 * r.score for r in a], [r.score for r in b], rtol=1e-5)


def test_direction_mode_equals_brute_force_cosine(engine):
    x = engine.store.vectors_f32()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    for terms in ([Term("label", "Happiness")], [Term("expr", "Esteem - Male + Adult")],
                  [Term("features", {0: 1.0, 7: -0.3})]):
        q = engine.query_vector(terms)
        res = engine.search(terms, k=15, mode="direction")
        ref = np.argsort(-(x @ q), kind="stable")[:15]
        assert [r.id for r in res][:10] == ref[:10].tolist()
        np.testing.assert_allclose([r.score for r in res], (x @ q)[ref], atol=2e-3)


def test_label_search_is_the_search_of_its_mix(engine):
    # a label term means "its profile's mix": same ranking as the explicit feature mix, best first
    # (how precise a label search is, is a benchmark figure: benchmarks/bench_engine.py)
    for lab in ("Happiness", "Sadness"):
        mix = engine.mix(Term("label", lab)).to_dict()
        for mode in ("direction", "features"):
            res = engine.search([Term("label", lab)], k=20, mode=mode)
            ref = engine.search([Term("features", mix)], k=20, mode=mode)
            assert [r.id for r in res] == [r.id for r in ref], (lab, mode)
            scores = [r.score for r in res]
            assert scores == sorted(scores, reverse=True) and len({r.id for r in res}) == len(res)


@pytest.mark.parametrize("terms,mode,exc,msg", [
    ([Term("label", "Nope")], "direction", SteeringError, "unknown label 'Nope'"),
    ([Term("label", "Nope")], "features", SteeringError, "unknown label"),
    ([Term("expr", "Esteem - Nope")], "direction", SteeringError, "unknown label"),
    ([Term("features", {64: 1.0})], "features", SteeringError, r"out of range \[0, 64\)"),
    ([Term("features", {-1: 1.0})], "direction", SteeringError, "out of range"),
    ([Term("features", {0: float("nan")})], "features", SteeringError, "finite"),
    ([Term("features", {0: 1.0}, float("nan"))], "direction", SteeringError, "finite"),
    ([Term("features", {0: 0.0})], "features", SteeringError, "all sliders are zero"),
    ([Term("features", {0: 1.0}), Term("features", {0: 1.0}, -1.0)], "features", SteeringError, "zero"),
    ([Term("features", {0: 1.0}), Term("features", {0: 1.0}, -1.0)], "direction", SteeringError, "zero"),
    ([Term("features", "abc")], "features", SteeringError, "features term"),
    ([Term("embedding", [0.1] * 7)], "direction", IncompatibleError, "dimension 7"),
    ([Term("embedding", [0.0] * 128)], "direction", SteeringError, "zero vector"),
    ([Term("embedding", ["x"] * 128)], "direction", SaefeError, "list of numbers"),
    ([Term("text", "")], "direction", SaefeError, "empty text"),
    ([Term("text", "   ")], "direction", SaefeError, "empty text"),
    ([Term("text", "happy")], "features", SaefeError, "needs --mode direction"),
    ([Term("bogus", 1)], "direction", SaefeError, "unknown term type 'bogus'"),
    ([Term("bogus", 1)], "features", SaefeError, "unknown term type 'bogus'"),
    ([Term("image", "/nonexistent/x.png")], "direction", SaefeError, "cannot read the query image"),
    ([Term("image", b"not an image")], "direction", SaefeError, "not an image"),
    ([], "direction", SteeringError, "empty query"),
    ([], "features", SteeringError, "empty query"),
])
def test_bad_inputs(engine, terms, mode, exc, msg):
    with pytest.raises(exc, match=msg):
        engine.search(terms, k=5, mode=mode)


@pytest.mark.parametrize("k", [0, -3, "x", None])
def test_bad_k(engine, k):
    for mode in ("direction", "features"):
        with pytest.raises(SaefeError, match="number of results"):
            engine.search([Term("label", "Esteem")], k=k, mode=mode)


def test_unknown_mode(engine):
    with pytest.raises(SaefeError, match="unknown search mode 'sideways'"):
        engine.search([Term("label", "Esteem")], k=5, mode="sideways")


def test_wrong_query_vector_dimension(engine):
    with pytest.raises(IncompatibleError, match="dimension 3"):
        engine.search_vector(np.ones(3, np.float32), k=5)


def test_inspect_feature_bounds(engine):
    with pytest.raises(SteeringError, match="out of range"):
        engine.inspect_feature(64)
    rep = engine.inspect_feature(5, k=3)
    assert len(rep.top) == 3 and rep.frequency is not None


def test_k_larger_than_corpus(engine):
    n = len(engine.store)
    for mode in ("direction", "features"):
        res = engine.search([Term("label", "Esteem")], k=n + 50, mode=mode)
        assert len(res) == n and len({r.id for r in res}) == n


# -- bias metrics by hand --------------------------------------------------------------------


def test_bias_metrics_by_hand():
    # corpus: 4 Male, 4 Female -> base 0.5/0.5; ranked [M, M, F, M]
    attrs = pd.DataFrame({"Male": [1, 1, 1, 1, 0, 0, 0, 0], "Female": [0, 0, 0, 0, 1, 1, 1, 1]})
    rep = measure_bias(np.array([0, 1, 4, 2]), attrs, groups={"gender": ["Male", "Female"]})
    assert rep.shares["gender"] == {"Male": 0.75, "Female": 0.25}
    assert rep.base_rates["gender"] == {"Male": 0.5, "Female": 0.5}
    assert rep.max_skew["gender"] == pytest.approx(math.log(0.75 / 0.5))

    def kl(p):
        return sum(pi * math.log(pi / 0.5) for pi in p if pi > 0)

    prefixes = [(1.0, 0.0), (1.0, 0.0), (2 / 3, 1 / 3), (0.75, 0.25)]
    w = [1 / math.log2(i + 2) for i in range(4)]
    ndkl = sum(wi * kl(p) for wi, p in zip(w, prefixes)) / sum(w)
    assert rep.ndkl["gender"] == pytest.approx(ndkl)
    # a list that mirrors the corpus at every even prefix has MaxSkew 0
    rep2 = measure_bias(np.array([0, 4, 1, 5]), attrs, groups={"gender": ["Male", "Female"]})
    assert rep2.max_skew["gender"] == pytest.approx(0.0)


def test_engine_bias(engine):
    res = engine.search([Term("label", "Male")], k=20, mode="direction")
    rep = engine.bias(res)
    # the report describes exactly these results (how skewed they are is a benchmark figure)
    ids = np.array([r.id for r in res])
    male = engine.attributes["Male"].to_numpy()[ids]
    assert rep.shares["gender"]["Male"] == pytest.approx(male.mean())
    assert set(rep.shares) == {"gender", "age"}


# -- search CLI ------------------------------------------------------------------------------


def test_search_cli_json(synth, capsys):
    from saefe.cli.main import main

    for mode in ("direction", "features"):
        rc = main(["search", "--index", str(synth[0]), "--label", "Happiness", "--k", "7", "--json", "--mode", mode])
        assert rc == 0
        out = json.loads(capsys.readouterr().out)
        assert len(out) == 7
        for row in out:
            assert isinstance(row["id"], int) and isinstance(row["score"], float)
            assert row["path"].startswith("img_")
    rc = main(["search", "--index", str(synth[0]), "--expr", "Esteem - Male", "--k", "5", "--json", "--bias"])
    payload = json.loads(capsys.readouterr().out)
    assert rc == 0 and len(payload["results"]) == 5 and "max_skew" in payload["bias"]["gender"]


@pytest.mark.parametrize("argv,msg", [
    (["--label", "Nope"], "unknown label"),
    (["--feature", "9999=1"], "out of range"),
    (["--feature", "abc"], "bad --feature"),
    (["--label", "Esteem", "--k", "0"], "at least 1"),
    ([], "give a query"),
])
def test_search_cli_errors(synth, capsys, argv, msg):
    from saefe.cli.main import main

    rc = main(["search", "--index", str(synth[0]), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and "Traceback" not in err
