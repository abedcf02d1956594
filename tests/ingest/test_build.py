"""The index pipeline: folder / dataset / precomputed sources, bad input, resume, refusal."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from saefe.ingest.build import BuildConfig, build_index
from saefe.cli.main import main as cli
from saefe.search.engine import Engine
from saefe.errors import CorpusError, IncompatibleError, ModelLoadError
from saefe.ingest.index import IndexConfig, VectorIndex
from saefe.ingest.store import EmbeddingStore

REPO = Path(__file__).resolve().parents[2]

from fixtures.folders import _img, make_folder  # noqa: E402,F401


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = make_folder(tmp_path_factory.mktemp("corpus"))
    out = tmp_path_factory.mktemp("idx") / "index"
    summary = build_index(BuildConfig(images=str(root), out=str(out), chunk_size=7, progress=False))
    return root, out, summary


def test_folder_build_counts_skips_and_duplicates(built):
    root, out, summary = built
    store = EmbeddingStore.open(out)
    # 20 good + cmyk (converted) = 21 stored; duplicate stored once; 3 skipped with reasons
    assert len(store) == 21 == summary.count
    assert summary.duplicates == 1
    assert summary.skipped == {"empty file": 1, "not an image": 1, "truncated image": 1}
    m = store.manifest
    assert m["skipped"] == summary.skipped and m["duplicates"] == 1
    assert {s["item"] for s in m["skipped_items"]} == {"zero.jpg", "page.png", "trunc.jpg"}
    assert m["encoder"]["model_id"] == "saefe/demo-siglip" and m["dim"] == store.vectors.shape[1]
    assert store.vectors.dtype == np.float16
    assert np.allclose(np.linalg.norm(store.vectors_f32(), axis=1), 1, atol=2e-3)
    paths = set(store.metadata["path"])
    assert "sub/deeper/img_000.jpg" in paths and "cmyk.jpg" in paths
    assert len(set(store.metadata["sha256"])) == len(store)  # no duplicate bytes stored
    assert not (out / "chunks").exists()


def test_rerun_of_complete_build_is_a_noop(built):
    root, out, _ = built
    before = (out / "vectors.npy").stat().st_mtime_ns
    s = build_index(BuildConfig(images=str(root), out=str(out), chunk_size=7, progress=False))
    assert s.already_built and s.embedded_now == 0
    assert (out / "vectors.npy").stat().st_mtime_ns == before


def test_other_source_into_existing_index_is_refused(built, tmp_path):
    _, out, _ = built
    other = make_folder(tmp_path / "other", n=3, bad=False)
    with pytest.raises(IncompatibleError, match="--force"):
        build_index(BuildConfig(images=str(other), out=str(out), progress=False))


def test_search_returns_metadata_and_image_paths(built):
    root, out, _ = built
    eng = Engine.open(out)
    v = eng.store.vectors_f32([3])[0]
    res = eng.search_vector(v, 5)
    assert res[0].id == 3 and res[0].score == pytest.approx(1.0, abs=1e-2)
    assert Path(res[0].metadata["image_path"]).exists()
    assert res[0].metadata["path"] == eng.store.metadata["path"][3]
    assert [r.score for r in res] == sorted([r.score for r in res], reverse=True)


def test_query_with_wrong_dimension_is_refused(built):
    _, out, _ = built
    vi = VectorIndex.load(out)
    with pytest.raises(IncompatibleError, match="dimension 7"):
        vi.search(np.ones(7, np.float32), 3)
    with pytest.raises(Exception, match="NaN"):
        vi.search(np.full(vi.dim, np.nan, np.float32), 3)


def test_embeddings_equal_a_direct_encoder_pass(built, demo_encoder):
    root, out, _ = built
    store = EmbeddingStore.open(out)
    i = int(np.flatnonzero(store.metadata["path"] == "img_002.jpg")[0])
    direct = demo_encoder.embed_images([Image.open(root / "img_002.jpg").convert("RGB")])[0]
    assert float(direct @ store.vectors_f32([i])[0]) > 0.999


def test_empty_and_missing_folders_are_clear_errors(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(CorpusError, match="no images under"):
        build_index(BuildConfig(images=str(tmp_path / "empty"), out=str(tmp_path / "o"), progress=False))
    with pytest.raises(CorpusError, match="does not exist"):
        build_index(BuildConfig(images=str(tmp_path / "nope"), out=str(tmp_path / "o"), progress=False))


def test_all_images_bad_is_a_clear_error(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"")
    (tmp_path / "bad" / "b.png").write_text("nope")
    with pytest.raises(CorpusError, match="all 2 were skipped"):
        build_index(BuildConfig(images=str(tmp_path / "bad"), out=str(tmp_path / "o"), progress=False))


def test_cli_error_is_one_line_not_a_traceback(tmp_path, capsys):
    rc = cli(["build", "--images", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "does not exist" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_ray_task_size_is_one_line(tmp_path, capsys):
    rc = cli(["build", "--images", str(make_folder(tmp_path / "c", n=2, bad=False)), "--out", str(tmp_path / "o"),
              "--model", "demo", "--ray", "local", "--ray-task-size", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "--ray-task-size must be at least 1" in err and len(err.strip().splitlines()) == 1


def test_missing_model_offline_says_how_to_provide_weights(tmp_path):
    make_folder(tmp_path / "c", n=2, bad=False)
    with pytest.raises(ModelLoadError) as e:
        build_index(BuildConfig(images=str(tmp_path / "c"), out=str(tmp_path / "o"),
                                model="google/siglip-so400m-patch14-384", progress=False))
    msg = str(e.value)
    assert "offline" in msg and "local directory" in msg and "--model demo" in msg


def test_demo_model_loads_from_its_dir_like_real_weights(tmp_path, demo_encoder):
    from saefe.ingest.encoder import SiglipEncoder
    from saefe.demo.tiny_model import SHIPPED_DIR

    enc = SiglipEncoder.from_pretrained(str(SHIPPED_DIR), device="cpu")  # a path, as for real weights
    img = _img(5)
    a, b = enc.embed_images([img])[0], demo_encoder.embed_images([img])[0]
    assert float(a @ b) > 0.9999  # same weights, same path
    assert enc.info == demo_encoder.info  # the directory's marker records the demo model's id
    t = enc.embed_texts(["a photo of a happy person", "sad"])
    assert t.shape == (2, enc.info.embedding_dim) and np.allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)


def test_resume_with_another_model_is_refused(tmp_path):
    root = make_folder(tmp_path / "c", n=4, bad=False)
    out = tmp_path / "o"
    out.mkdir()
    from saefe.ingest.store import ChunkWriter

    ChunkWriter(out, {"format_version": 1, "source_kind": "folder", "source": str(root.resolve()), "items": 4,
                      "model": "someone/else", "clip_server": None, "chunk_size": 1024})
    with pytest.raises(IncompatibleError, match="unfinished build"):
        build_index(BuildConfig(images=str(root), out=str(out), progress=False))


def test_kill_minus_9_mid_build_resumes_without_reembedding(tmp_path):
    root = make_folder(tmp_path / "c", n=120, bad=False)
    out = tmp_path / "o"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(REPO / "scripts" / "build_index.py"), "--images", str(root), "--out", str(out),
           "--chunk-size", "3", "--no-progress"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "chunks").glob("0*.json"))) < 4:
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    committed = sorted((out / "chunks").glob("0*.json"))
    assert 4 <= len(committed) < 40, "the build should have been killed part-way"
    assert not (out / "manifest.json").exists()
    stamps = {c.name: c.stat().st_mtime_ns for c in committed}
    with pytest.raises(CorpusError, match="run the same build command again"):
        EmbeddingStore.open(out)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resuming {out}: {len(committed)} of 40 chunks already committed" in r.stdout + r.stderr
    assert f"embedded this run: {120 - 3 * len(committed)} " in r.stdout
    store = EmbeddingStore.open(out)
    assert len(store) == 120 and store.metadata["sha256"].is_unique and store.metadata["path"].is_unique
    assert sorted(store.metadata["path"]) == sorted(store.metadata["path"].unique())
    del stamps


def test_hf_imagefolder_dataset_metadata_travels(tmp_path):
    d = tmp_path / "ds" / "train"
    d.mkdir(parents=True)
    rows = []
    for i in range(6):
        _img(i).save(d / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "url": f"https://i.redd.it/{i}.png", "subreddit": "aww" if i % 2 else "pics",
                     "title": f"post {i}"})
    (d / "broken.png").write_bytes(b"garbage")
    rows.append({"file_name": "broken.png", "url": "https://x/broken.png", "subreddit": "x", "title": "t"})
    pd.DataFrame(rows).to_csv(d / "metadata.csv", index=False)
    out = tmp_path / "o"
    s = build_index(BuildConfig(dataset=str(tmp_path / "ds"), out=str(out), progress=False))
    store = EmbeddingStore.open(out)
    assert len(store) == 6 and s.skipped
    assert set(store.metadata["subreddit"]) == {"aww", "pics"}
    res = Engine.open(out).search_vector(store.vectors_f32([2])[0], 1)
    assert res[0].metadata["url"] == "https://i.redd.it/2.png" and res[0].metadata["title"] == "post 2"


def test_hf_parquet_dataset(tmp_path):
    import datasets

    imgs = []
    for i in range(5):
        buf = io.BytesIO()
        _img(i).save(buf, "PNG")
        imgs.append({"bytes": buf.getvalue(), "path": f"{i}.png"})
    ds = datasets.Dataset.from_dict({"image": imgs, "title": [f"t{i}" for i in range(5)]},
                                    features=datasets.Features({"image": datasets.Image(), "title": datasets.Value("string")}))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    out = tmp_path / "o"
    build_index(BuildConfig(dataset=str(tmp_path / "d.parquet"), out=str(out), progress=False))
    store = EmbeddingStore.open(out)
    assert len(store) == 5 and list(store.metadata["title"]) == [f"t{i}" for i in range(5)]


def test_precomputed_embeddings_import(tmp_path):
    rng = np.random.default_rng(0)
    v = rng.normal(size=(50, 24)).astype(np.float32)
    v[7] = np.nan
    v[9] = 0
    np.save(tmp_path / "v.npy", v)
    pd.DataFrame({"url": [f"u{i}" for i in range(50)]}).to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "o"
    s = build_index(BuildConfig(embeddings=str(tmp_path / "v.npy"), metadata=str(tmp_path / "m.csv"),
                                model="my/model", out=str(out), progress=False))
    store = EmbeddingStore.open(out)
    assert len(store) == 48 and s.skipped == {"non-finite vector": 1, "zero vector": 1}
    assert "u7" not in set(store.metadata["url"]) and store.encoder_info.model_id == "my/model"
    keep = [i for i in range(50) if i not in (7, 9)]
    expect = v[keep] / np.linalg.norm(v[keep], axis=1, keepdims=True)
    assert np.allclose(store.vectors_f32(), expect, atol=2e-3)


def test_precomputed_row_mismatch_is_refused(tmp_path):
    np.save(tmp_path / "v.npy", np.ones((5, 4), np.float32))
    pd.DataFrame({"url": ["a"]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(CorpusError, match="5 vectors but"):
        build_index(BuildConfig(embeddings=str(tmp_path / "v.npy"), metadata=str(tmp_path / "m.csv"),
                                model="m", out=str(tmp_path / "o"), progress=False))
    (tmp_path / "p.npy").write_bytes(b"\x80\x04junk pickle")
    with pytest.raises(CorpusError, match="cannot read"):
        build_index(BuildConfig(embeddings=str(tmp_path / "p.npy"), model="m", out=str(tmp_path / "o2"), progress=False))


def test_approximate_indexes_tune_and_round_trip(tmp_path):
    from saefe.ingest.index import _exact_search, recall_at_k

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, 32))
    x = (centres[rng.integers(0, 50, 6000)] + 0.3 * rng.normal(size=(6000, 32))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert VectorIndex.build(x[:900], IndexConfig(flat_max=1000)).kind == "flat"
    vi = VectorIndex.build(x, IndexConfig(kind="ivf", target_recall=0.95))
    assert vi.kind == "ivf" and 1 <= vi.params["nprobe"] <= vi.params["nlist"]
    q = x[:200] + 0.05 * rng.normal(size=(200, 32)).astype(np.float32)
    _, truth = _exact_search(x, q, 10)
    _, got = vi.search(q, 10)
    assert 0.0 <= recall_at_k(got, truth) <= 1.0  # recall itself is a benchmark figure
    vi.save(tmp_path)
    again = VectorIndex.load(tmp_path)
    assert again.kind == "ivf" and again.params["nprobe"] == vi.params["nprobe"]
    assert np.array_equal(again.search(q[:5], 10)[1], vi.search(q[:5], 10)[1])
    # auto above the threshold, no GPU: HNSW (kept whatever it measures: no recall or speed-up asked)
    hn = VectorIndex.build(x, IndexConfig(flat_max=1000, min_speedup=0, target_recall=0.0))
    assert hn.kind == "hnsw" and hn.params["ef_search"] >= 16 and "recall_at_10" in hn.params["measured"]
    assert hn.search(q, 10)[1].shape == (200, 10)
    hn.save(tmp_path)
    assert VectorIndex.load(tmp_path).index.hnsw.efSearch == hn.params["ef_search"]


def test_every_cli_command_has_help(capsys):
    from saefe.cli.main import COMMANDS

    assert cli([]) == 0
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            cli([name, "--help"])
        assert e.value.code == 0
        assert f"saefe {name}" in capsys.readouterr().out


def test_hf_webdataset_shards(tmp_path):
    import tarfile

    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    for s in range(2):
        with tarfile.open(shard_dir / f"shard-{s:05d}.tar", "w") as tar:
            for i in range(3):
                key = f"s{s}_{i:03d}"
                buf = io.BytesIO()
                _img(10 * s + i).save(buf, "JPEG")
                for name, data in ((f"{key}.jpg", buf.getvalue()),
                                   (f"{key}.json", json.dumps({"subreddit": f"r{s}", "title": key}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "o"
    build_index(BuildConfig(dataset=str(shard_dir), dataset_builder="webdataset", out=str(out), progress=False))
    store = EmbeddingStore.open(out)
    assert len(store) == 6
    assert sorted(store.metadata["subreddit"]) == ["r0"] * 3 + ["r1"] * 3  # the .json sidecar travels
    assert set(store.metadata["title"]) == {f"s{s}_{i:03d}" for s in range(2) for i in range(3)}
