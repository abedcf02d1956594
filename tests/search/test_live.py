"""A running backend follows its index: reload on update (watch and endpoint), k cap, relative
file names, filters and paging over HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from saefe.ingest.build import BuildConfig, build_index
from saefe.search.engine import Engine
from fixtures.folders import _img as folder_img
from saefe.search.live import LiveEngine
from saefe.serve.backend_server import make_app
from saefe.serve.clip_server import start_in_thread


def _imgs(root: Path, seeds) -> None:
    (root / "cats").mkdir(parents=True, exist_ok=True)
    for s in seeds:
        folder_img(s, (20, 20), noise=40).save(root / ("cats" if s % 2 else "") / f"i{s:03d}.png")


@pytest.fixture()
def served(tmp_path):
    root, out = tmp_path / "imgs", tmp_path / "idx"
    _imgs(root, range(12))
    cfg = BuildConfig(images=str(root), out=str(out), progress=False)
    build_index(cfg)
    live = LiveEngine(lambda: Engine.open(out), out, check_every=0.0)
    url, stop = start_in_thread(make_app(live, max_k=50))
    yield root, out, cfg, live, url
    stop()


def _query(url, live, **extra):
    v = live.engine.store.vectors_f32([0])[0].tolist()
    return requests.post(url + "/", json={"terms": [{"embedding": v}], **extra}, timeout=30)


def test_update_is_picked_up_without_restart(served):
    root, out, cfg, live, url = served
    assert requests.get(url + "/").json()["n_total"] == 12
    held = live.engine  # a request in flight keeps the engine (generation) it started with
    _imgs(root, range(100, 105))
    (root / "i000.png").unlink()
    build_index(cfg)
    assert requests.get(url + "/").json()["n_total"] == 16  # noticed by the manifest watch
    assert len(held.store) == 12 and held.search_vector(held.store.vectors_f32([3])[0], 3)[0].id == 3
    r = requests.post(url + "/reload", json={"force": True}).json()
    assert r["generation"] == 1 and r["n_total"] == 16 and r["error"] is None


def test_failed_reopen_keeps_serving_the_old_index(served, monkeypatch):
    root, out, cfg, live, url = served
    live._open = lambda: (_ for _ in ()).throw(RuntimeError("disk on fire"))
    r = requests.post(url + "/reload", json={"force": True}).json()
    assert r["n_total"] == 12 and "disk on fire" in r["error"]
    assert _query(url, live, k=3).status_code == 200


def test_k_cap_relative_names_filters_and_paging(served):
    root, out, cfg, live, url = served
    r = _query(url, live, k=10**9)
    assert r.status_code == 400 and "at most 50" in r.json()["error"]
    body = _query(url, live, k=50, dedup_threshold=0).json()
    names = [m[1] for m in body["matches"]]
    assert len(names) == 12 and not any(n.startswith("/") or str(root) in n for n in names)
    assert set(names) == set(live.engine.store.metadata["path"])
    cats = _query(url, live, k=50, where={"path": "cats/*"}).json()["matches"]
    assert cats and all(m[1].startswith("cats/") for m in cats)
    p1 = _query(url, live, k=4, dedup_threshold=0).json()
    p2 = _query(url, live, k=4, offset=4, dedup_threshold=0).json()
    assert [m[1] for m in p1["matches"] + p2["matches"]] == names[:8] and p1["has_more"]
    assert _query(url, live, k=4, where=["nope=1"]).status_code == 400


def test_search_cli_where_offset_export(tmp_path, capsys):
    import json

    import pandas as pd

    from saefe.cli.main import main

    root, out = tmp_path / "imgs", tmp_path / "idx"
    _imgs(root, range(12))
    build_index(BuildConfig(images=str(root), out=str(out), progress=False))
    img = str(root / "cats" / "i001.png")

    def run(*argv):
        rc = main(["search", "--index", str(out), "--image", img, "--json", "--no-dedup", *argv])
        assert rc == 0
        return json.loads(capsys.readouterr().out)

    cats = run("--where", "path=cats/*", "--k", "3", "--export", str(tmp_path / "r.csv"))
    assert len(cats) == 3 and all(r["path"].startswith("cats/") for r in cats)
    assert list(pd.read_csv(tmp_path / "r.csv")["id"]) == [r["id"] for r in cats]
    more = run("--where", "path=cats/*", "--k", "3", "--offset", "3")
    assert [r["id"] for r in cats + more] == [r["id"] for r in run("--where", "path=cats/*", "--k", "6")]
    assert main(["search", "--index", str(out), "--image", img, "--where", "width"]) == 2
    assert "bad filter" in capsys.readouterr().err


def test_backend_names_never_carry_server_paths():
    from saefe.serve.backend_server import _relative

    assert _relative("memes/a.jpg", "/srv/corpus") == "memes/a.jpg"
    assert _relative("/srv/corpus/memes/a.jpg", "/srv/corpus") == "memes/a.jpg"
    assert _relative("/elsewhere/cache/a.jpg", "/srv/corpus") == "a.jpg"
