"""Bias attenuation end to end on the small synthetic index: probes (safetensors round trip),
estimates for an index without labels, --debias through the engine, the CLI and the HTTP server,
the audit, and the bad-input messages. Guarantees only, no quality thresholds."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from saefe.errors import SaefeError
from saefe.search.debias import DebiasConfig, local_ids
from saefe.search.engine import Engine, Term


@pytest.fixture(scope="module")
def synth_bias(tmp_path_factory, demo_encoder):
    """(labelled index, SAE dir, the same images as an index with no labels at all)."""
    from fixtures.synthetic import build_synthetic

    from saefe.analysis.audit import fit_bias_models
    from saefe.ingest.store import EmbeddingStore
    from saefe.labels.attributes import read_attributes
    from saefe.sae.model import TopKSAE

    root = tmp_path_factory.mktemp("synth_bias")
    index, sae_dir, _ = build_synthetic(root, demo_encoder.info, n=300, seed=2)
    store = EmbeddingStore.open(index)
    fit_bias_models(store, TopKSAE.from_pretrained(sae_dir), sae_dir, read_attributes(store), sae_dir / "labels")
    plain = root / "plain"
    shutil.copytree(index, plain)
    (plain / "attributes.parquet").unlink()
    return index, sae_dir, plain


@pytest.fixture(scope="module")
def eng(synth_bias):
    return Engine.open(synth_bias[0])


# -- probes and estimates -------------------------------------------------------------------------


def test_probes_round_trip_through_safetensors_and_match_sklearn(synth_bias):
    from safetensors.numpy import load_file
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from saefe.ingest.store import EmbeddingStore
    from saefe.labels.attributes import read_attributes
    from saefe.labels.probes import PROBES_FILE, ProbeSet

    index, sae_dir, _ = synth_bias
    ps = ProbeSet.load(sae_dir / "labels")
    assert set(ps.probes) == {"gender", "age"} and ps.space == "embedding"
    raw = load_file(str(sae_dir / "labels" / PROBES_FILE))
    assert np.array_equal(raw["gender.coef"], ps.probes["gender"].coef)
    store = EmbeddingStore.open(index)
    x, attrs = store.vectors_f32(), read_attributes(store)
    for name, groups in (("gender", ["Male", "Female"]), ("age", ["Kid", "Teenager", "Adult"])):
        y = np.argmax(attrs[groups].to_numpy(), axis=1)
        sc = StandardScaler().fit(x)
        clf = LogisticRegression(C=1.0, max_iter=2000, random_state=0).fit(sc.transform(x), y)
        p = ps.probes[name]
        assert p.groups == groups
        np.testing.assert_allclose(p.predict_proba(x), clf.predict_proba(sc.transform(x)), atol=1e-4)
        assert p.directions().shape == (len(groups) - 1, x.shape[1])
        assert np.allclose(p.directions() @ p.directions().T, np.eye(len(groups) - 1), atol=1e-5)
    again = ProbeSet.load(ps.save(sae_dir / "labels" / "copy"))
    assert again.sha256 == ps.sha256


def test_index_without_labels_gets_estimates_marked_as_such(synth_bias):
    import pyarrow.parquet as pq

    from saefe.labels.estimates import ESTIMATES

    _, sae_dir, plain = synth_bias
    e = Engine.open(plain, sae_dir=sae_dir)
    assert e.attributes is None
    assert e.demographics.available == {"gender": "estimates", "age": "estimates"}
    meta = json.loads(pq.read_schema(plain / ESTIMATES).metadata[b"saefe"])
    assert meta["estimated"] is True and meta["n"] == len(e.store)
    g = e.demographics.attributes["gender"]
    assert np.allclose(g.member.sum(axis=1), 1.0, atol=1e-5) and g.estimated.all()
    rep = e.bias(e.search([Term("label", "Esteem")], k=10)).by_attribute()
    assert rep["gender"]["estimated"] is True and rep["gender"]["source"] == "estimates"


@pytest.mark.parametrize("method", ["ablate", "project"])
def test_ablate_and_project_work_from_estimates_alone(synth_bias, method):
    """An index with no labels at all: the query's neighbourhood is measured with the probes'
    estimates, and the response says so."""
    from saefe.search import debias as dmod

    _, sae_dir, plain = synth_bias
    e = Engine.open(plain, sae_dir=sae_dir)
    res = e.search([Term("label", "Esteem")], k=20, debias=DebiasConfig.parse(method, "gender"))
    assert len(res) == 20 and res.info.sources == {"gender": "estimates"} and res.info.estimated == {"gender": True}
    part = res.info.ablation if method == "ablate" else res.info.projection
    assert part["neighbourhood"] > 0 and part["calibrated"]
    ag = e.demographics.require(["gender"])
    assert res.info.met == (dmod.deviation(ag, dmod.resolve_targets("corpus", ag), local_ids(e, res))
                            <= dmod.DEFAULT_TOLERANCE)


def test_labels_win_over_estimates_row_by_row():
    from saefe.labels.demographics import Demographics

    n = 4
    labels = pd.DataFrame({"Male": [1, 0, 0, 0], "Female": [0, 1, 0, 0]})
    est = pd.DataFrame({"Male": [0.2, 0.9, 0.7, 0.4], "Female": [0.8, 0.1, 0.3, 0.6]})
    d = Demographics.resolve(n, labels, est)
    g = d.attributes["gender"]
    assert g.estimated.tolist() == [False, False, True, True] and g.source == "labels+estimates"
    assert g.hard().tolist() == [0, 1, 0, 1]
    assert g.shares(np.array([2, 3])).tolist() == pytest.approx([0.55, 0.45])


# -- debias through the engine --------------------------------------------------------------------


def test_rerank_meets_corpus_shares_and_keeps_order_within_groups(eng):
    k = 40
    res = eng.search([Term("label", "Esteem")], k=k, debias=DebiasConfig.parse("rerank", "gender"))
    info = res.info
    assert info.methods == ["rerank"] and info.sources == {"gender": "labels"} and info.met is True
    ids = local_ids(eng, res)
    g = eng.demographics.attributes["gender"]
    hard = g.hard()
    from saefe.search.fair_rank import apportion

    assert np.bincount(hard[ids], minlength=2).tolist() == apportion(g.base_rates(), k).tolist()
    pool = local_ids(eng, eng.search([Term("label", "Esteem")], k=len(eng.store)))
    for grp in (0, 1):
        mine = ids[hard[ids] == grp].tolist()
        assert mine == pool[hard[pool] == grp][: len(mine)].tolist()


def test_unreachable_target_is_best_effort_and_says_so(eng):
    n_female = int(eng.demographics.attributes["gender"].hard().tolist().count(1))
    k = n_female + 20
    res = eng.search([Term("label", "Esteem")], k=k, debias=DebiasConfig.parse("rerank", "gender", "Female=1"))
    assert len(res) == k and res.info.met is False
    assert any("best effort" in n for n in res.info.notes)


def test_ablate_takes_the_tied_features_out_of_the_mix(eng):
    """Uncalibrated: every corpus-wide flagged feature of the mix is ablated, and the results are
    exactly those of the mix without the reported features."""
    from saefe.analysis.audit import engine_associations
    from saefe.search.debias import ablate_mix

    flagged = engine_associations(eng)["gender"].flagged(0.2)
    terms = [Term("expr", "Esteem + Male")]
    res = eng.search(terms, k=5, mode="features", debias=DebiasConfig.parse("ablate", "gender", threshold=0.2,
                                                                              calibrate=False))
    mix = eng.mix(terms[0])
    assert res.info.ablation["strength"] == 1.0 and not res.info.ablation["calibrated"]
    assert {f for f in mix if flagged[f] and mix[f] != 0} <= set(res.info.ablated) <= set(mix)
    gone = np.zeros(eng.sae.config.d_hidden, bool)
    gone[res.info.ablated] = True
    assert [r.id for r in res] == [r.id for r in eng.search_features(ablate_mix(mix, gone), k=5)]


def test_ablate_calibration_reports_whether_the_target_is_met(eng):
    from saefe.search import debias as dmod

    res = eng.search([Term("label", "Esteem")], k=20, debias=DebiasConfig.parse("ablate", "gender"))
    ag = eng.demographics.require(["gender"])
    dev = dmod.deviation(ag, dmod.resolve_targets("corpus", ag), local_ids(eng, res))
    assert 0.0 <= res.info.ablation["strength"] <= 1.0 and res.info.ablation["calibrated"]
    assert res.info.met == (dev <= dmod.DEFAULT_TOLERANCE)
    # a query that already meets the target does not move
    loose = DebiasConfig.parse("ablate", "gender", tolerance=1.0)
    res = eng.search([Term("label", "Esteem")], k=20, debias=loose)
    assert res.info.ablation["strength"] == 0.0 and res.info.ablated == []
    assert [r.id for r in res] == [r.id for r in eng.search([Term("label", "Esteem")], k=20)]


def test_project_returns_a_query_orthogonal_to_the_directions(eng, monkeypatch):
    from saefe.search import debias as dmod

    seen = {}
    real = eng.search_vector

    def spy(v, k):
        seen["v"] = np.asarray(v, np.float64)
        return real(v, k)

    monkeypatch.setattr(eng, "search_vector", spy)
    cfg = DebiasConfig.parse("project", "gender", calibrate=False)
    attrs, _, info = dmod.start(eng, cfg)
    u, owner = dmod.query_directions(eng, eng.query_vector([Term("label", "Esteem")]), 10, cfg, attrs, info)
    assert set(owner) == {"gender"}
    res = eng.search([Term("label", "Esteem")], k=10, debias=cfg)  # its last search is the projected query
    assert res.info.projection["lambda"] == 1.0 and np.abs(u @ seen["v"]).max() < 1e-5
    assert res.info.projection["neighbourhood"] == info.projection["neighbourhood"] > 0
    # calibrated: 'met' is exactly whether the final top-k is within the tolerance
    res = eng.search([Term("label", "Esteem")], k=20, debias=DebiasConfig.parse("project", "gender"))
    ag = eng.demographics.require(["gender"])
    dev = dmod.deviation(ag, dmod.resolve_targets("corpus", ag), local_ids(eng, res))
    assert res.info.met == (dev <= dmod.DEFAULT_TOLERANCE)


@pytest.mark.parametrize("method", ["ablate", "project"])
def test_two_attributes_get_a_strength_each(eng, method):
    from saefe.search import debias as dmod

    res = eng.search([Term("label", "Esteem")], k=20, debias=DebiasConfig.parse(method, "gender,age"))
    got = res.info.ablation["strengths"] if method == "ablate" else res.info.projection["lambdas"]
    assert set(got) == {"gender", "age"} and all(v >= 0 for v in got.values())
    ags = eng.demographics.require(["gender", "age"])
    dev = dmod.deviation(ags, dmod.resolve_targets("corpus", ags), local_ids(eng, res))
    assert res.info.met == (dev <= dmod.DEFAULT_TOLERANCE)


def test_project_refuses_features_mode(eng):
    with pytest.raises(SaefeError, match="use --mode direction"):
        eng.search([Term("label", "Esteem")], k=5, mode="features", debias=DebiasConfig.parse("project", "gender"))


def test_remote_backend_without_our_images_is_a_clear_error(eng):
    from saefe.search.types import SearchResult

    class Elsewhere:
        url, n_total, d_emb = "http://elsewhere:1", 1000, eng.dim

        def search_vector(self, v, k):
            return [SearchResult(i, 1.0 - i / 100, {"path": f"/other/{i}.png"}) for i in range(k)]

    remote = Engine(eng.store, None, eng.sae, eng.profiles, eng.attributes, backend=Elsewhere(), sae_dir=eng.sae_dir)
    with pytest.raises(SaefeError, match="not in the local index .* demographic group is unknown"):
        remote.search([Term("label", "Esteem")], k=5, debias=DebiasConfig.parse("rerank", "gender"))


def test_protecting_an_attribute_nobody_labelled(synth_bias, tmp_path):
    index, _, _ = synth_bias
    bare = tmp_path / "bare"
    shutil.copytree(index, bare)
    (bare / "attributes.parquet").unlink()
    from saefe.ingest.store import EmbeddingStore

    e = Engine(EmbeddingStore.open(bare))  # no labels, no SAE, no probes
    with pytest.raises(SaefeError) as ei:
        e.search([Term("text", "x")], k=3, debias=DebiasConfig.parse("rerank", "gender"))
    msg = str(ei.value)
    assert "cannot protect 'gender'" in msg and "available: none" in msg and "\n" not in msg


# -- CLI ------------------------------------------------------------------------------------------


def _cli(capsys, *argv):
    from saefe.cli.main import main

    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_search_bias_json_shape(synth_bias, capsys):
    rc, out, _ = _cli(capsys, "search", "--index", str(synth_bias[0]), "--expr", "Esteem - Male", "--k", "6",
                      "--bias", "--json")
    payload = json.loads(out)
    assert rc == 0 and len(payload["results"]) == 6 and set(payload) == {"results", "bias"}
    for attr in ("gender", "age"):
        b = payload["bias"][attr]
        assert {"groups", "max_skew", "ndkl", "estimated"} <= set(b) and b["estimated"] is False
        for g in b["groups"].values():
            assert set(g) == {"results", "corpus"}
        assert sum(g["results"] for g in b["groups"].values()) == pytest.approx(1.0)
    rc, out, _ = _cli(capsys, "search", "--index", str(synth_bias[0]), "--label", "Esteem", "--k", "6", "--bias",
                      "--json", "--debias", "rerank", "--protect", "gender", "--target", "parity")
    payload = json.loads(out)
    assert rc == 0 and payload["debias"]["methods"] == ["rerank"] and "bias_before" in payload
    assert {g: v["results"] for g, v in payload["bias"]["gender"]["groups"].items()} == {"Male": 0.5, "Female": 0.5}


@pytest.mark.parametrize("argv,msg", [
    (["--debias", "rerank", "--protect", "race"], "cannot protect 'race'"),
    (["--debias", "rerank"], "needs --protect"),
    (["--protect", "gender"], "--protect goes with --debias"),
    (["--debias", "shuffle", "--protect", "gender"], "unknown debias method"),
    (["--debias", "rerank", "--protect", "gender", "--target", "Robot=1"], "not a group"),
    (["--debias", "project", "--protect", "gender", "--mode", "features"], "use --mode direction"),
])
def test_search_debias_errors(synth_bias, capsys, argv, msg):
    rc, _, err = _cli(capsys, "search", "--index", str(synth_bias[0]), "--label", "Esteem", *argv)
    assert rc == 2 and msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_audit_cli(synth_bias, capsys):
    rc, out, _ = _cli(capsys, "audit", "Esteem", "--index", str(synth_bias[0]), "--protect", "gender",
                      "--top", "4", "--json")
    rep = json.loads(out)[0]
    assert rc == 0 and rep["label"] == "Esteem" and rep["attribute"] == "gender" and 1 <= len(rep["rows"]) <= 8
    top = [r["weight"] for r in rep["rows"][:4]]
    assert top == sorted(top, reverse=True)  # then any other feature carrying the bias here
    assert all(r["flagged_here"] for r in rep["rows"][4:])
    assert all(r["flagged_corpus"] == (abs(r["excess"]) >= rep["threshold"]) for r in rep["rows"])
    assert all(r["flagged"] == (r["flagged_corpus"] or r["flagged_here"]) for r in rep["rows"])
    assert all(len(r["examples"]) == 5 for r in rep["rows"])
    rc, _, err = _cli(capsys, "audit", "Esteem", "--index", str(synth_bias[0]), "--protect", "race")
    assert rc == 2 and "cannot audit 'race'" in err


def test_evaluate_debias_table(synth_bias, capsys):
    rc, out, _ = _cli(capsys, "evaluate", "--index", str(synth_bias[0]), "--debias", "none,rerank,project",
                      "--bias-label", "Esteem", "--json")
    ev = json.loads(out)
    assert rc == 0 and ev["label"] == "Esteem"
    methods = {(r["method"], r["mode"], r["k"]) for r in ev["rows"]}
    assert ("rerank", "features", 100) in methods and ("project", "direction", 20) in methods
    assert ("project", "features", 20) not in methods and ("Esteem - Male + Female", "direction", 20) in methods


# -- the meme-search-engine server ----------------------------------------------------------------


def test_backend_server_debias_member(eng):
    import requests

    from saefe.serve.backend_server import make_app
    from saefe.serve.clip_server import start_in_thread

    url, stop = start_in_thread(make_app(eng))
    try:
        body = {"terms": [{"predefined_embedding": "Esteem"}], "k": 10,
                "debias": {"method": "ablate+rerank", "protect": "gender", "target": "parity"}}
        r = requests.post(url + "/", json=body, timeout=30)
        assert r.status_code == 200, r.text
        out = r.json()
        assert len(out["matches"]) == 10 and out["debias"]["methods"] == ["ablate", "rerank"]
        assert out["debias"]["rerank"]["shares"]["gender"] == {"Male": 0.5, "Female": 0.5}
        for bad, needle in ((["x"], "'debias' must be an object"), ({"method": "rerank", "protect": "race"}, "race"),
                            ({"method": "nope", "protect": "gender"}, "unknown debias method")):
            r = requests.post(url + "/", json={**body, "debias": bad}, timeout=30)
            assert r.status_code == 400 and needle in r.json()["error"]
        plain = requests.post(url + "/", json={"terms": body["terms"], "k": 3}, timeout=30).json()
        assert "debias" not in plain and len(plain["matches"]) == 3
    finally:
        stop()
