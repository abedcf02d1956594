"""Incremental builds: counts of embedded / removed rows, stable ids or one consistent remap, the
atomic switch, resume after a kill, and the bad inputs that must leave the index intact."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fixtures.folders import _img as folder_img
from saefe.errors import CorpusError, IncompatibleError
from saefe.ingest.build import BuildConfig, build_index
from saefe.ingest.store import EmbeddingStore, read_manifest
from saefe.ingest.index import VectorIndex


def _img(seed: int) -> Image.Image:
    return folder_img(seed, (24, 24), noise=40)


def _folder(root: Path, seeds) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for s in seeds:
        _img(s).save(root / f"i{s:04d}.png")
    return root


def _cfg(root, out, **kw) -> BuildConfig:
    return BuildConfig(images=str(root), out=str(out), chunk_size=8, progress=False, **kw)


def _by_path(store: EmbeddingStore) -> dict[str, np.ndarray]:
    return {p: store.vectors_f32([i])[0] for i, p in enumerate(store.metadata["path"])}


@pytest.fixture(scope="module")
def _built(tmp_path_factory):
    base = tmp_path_factory.mktemp("update_base")
    root = _folder(base / "imgs", range(40))
    first = build_index(_cfg(root, base / "idx"))
    assert first.embedded_now == 40
    return base


@pytest.fixture()
def corpus(_built, tmp_path):
    """A fresh copy of a 40-image folder and its index (built once per module; copies keep mtimes)."""
    from saefe.manifest import read_json, write_json_atomic

    root, out = tmp_path / "imgs", tmp_path / "idx"
    shutil.copytree(_built / "imgs", root)
    shutil.copytree(_built / "idx", out)
    m = read_json(out / "manifest.json")  # the copy was built from the copied folder
    m["corpus_root"] = m["build_key"]["source"] = str(root.resolve())
    write_json_atomic(out / "manifest.json", m)
    return root, out


def test_update_embeds_only_new_and_changed_and_drops_deleted(corpus):
    root, out = corpus
    before = EmbeddingStore.open(out)
    old_vecs = _by_path(before)
    _folder(root, range(100, 108))  # +8
    for s in (3, 17, 30):  # -3
        (root / f"i{s:04d}.png").unlink()
    _img(999).save(root / "i0005.png")  # 1 changed
    s = build_index(_cfg(root, out))
    assert s.embedded_now == 9
    assert s.update == {"added": 8, "changed": 1, "removed": 3, "unchanged": 36, "generation": 1} or \
        {k: s.update[k] for k in ("added", "changed", "removed", "unchanged")} == {"added": 8, "changed": 1, "removed": 3, "unchanged": 36}
    store = EmbeddingStore.open(out)
    assert len(store) == 45 and store.generation == 1
    assert store.metadata["path"].is_unique and "i0003.png" not in set(store.metadata["path"])
    new_vecs = _by_path(store)
    assert all(np.array_equal(new_vecs[p], old_vecs[p]) for p in old_vecs if p in new_vecs and p != "i0005.png")
    assert not np.allclose(new_vecs["i0005.png"], old_vecs["i0005.png"])
    # the index, the metadata and the vectors agree row for row
    vi = VectorIndex.load(out)
    assert vi.ntotal == 45
    _, ids = vi.search(store.vectors_f32([44]), 1)
    assert ids[0, 0] == 44
    # remap: old id -> new id, -1 where removed, consistent with the paths
    remap = np.load(store.data / "remap.npy")
    for old_id, new_id in enumerate(remap):
        p = before.metadata["path"].iat[old_id]
        if new_id < 0:
            assert p in {"i0003.png", "i0017.png", "i0030.png"}
        else:
            assert store.metadata["path"].iat[new_id] == p


def test_appends_keep_ids_stable_and_extend_the_index(corpus):
    root, out = corpus
    before = EmbeddingStore.open(out)
    _folder(root, range(200, 205))
    s = build_index(_cfg(root, out))
    assert s.embedded_now == 5 and s.update["removed"] == 0
    store = EmbeddingStore.open(out)
    assert list(store.metadata["path"][:40]) == list(before.metadata["path"])
    assert np.array_equal(np.asarray(store.vectors[:40]), np.asarray(before.vectors))
    assert store.manifest["index_params"].get("rows_added_since_build") == 5


def test_nothing_changed_is_a_noop_and_touch_or_rename_is_not_embedded(corpus):
    root, out = corpus
    s = build_index(_cfg(root, out))
    assert s.already_built and s.embedded_now == 0 and read_manifest(out).get("generation", 0) == 0
    p = root / "i0007.png"
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))  # touched: same bytes
    shutil.move(root / "i0008.png", root / "renamed.png")  # moved: same bytes, new path
    s = build_index(_cfg(root, out))
    assert s.embedded_now == 0
    assert {k: s.update[k] for k in ("added", "removed", "changed")} == {"added": 1, "removed": 1, "changed": 0}
    assert "renamed.png" in set(EmbeddingStore.open(out).metadata["path"])


def test_old_generation_stays_readable_until_the_next_switch(corpus):
    root, out = corpus
    old = EmbeddingStore.open(out)  # a reader that opened generation 0
    _folder(root, [300])
    build_index(_cfg(root, out))
    assert len(old) == 40 and np.isfinite(old.vectors_f32([0])).all()  # its files are still there
    assert (out / "vectors.npy").exists()  # generation 0 kept as the previous one
    (root / "i0000.png").unlink()
    build_index(_cfg(root, out))
    assert not (out / "vectors.npy").exists()  # two generations old: deleted
    gens = sorted(p.name for p in out.glob("gen-*"))
    assert gens == ["gen-000001", "gen-000002"] and read_manifest(out)["data_dir"] == "gen-000002"


def test_interrupted_update_resumes_without_reembedding(corpus, monkeypatch):
    root, out = corpus
    _folder(root, range(400, 420))  # +20: 3 chunks of 8 after the 40 kept rows
    import saefe.ingest.build as b

    real = b.ChunkWriter.commit
    calls = {"n": 0}

    def dying_commit(self, cid, *a, **k):
        if calls["n"] == 6:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(self, cid, *a, **k)

    monkeypatch.setattr(b.ChunkWriter, "commit", dying_commit)
    with pytest.raises(KeyboardInterrupt):
        build_index(_cfg(root, out))
    monkeypatch.setattr(b.ChunkWriter, "commit", real)
    assert len(EmbeddingStore.open(out)) == 40  # the old generation still serves
    s = build_index(_cfg(root, out))
    assert s.update["added"] == 20 and 0 < s.embedded_now < 20  # only the uncommitted part
    assert len(EmbeddingStore.open(out)) == 60


def test_encoder_mismatch_and_unreadable_folder_leave_the_index_intact(corpus, tmp_path, monkeypatch):
    root, out = corpus
    with pytest.raises(IncompatibleError, match="encoder"):
        build_index(_cfg(root, out, model=str(tmp_path / "another-model")))
    sub = root / "locked"
    _folder(sub, [500])
    from saefe.ingest import corpus as c

    real_walk = os.walk

    def walk(top, onerror=None, **kw):  # as os.walk does for a folder it may not list (also as root)
        for dirpath, dirnames, filenames in real_walk(top, onerror=onerror, **kw):
            if "locked" in dirnames:
                dirnames.remove("locked")
                onerror(PermissionError(13, "Permission denied", str(sub)))
            yield dirpath, dirnames, filenames

    monkeypatch.setattr(c.os, "walk", walk)
    with pytest.raises(CorpusError, match="left as it was"):
        build_index(_cfg(root, out))
    assert len(EmbeddingStore.open(out)) == 40 and read_manifest(out).get("generation", 0) == 0


def test_file_changing_while_read_keeps_the_previous_version(corpus, monkeypatch):
    root, out = corpus
    _img(777).save(root / "i0002.png")  # changed on disk, but reading it "races" with a writer
    from saefe.ingest import corpus as c

    real = c.FolderCorpus.read

    def racing(self, i):
        if self.paths[i] == "i0002.png":
            raise c.ItemChanged(0, "changed while being read", "i0002.png")
        return real(self, i)

    monkeypatch.setattr(c.FolderCorpus, "read", racing)
    before = _by_path(EmbeddingStore.open(out))["i0002.png"]
    s = build_index(_cfg(root, out))
    store = EmbeddingStore.open(out)
    assert len(store) == 40 and np.array_equal(_by_path(store)["i0002.png"], before)
    assert any("changed while being read" in r for r in s.skipped)
    monkeypatch.setattr(c.FolderCorpus, "read", real)
    s = build_index(_cfg(root, out))  # next run picks the new bytes up
    assert s.embedded_now == 1 and s.update["changed"] == 1


def test_precomputed_update_diffs_rows_by_key(tmp_path):
    rng = np.random.default_rng(0)
    v = rng.normal(size=(30, 16)).astype(np.float32)
    np.save(tmp_path / "v.npy", v)
    pd.DataFrame({"url": [f"u{i}" for i in range(30)]}).to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "o"
    cfg = BuildConfig(embeddings=str(tmp_path / "v.npy"), metadata=str(tmp_path / "m.csv"), model="my/m", out=str(out),
                      progress=False)
    build_index(cfg)
    v2 = np.concatenate([v[2:], rng.normal(size=(4, 16)).astype(np.float32)])
    v2[0] += 1  # u2 changed
    np.save(tmp_path / "v.npy", v2)
    pd.DataFrame({"url": [f"u{i}" for i in range(2, 34)]}).to_csv(tmp_path / "m.csv", index=False)
    s = build_index(cfg)
    assert {k: s.update[k] for k in ("added", "changed", "removed", "unchanged")} == \
        {"added": 4, "changed": 1, "removed": 2, "unchanged": 27}
    store = EmbeddingStore.open(out)
    assert list(store.metadata["url"]) == [f"u{i}" for i in range(2, 34)]
    with pytest.raises(IncompatibleError, match="encoder"):
        build_index(BuildConfig(embeddings=str(tmp_path / "v.npy"), metadata=str(tmp_path / "m.csv"), model="other/model2",
                                out=str(out), progress=False))


def test_force_rebuilds_everything_as_a_new_generation(corpus):
    root, out = corpus
    s = build_index(_cfg(root, out, force=True))
    assert s.embedded_now == 40 and EmbeddingStore.open(out).generation == 1 and s.update is None
    assert s.embed_seconds > 0 and "img/s while embedding" in s.lines()[1]  # the rate, as a first build reports it


def test_sae_codes_and_per_image_labels_follow_the_update(corpus, demo_encoder):
    import torch

    from saefe.labels.annotations import read_annotations
    from saefe.labels.attributes import read_attributes, set_default_sae, write_attributes
    from saefe.sae.codes import encode_corpus, load_codes
    from saefe.sae.model import SAEConfig, TopKSAE
    from saefe.search.engine import Engine

    root, out = corpus
    torch.manual_seed(0)
    sae_dir = out.parent / "sae"
    TopKSAE(SAEConfig(d_emb=demo_encoder.info.embedding_dim, d_hidden=32, top_k=4), demo_encoder.info).save_pretrained(sae_dir)
    encode_corpus(out, sae_dir, progress=False)
    csv = out.parent / "ann.csv"
    names = [f"i{s:04d}.png" for s in list(range(40)) + [600, 601, 602]]
    pd.DataFrame({"Filename": names, "Happiness": [i % 2 for i in range(len(names))]}).to_csv(csv, index=False)
    store = EmbeddingStore.open(out)
    write_attributes(store, read_annotations(csv, store))
    set_default_sae(store, sae_dir)
    _folder(root, [600, 601, 602])
    (root / "i0000.png").unlink()
    (root / "i0001.png").unlink()
    s = build_index(_cfg(root, out))
    assert s.embedded_now == 3 and "encoded for 41 rows" in s.extras["SAE codes sae"]
    new = EmbeddingStore.open(out)
    csr, csc = load_codes(out, sae_dir)
    assert csr.shape[0] == csc.shape[0] == len(new) == 41
    attrs = read_attributes(new)
    assert attrs is not None and len(attrs) == 41
    truth = {n: i % 2 for i, n in enumerate(names)}
    assert [int(v) for v in attrs["Happiness"]] == [truth[p] for p in new.metadata["path"]]
    eng = Engine.open(out)  # the default SAE and its stored codes open with the new generation
    assert eng.ranker.csc.shape[0] == 41 and eng.attributes is not None


def test_dataset_update_reuses_vectors_by_content(tmp_path):
    d = tmp_path / "ds" / "train"
    d.mkdir(parents=True)
    rows = []
    for i in range(6):
        _img(i).save(d / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "subreddit": "pics" if i % 2 else "aww"})
    pd.DataFrame(rows).to_csv(d / "metadata.csv", index=False)
    cfg = BuildConfig(dataset=str(tmp_path / "ds"), out=str(tmp_path / "o"), progress=False)
    build_index(cfg)
    again = build_index(cfg)
    assert again.already_built and again.embedded_now == 0
    _img(50).save(d / "50.png")
    (d / "1.png").unlink()
    rows = [r for r in rows if r["file_name"] != "1.png"] + [{"file_name": "50.png", "subreddit": "new"}]
    pd.DataFrame(rows).to_csv(d / "metadata.csv", index=False)
    s = build_index(cfg)
    assert s.embedded_now == 1 and {k: s.update[k] for k in ("added", "removed")} == {"added": 1, "removed": 1}
    store = EmbeddingStore.open(tmp_path / "o")
    assert len(store) == 6 and "new" in set(store.metadata["subreddit"])


def test_update_killed_before_the_switch_finishes_without_embedding(corpus, monkeypatch):
    root, out = corpus
    _folder(root, [700, 701])
    import saefe.ingest.generation as g

    real = g.switch_generation
    monkeypatch.setattr(g, "switch_generation", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        build_index(_cfg(root, out))
    assert len(EmbeddingStore.open(out)) == 40  # not switched: the old generation serves
    monkeypatch.setattr(g, "switch_generation", real)
    s = build_index(_cfg(root, out))
    assert s.embedded_now == 0 and s.update["added"] == 2 and len(EmbeddingStore.open(out)) == 42
