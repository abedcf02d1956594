"""The Gradio app end to end through gradio_client: every use case plus bad inputs.

One small demo index (600 images, its SAE and labels) is built per test session and the app is
launched on a free localhost port in a thread.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fixtures.app import free_port, launch_app, small_demo  # noqa: E402,F401

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def demo_index(tmp_path_factory, saefe_home):
    return small_demo(tmp_path_factory)


@pytest.fixture(scope="module")
def served(demo_index):
    demo, app, url = launch_app(*demo_index)
    yield app, url
    demo.close()


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served[1], verbose=False)


def ok(result: dict, k: int) -> list[dict]:
    rows = result["results"]
    assert len(rows) == k
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    for r in rows:
        assert {"id", "score", "rank", "width", "height"} <= set(r)
        assert Path(r["image_path"]).exists()
    return rows


def test_named_endpoints(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/search", "/search_text", "/search_image", "/inspect_feature", "/image_features", "/bias",
            "/labels", "/debias", "/audit"} <= names


def test_labels(client):
    info = client.predict(api_name="/labels")
    assert "Esteem" in info["labels"] and "Male" in info["labels"]
    groups = info["groups"]
    assert list(groups)[0] == "Shared" and len(groups) == len(info["labels"]) + 1
    assert all(len(v) == 10 for v in groups.values())
    assert info["n_total"] == 600


def test_use_case_1_label_both_modes(client):
    d = ok(client.predict("Esteem", "direction", 12, api_name="/search"), 12)
    f = ok(client.predict("esteem", "features", 12, api_name="/search"), 12)
    assert d[0]["id"] != -1 and f[0]["score"] > 0


def test_use_case_2_features_with_negative_weight(client, served):
    app, _ = served
    shared = client.predict(api_name="/labels")["groups"]["Shared"]
    pos_q = json.dumps({str(shared[0]): 0.8})
    neg_q = json.dumps({str(shared[0]): 0.8, str(shared[1]): -1.0})
    # direction mode: the negative weight turns the query away from f1's decoder direction
    pos = ok(client.predict(pos_q, "direction", 10, api_name="/search"), 10)
    neg = ok(client.predict(neg_q, "direction", 10, api_name="/search"), 10)
    assert [(r["id"], round(r["score"], 5)) for r in pos] != [(r["id"], round(r["score"], 5)) for r in neg]
    # features mode: exact scores can only drop when an image also fires the pushed-away feature
    fpos = {r["id"]: r["score"] for r in ok(client.predict(pos_q, "features", 50, api_name="/search"), 50)}
    fneg = ok(client.predict(neg_q, "features", 10, api_name="/search"), 10)
    assert all(r["score"] <= fpos.get(r["id"], r["score"]) + 1e-6 for r in fneg)
    # list forms of features JSON
    ok(client.predict(json.dumps([[shared[0], 0.5], ["f%d" % shared[1], -0.2]]), "direction", 5, api_name="/search"), 5)


def test_use_case_3_expression_and_bias(client, demo_index):
    res = client.predict("Esteem - Male + Adult", "direction", 20, api_name="/search")
    assert res["kind"] == "expr"
    ok(res, 20)
    rep = client.predict("Esteem - Male + Adult", "direction", 20, api_name="/bias")
    assert rep["k"] == 20
    assert set(rep["shares"]) == {"gender", "age"}
    assert abs(sum(rep["base_rates"]["gender"].values()) - 1) < 1e-6
    assert "gender" in rep["max_skew"] and "age" in rep["ndkl"]
    # the panel describes exactly these results (whether the arithmetic lowers the share of men
    # is a benchmark figure, benchmarks/bench_debias.py, not a guarantee)
    from saefe.search.engine import Engine, Term

    ids = [r["id"] for r in res["results"]]
    engine = Engine.open(*demo_index)
    male = engine.attributes["Male"].to_numpy()
    assert rep["shares"]["gender"]["Male"] == pytest.approx(male[ids].mean())
    assert rep["base_rates"]["gender"]["Male"] == pytest.approx(male.mean())
    assert rep["attributes"]["gender"]["estimated"] is False
    assert [r.id for r in engine.search([Term("expr", "Esteem - Male + Adult")], k=20)] == ids


def test_debias_endpoint_meets_the_target_and_reports_before_after(client):
    out = client.predict("Esteem", "direction", 20, "rerank", "gender", "parity", api_name="/debias")
    assert len(out["results"]) == 20 and out["debias"]["methods"] == ["rerank"]
    assert out["debias"]["met"] is True
    assert out["bias"]["shares"]["gender"] == {"Male": 0.5, "Female": 0.5}
    assert set(out["bias_before"]["shares"]) == {"gender", "age"}
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as ei:
        client.predict("Esteem", "direction", 20, "rerank", "race", "corpus", api_name="/debias")
    assert "cannot protect 'race'" in str(ei.value) and "available: gender" in str(ei.value)


def test_audit_endpoint(client):
    rep = client.predict("Esteem", "gender", 5, api_name="/audit")
    assert rep["label"] == "Esteem" and rep["attribute"] == "gender" and 1 <= len(rep["rows"]) <= 10
    assert all(r["flagged_corpus"] == (abs(r["excess"]) >= rep["threshold"]) for r in rep["rows"])
    assert all(r["flagged_here"] == (r["gap"] >= rep["gap_threshold"]) for r in rep["rows"])
    assert all(r["flagged"] == (r["flagged_corpus"] or r["flagged_here"]) for r in rep["rows"])


def test_use_case_4_text_and_image_search(client, demo_index):
    from gradio_client import handle_file

    ok(client.predict("a photo of a happy child", 7, api_name="/search_text"), 7)
    img = sorted((demo_index[0] / "demo" / "images").glob("*.png"))[3]
    rows = ok(client.predict(handle_file(str(img)), 5, api_name="/search_image"), 5)
    assert rows[0]["file"] == img.name and rows[0]["score"] > 0.99


def test_use_case_5_6_image_features_and_inspector(client):
    feats = client.predict(3, 5, api_name="/image_features")["features"]
    assert 1 <= len(feats) <= 5 and all(x["activation"] > 0 for x in feats)
    f = feats[0]["feature"]
    rep = client.predict(f"f{f}", 4, api_name="/inspect_feature")
    assert rep["feature"] == f and len(rep["top"]) == 4 and len(rep["bottom"]) == 4
    assert 0.0 <= rep["frequency"] <= 1.0
    assert rep["top"][0]["score"] >= rep["bottom"][0]["score"]
    assert all("label" in x for x in rep["labels"])


@pytest.mark.parametrize(
    "query, needle",
    [
        ("Foo", "unknown label 'Foo'"),
        ('{"3": 0}', "all sliders are zero"),
        ("Esteem + + Male", "expected a label or feature"),
        ('{"999999": 1}', "out of range"),
        ("{not json", "features JSON is not valid"),
        ("", "empty query"),
    ],
)
def test_bad_search_inputs_are_readable(client, query, needle):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as ei:
        client.predict(query, "direction", 5, api_name="/search")
    msg = str(ei.value)
    assert needle in msg and "Traceback" not in msg


def test_bad_other_inputs_and_server_survives(client):
    from gradio_client.exceptions import AppError

    bad = [
        (("Esteem", "sideways", 5), "/search", "unknown search mode"),
        (("Esteem", "direction", 0), "/search", "at least 1"),
        (("999999", 3), "/inspect_feature", "out of range"),
        (("fxyz", 3), "/inspect_feature", "integer"),
        ((10**7, 3), "/image_features", "out of range"),
        (("   ", 3), "/search_text", "empty text"),
        (("Nobody - Male", "direction", 5), "/bias", "unknown label"),
    ]
    for args, api, needle in bad:
        with pytest.raises(AppError) as ei:
            client.predict(*args, api_name=api)
        assert needle in str(ei.value), (api, str(ei.value))
    # still serving
    ok(client.predict("Esteem - Male + Adult", "features", 3, api_name="/search"), 3)


def test_ui_handlers_slider_semantics(served):
    """The Blocks' handlers: apply seeds the sliders with the label mean (clipped), add/subtract,
    the expression box, manual ids into Custom slots, L2 norm, reset, and errors as a status line."""
    import numpy as np

    app, _ = served
    st = app.state
    prof = app.engine.profiles
    zeros = [0.0] * st.n_slots + [""] * st.n_custom + [0.0] * st.n_custom
    out = app._label_op("apply", "Esteem", 1, {}, zeros)
    mix, vals, status = out[0], out[1:-1], out[-1]
    mean = prof.mean_of("Esteem")
    # sliders show 3 decimals (step 0.001); the state keeps the exact mix
    assert vals[: st.n_slots] == pytest.approx([float(np.clip(mean[f], -1, 1)) for f in st.slots], abs=5e-4)
    assert all(mix[f] == pytest.approx(float(np.clip(mean[f], -1, 1))) for f in st.slots)
    assert "applied" in status
    out = app._label_op("sub", "Esteem", 2, mix, vals)  # Esteem - 2*Esteem = -Esteem
    assert out[1 : 1 + st.n_slots] == pytest.approx([-float(np.clip(mean[f], -1, 1)) for f in st.slots], abs=5e-4)
    # a user edit of one slider (differs from the state) wins; its mirrors follow
    vals = list(out[1:-1])
    vals[0] = -0.5
    f0 = st.slots[0]
    # a feature without a slider of its own (the old demo SAE's f1023), whatever the SAE's size
    last = max(set(range(app.engine.sae.config.d_hidden)) - set(st.slots))
    out = app._label_op("feature", None, 1, out[0], vals, fid=f"f{last}", fw=0.25)
    assert out[0][f0] == -0.5 and out[0][last] == 0.25
    assert f"f{last}" in out[1 + st.n_slots : 1 + st.n_slots + st.n_custom]
    out = app._label_op("l2", None, 1, out[0], list(out[1:-1]))
    assert sum(w * w for w in out[0].values()) == pytest.approx(1.0, abs=1e-6)
    out = app._label_op("expr", None, 1, out[0], list(out[1:-1]), expr="Esteem - Male + Adult")
    assert any(w < 0 for w in out[0].values()) or any(w > 0 for w in out[0].values())
    out = app._label_op("reset", None, 1, out[0], list(out[1:-1]))
    assert out[0] == {} and set(out[1 : 1 + st.n_slots]) == {0.0}
    # errors become a status line, never an exception
    from saefe.serve.app import _ui_safe

    n_out = 1 + st.n_slots + 2 * st.n_custom + 1
    fn = _ui_safe(lambda: app._label_op("expr", None, 1, {}, zeros, expr="Esteem + Nobody"), n_out)
    res = fn()
    assert "unknown label" in res[-1] and "Traceback" not in res[-1]
    fn = _ui_safe(lambda: app._search_mix({}, zeros, "direction", 10), 6, 4)
    assert "all sliders are zero" in fn()[4]


def test_launcher_message_without_index(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("app_gradio", Path(__file__).resolve().parents[2] / "app_gradio.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--index", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "no index at" in err and "python scripts/build_index.py" in err


def test_ui_debias_control_and_audit_panel(served):
    """The Debias control reroutes the search and the panel shows before -> after; the audit
    panel lists the label's features with their example strips."""
    from saefe.serve.app import fairness

    app, _ = served
    st = app.state
    zeros = [0.0] * st.n_slots + [""] * st.n_custom + [0.0] * st.n_custom
    out = app._label_op("apply", "Esteem", 1, {}, zeros)
    gallery, rows, vec, bias, status, *_ = app._search_mix(out[0], out[1:-1], "direction", 20,
                                                           ("rerank", ["gender"], "parity"))
    assert len(rows) == 20 and "before" in bias and "debiased (rerank; target met)" in status
    male = app.engine.attributes["Male"].to_numpy()
    assert male[[r["id"] for r in rows]].mean() == 0.5
    _, _, _, bias, status, *_ = app._search_mix(out[0], out[1:-1], "direction", 20, ("none", ["gender"], "corpus"))
    assert "before" not in bias and "debiased" not in status
    head, table, strips, strip, status = fairness.audit_view(app, "Esteem", "gender")
    assert table and set(strips) == {row[0] for row in table} and strip and "audited Esteem" in status
    with pytest.raises(Exception, match="needs --protect"):
        app._search_text("a person", 5, ("rerank", [], "corpus"))
