"""The app's paging ("more"), filters, near-duplicate collapse, export and reload after an update,
through the API and the UI handlers. Uses a copy of the session's small demo index."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from fixtures.app import launch_app, small_demo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live_app(tmp_path_factory, saefe_home):
    index, weights = small_demo(tmp_path_factory)
    root = tmp_path_factory.mktemp("app_live")
    idx = root / "index"
    shutil.copytree(index, idx, symlinks=True)
    from saefe.manifest import read_json, write_json_atomic

    m = read_json(idx / "manifest.json")  # the copy was built from its own copy of the images
    m["corpus_root"] = m["build_key"]["source"] = str((idx / "demo" / "images").resolve())
    write_json_atomic(idx / "manifest.json", m)
    demo, app, url = launch_app(idx, weights)
    from gradio_client import Client

    yield app, Client(url, verbose=False), idx
    demo.close()


def test_api_pages_filters_and_groups(live_app):
    app, client, _ = live_app
    whole = client.predict("Esteem", "direction", 12, 0, "", 0, api_name="/search_page")
    p1 = client.predict("Esteem", "direction", 6, 0, "", 0, api_name="/search_page")
    p2 = client.predict("Esteem", "direction", 6, 6, "", 0, api_name="/search_page")
    assert [r["id"] for r in p1["results"] + p2["results"]] == [r["id"] for r in whole["results"]]
    assert p1["has_more"] and p2["results"][0]["rank"] == 7
    sub = client.predict("Esteem", "direction", 5, 0, "width>=64", 0.95, api_name="/search_page")
    assert sub["matching"] is not None and all(r["width"] >= 64 for r in sub["results"])
    assert all(r["group_size"] >= 1 for r in sub["results"])
    with pytest.raises(Exception, match="no metadata column"):
        client.predict("Esteem", "direction", 5, 0, "colour=red", 0.95, api_name="/search_page")
    assert client.predict("Esteem", "direction", 5, api_name="/search")["results"][0]["group_size"] >= 1


def test_more_button_and_export(live_app, tmp_path):
    app, _, _ = live_app
    prev, values = {}, [0.0] * (len(app.state.slots) + 2 * app.state.n_custom)
    values[:len(app.state.slots)] = [0.5] * len(app.state.slots)
    out = app._search_mix(prev, values, "direction", 5, where="", dedup_on=True, threshold=0.95)
    rows, vec, spec = out[1], out[2], out[6]
    assert len(rows) == 5 and spec["has_more"]
    more = app._more(spec, rows, vec)
    assert [r["rank"] for r in more[1]] == list(range(1, 11)) and len({r["id"] for r in more[1]}) == 10
    path = app._export(more[1])[0]["value"]
    assert list(pd.read_csv(path)["id"]) == [r["id"] for r in more[1]]


def test_update_is_served_after_reload(live_app):
    app, client, idx = live_app
    n0 = client.predict(api_name="/labels")["n_total"]
    images = idx / "demo" / "images"
    victims = sorted(p for p in images.rglob("*") if p.is_file())[:3]
    for p in victims:
        p.unlink()
    from saefe.ingest.build import BuildConfig, build_index

    s = build_index(BuildConfig(images=str(images), out=str(idx), progress=False))
    assert s.update["removed"] == 3 and s.embedded_now == 0
    st = client.predict(True, api_name="/reload")
    assert st["n_total"] == n0 - 3 and st["generation"] == 1 and st["error"] is None
    assert client.predict(api_name="/labels")["n_total"] == n0 - 3
    res = client.predict("Esteem", "features", 5, api_name="/search")  # codes came along with the update
    assert len(res["results"]) == 5
