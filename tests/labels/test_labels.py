"""Label profiles: sparse means/frequencies vs brute force, seed rankings, persistence, CLI."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch

from saefe.labels.annotations import Membership
from saefe.errors import CorpusError, IncompatibleError, SteeringError
from saefe.labels.prompts import membership_from_texts, read_prompts
from saefe.labels.profiles import (
    LabelProfiles, build_profiles, compute_codes, distinct_ranking, shared_ranking,
)
from saefe.manifest import EncoderInfo
from saefe.sae.model import SAEConfig, TopKSAE
from saefe.ingest.store import write_store

INFO = EncoderInfo("test/enc", 16, (32, 32))
N = 240


def make_sae(seed: int = 0, info: EncoderInfo = INFO) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(d_emb=16, d_hidden=64, top_k=4, up_proj_bias=True), info)
    with torch.no_grad():
        sae.up_proj.bias.uniform_(-0.05, 0.2)
    return sae.eval()


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(1)
    v = rng.normal(size=(N, 16)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    md = pd.DataFrame({"path": [f"images/img_{i:04d}.jpg" for i in range(N)]})
    return write_store(tmp_path / "idx", v, md, INFO)


@pytest.fixture
def sae():
    return make_sae()


def brute_codes(store, sae) -> np.ndarray:
    """Dense codes in numpy: ReLU(x W^T + b), keep the top-k per row."""
    x = np.asarray(store.vectors, dtype=np.float32)
    w = sae.up_proj.weight.detach().numpy()
    b = sae.up_proj.bias.detach().numpy()
    pre = np.maximum(x @ w.T + b, 0)
    out = np.zeros_like(pre)
    top = np.argsort(-pre, axis=1)[:, : sae.config.top_k]
    np.put_along_axis(out, top, np.take_along_axis(pre, top, 1), 1)
    return out


def random_membership(n: int = N, seed: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.random((n, 4)) < np.array([0.5, 0.2, 0.05, 0.0])  # last label: no image
    return m


def test_profiles_match_brute_force(store, sae, caplog):
    m = random_membership()
    names = ["Esteem", "Doubt/Confusion", "Valence high", "Empty"]
    with caplog.at_level(logging.WARNING, logger="saefe.labels.profiles"):
        prof = build_profiles(store, sae, m, names, "test")
    assert "Empty" in caplog.text
    assert prof.labels == names[:3] and prof.skipped == ["Empty"]
    dense = brute_codes(store, sae)
    assert (dense > 0).sum() > N * 2  # the SAE really fires
    for j, l in enumerate(prof.labels):
        rows = m[:, j]
        np.testing.assert_allclose(prof.mean[j], dense[rows].mean(0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(prof.freq[j], (dense[rows] > 0).mean(0), atol=1e-6)
        assert prof.counts[j] == rows.sum()
    assert prof.mean.shape == (3, 64) and prof.mean.dtype == np.float32
    # the codes handed in (e.g. stored by encode-sae) give the same profiles
    codes = compute_codes(store, sae, chunk=37)
    np.testing.assert_allclose(codes.toarray(), dense, rtol=1e-4, atol=1e-6)
    again = build_profiles(store, sae, m, names, "test", codes=codes)
    np.testing.assert_array_equal(again.mean, prof.mean)


def test_membership_shape_and_no_label_errors(store, sae):
    with pytest.raises(Exception, match="membership matrix has shape"):
        build_profiles(store, sae, np.zeros((N - 1, 2), bool), ["a", "b"])
    with pytest.raises(CorpusError, match="no label has any image"):
        build_profiles(store, sae, np.zeros((N, 2), bool), ["a", "b"])
    other = make_sae(info=EncoderInfo("other/enc2", 16))
    with pytest.raises(IncompatibleError, match="other/enc2"):
        build_profiles(store, other, random_membership(), list("abcd"))


MEAN = np.array(
    [
        # f0   f1   f2   f3   f4   f5   f6
        [0.5, 0.3, 0.3, 0.0, 0.9, 0.2, 0.0],  # A
        [0.4, 0.3, 0.3, 0.0, 0.0, 0.2, 0.1],  # B
        [0.2, 0.3, 0.4, 0.0, 0.0, 0.6, 0.0],  # C
    ],
    dtype=np.float32,
)


def seed_shared(mean, k):
    cands = [j for j in range(mean.shape[1]) if mean[:, j].sum() > 0]
    return sorted(cands, key=lambda j: (-mean[:, j].min(), -mean[:, j].sum(), j))[:k]


def seed_distinct(mean, e, k):
    others = [i for i in range(len(mean)) if i != e]
    score = lambda j: mean[e, j] - np.mean([mean[i, j] for i in others])  # noqa: E731
    cands = [j for j in range(mean.shape[1]) if mean[e, j] > 0]
    return sorted(cands, key=lambda j: (-score(j), -mean[e, j], j))[:k]


def test_shared_and_distinct_rankings_follow_seed_formulas():
    # shared: min f1=f2=0.3 (tie broken by sum: f2 1.0 > f1 0.9), then f5 0.2, f0 0.2 (sum 1.0 vs 1.1)
    assert shared_ranking(MEAN, 4) == [2, 1, 0, 5]
    assert shared_ranking(MEAN, 4) == seed_shared(MEAN.astype(np.float64), 4)
    # distinct A: f4 = 0.9; f0 = 0.5 - 0.3 = 0.2; f1 0, f2 -0.05, f5 -0.2 (f3, f6 do not fire for A)
    assert distinct_ranking(MEAN, 0, 10) == [4, 0, 1, 2, 5]
    # distinct C: f5 0.4, f2 0.1, f1 0, f0 -0.25 ; distinct B: f6 .1, f0 .05, f1 0, f2 -.05, f5 -.2
    assert distinct_ranking(MEAN, 2, 10) == [5, 2, 1, 0]
    for e in range(3):
        for k in (1, 2, 3, 10):
            assert distinct_ranking(MEAN, e, k) == seed_distinct(MEAN.astype(np.float64), e, k)
    for k in (1, 2, 3, 10):
        assert shared_ranking(MEAN, k) == seed_shared(MEAN.astype(np.float64), k)
    # ties on both scores: lower id first; the tie must survive the partial selection
    tie = np.array([[1.0, 1.0, 1.0, 1.0]], np.float32)
    assert distinct_ranking(tie, 0, 2) == [0, 1]
    # equal distinct scores (0.25) are ordered by the label's own mean: f1 (0.75) before f0 (0.5)
    dtie = np.array([[0.5, 0.75, 0.0], [0.25, 0.5, 0.0]], np.float32)
    assert distinct_ranking(dtie, 0, 2) == [1, 0] == seed_distinct(dtie.astype(np.float64), 0, 2)
    p = LabelProfiles(["x", "y"], dtie, dtie, np.array([1, 1]))
    assert p.distinct("x", k=2) == [1, 0]


def hand_profiles() -> LabelProfiles:
    return LabelProfiles(
        labels=["A", "B", "C"], mean=MEAN.copy(), freq=(MEAN > 0).astype(np.float32) * 0.5,
        counts=np.array([3, 4, 5]), source={"kind": "test"}, encoder_info=INFO,
    )


def test_profile_queries():
    p = hand_profiles()
    assert p.shared(k=2) == [2, 1]
    assert p.shared(["A", "B"], k=2) == [0, 1]  # min(A,B): f0 0.4, f1/f2 0.3 (sum tie), ...
    assert p.distinct("C", k=2) == [5, 2]
    assert p.distinct("A", k=2, among=["B"]) == [4, 0]
    assert p.most_tied_label(4) == ("A", pytest.approx(0.9))
    assert p.most_tied_label(3) == (None, 0.0)
    assert p.most_tied_label(5)[0] == "C"
    ls = p.labels_for_feature(5, top=5)
    assert [x.label for x in ls] == ["C", "A", "B"] and ls[0].mean == pytest.approx(0.6)
    assert p.label_index("b") == 1
    with pytest.raises(SteeringError, match="out of range"):
        p.most_tied_label(7)
    with pytest.raises(SteeringError, match="unknown label 'AA'"):
        p.label_index("AA")


def test_save_load_round_trip_and_refusals(store, sae, tmp_path):
    sae_dir = tmp_path / "weights" / "mysae"
    sae.save_pretrained(sae_dir)
    m = random_membership()
    mem = Membership(m, ["Esteem", "Doubt/Confusion", "Valence high", "Empty"], None)  # type: ignore[arg-type]
    from saefe.labels.annotations import MembershipReport

    mem.report = MembershipReport(source="x.csv", kind="annotations", thresholds={"Valence high": "Valence >= 7"})
    prof = build_profiles(store, sae, mem, sae_dir=sae_dir)
    out = tmp_path / "weights" / "mysae" / "labels"
    prof.save(out)
    meta = json.loads((out / "labels.json").read_text())
    assert meta["labels"] == ["Esteem", "Doubt/Confusion", "Valence high"]
    assert meta["skipped"] == ["Empty"]
    assert meta["counts"]["Esteem"] == int(m[:, 0].sum())
    assert meta["thresholds"] == {"Valence high": "Valence >= 7"}
    assert meta["source"]["kind"] == "annotations"
    assert meta["encoder"]["model_id"] == "test/enc"
    assert meta["sae"]["name"] == "mysae" and len(meta["sae"]["sha256"]) == 64
    assert meta["sae"]["config"]["d_hidden"] == 64
    assert meta["shared"] == prof.shared() and meta["distinct"]["Esteem"] == prof.distinct("Esteem")
    df = pd.read_parquet(out / "profiles.parquet")
    assert len(df) == 64 and df["feature"].tolist() == list(range(64))
    assert "mean:Doubt/Confusion" in df.columns and "freq:Valence high" in df.columns

    back = LabelProfiles.load(out, sae=sae, encoder_info=INFO)
    assert back.labels == prof.labels
    np.testing.assert_array_equal(back.mean, prof.mean)
    np.testing.assert_array_equal(back.freq, prof.freq)
    np.testing.assert_array_equal(back.counts, prof.counts)
    assert back.encoder_info == INFO and back.skipped == ["Empty"]
    LabelProfiles.load(out, sae=sae_dir)  # same dir: sha256 matches

    other = make_sae(seed=5)
    with pytest.raises(IncompatibleError, match="made with SAE 'mysae'.*fingerprint") as e:
        LabelProfiles.load(out, sae=other)
    assert e.value.args[0].count("fingerprint") == 2  # names both sides
    other_dir = tmp_path / "weights" / "othersae"
    other.save_pretrained(other_dir)
    with pytest.raises(IncompatibleError, match="'mysae' .*sha256.*'othersae' .*sha256"):
        LabelProfiles.load(out, sae=other_dir)
    with pytest.raises(IncompatibleError, match="test/enc.*other/enc2"):
        LabelProfiles.load(out, encoder_info=EncoderInfo("other/enc2", 16))
    with pytest.raises(IncompatibleError, match="other/enc2"):
        LabelProfiles.load(out, sae=make_sae(info=EncoderInfo("other/enc2", 16)))
    with pytest.raises(Exception, match="no label profiles"):
        LabelProfiles.load(tmp_path / "nothing")


class FakeEncoder:
    """Text i embeds to the store vector of a chosen row, so its nearest image is known."""

    def __init__(self, store, rows: dict[str, int], info=INFO):
        self.store, self.rows, self.info = store, rows, info

    def embed_texts(self, texts):
        return np.stack([np.asarray(self.store.vectors[self.rows[t]], np.float32) for t in texts])


def test_text_source_profiles(store, sae):
    from saefe.ingest.index import VectorIndex

    enc = FakeEncoder(store, {"an excited person": 7, "a calm person": 100})
    prompts = {"Excitement": "an excited person", "Peace": "a calm person"}
    vecs = np.asarray(store.vectors, np.float32)
    for index in (None, VectorIndex.build(vecs)):
        mem = membership_from_texts(store, index, enc, prompts, top_n=5)
        assert mem.labels == ["Excitement", "Peace"]
        assert mem.matrix.sum(axis=0).tolist() == [5, 5]
        for j, row in enumerate([7, 100]):
            truth = np.argsort(-(vecs @ vecs[row]))[:5]
            assert set(np.flatnonzero(mem.matrix[:, j])) == set(truth.tolist())
        assert mem.report.extra["top_n"] == 5
    prof = build_profiles(store, sae, mem)
    dense = brute_codes(store, sae)
    np.testing.assert_allclose(prof.mean[0], dense[mem.matrix[:, 0]].mean(0), rtol=1e-4, atol=1e-6)
    assert prof.source["kind"] == "texts" and prof.source["extra"]["prompts"] == prompts
    with pytest.raises(IncompatibleError, match="text encoder"):
        membership_from_texts(store, None, FakeEncoder(store, {}, EncoderInfo("x/y", 16)), prompts, 5)


def test_read_prompts(tmp_path):
    j = tmp_path / "p.json"
    j.write_text(json.dumps({"Peace": "a calm person", "Doubt/Confusion": "a confused person"}))
    assert read_prompts(j) == {"Peace": "a calm person", "Doubt/Confusion": "a confused person"}
    t = tmp_path / "p.tsv"
    t.write_text("# comment\nPeace\ta calm person\n\nValence high\ta happy person\n")
    assert read_prompts(t) == {"Peace": "a calm person", "Valence high": "a happy person"}
    t.write_text("Peace a calm person\n")
    with pytest.raises(CorpusError, match="label<TAB>prompt"):
        read_prompts(t)
    t.write_text("")
    with pytest.raises(CorpusError, match="empty"):
        read_prompts(t)


def test_cli_labels(store, sae, tmp_path, capsys):
    from saefe.cli.main import main

    sae_dir = tmp_path / "weights" / "s"
    sae.save_pretrained(sae_dir)
    csv = tmp_path / "ann.csv"
    csv.write_text(
        "Filename,Peace,Esteem,Gender,Age,Valence\n"
        + "".join(f"img_{i:04d}.jpg,{i % 2},{int(i % 3 == 0)},Male,Adult,{i % 10 + 1}\n" for i in range(0, N, 2))
        + "elsewhere.jpg,1,1,Female,Kid,5\n"
    )
    rc = main(["labels", "--index", str(store.dir), "--sae", str(sae_dir), "--annotations", str(csv), "--top-k", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Esteem" in out and "images" in out and "1 rows not in the corpus" in out
    prof = LabelProfiles.load(sae_dir / "labels", sae=sae)
    # Peace: even i with i % 2 == 1 never happens -> skipped; Female/Kid only on the unmatched row
    assert "Peace" in prof.skipped and "Female" in prof.skipped and "Esteem" in prof.labels
    assert prof.counts[prof.labels.index("Male")] == N // 2
    assert len(json.loads((sae_dir / "labels" / "labels.json").read_text())["distinct"]["Esteem"]) <= 3

    bad = tmp_path / "bad.csv"
    bad.write_text("Name,Peace\n")
    rc = main(["labels", "--index", str(store.dir), "--sae", str(sae_dir), "--annotations", str(bad)])
    assert rc == 2 and "error:" in capsys.readouterr().err


def test_cli_texts_and_folders(store, sae, tmp_path, capsys, monkeypatch):
    from saefe.ingest import encoder as encoder_mod
    from saefe.cli.main import main

    sae_dir = tmp_path / "w" / "s"
    sae.save_pretrained(sae_dir)
    asked = []

    def fake_from_pretrained(name, *a, **k):
        asked.append(name)
        return FakeEncoder(store, {"an excited person": 3, "a calm person": 50})

    monkeypatch.setattr(encoder_mod.SiglipEncoder, "from_pretrained", staticmethod(fake_from_pretrained))
    prompts = tmp_path / "prompts.tsv"
    prompts.write_text("Excitement\tan excited person\nPeace\ta calm person\n")
    out = tmp_path / "profiles"
    args = ["labels", "--index", str(store.dir), "--sae", str(sae_dir), "--texts", str(prompts),
            "--top-n", "7", "--out", str(out)]
    assert main(args) == 0
    assert asked == ["test/enc"]  # default: the index's model
    prof = LabelProfiles.load(out, sae=sae, encoder_info=INFO)
    assert prof.labels == ["Excitement", "Peace"] and prof.counts.tolist() == [7, 7]
    assert prof.source["extra"]["top_n"] == 7 and prof.source["source"] == str(prompts)
    assert main(args + ["--model", "demo"]) == 0 and asked[-1] == "demo"

    root = tmp_path / "folders"
    for name, rows in {"Happy": [0, 1, 2], "Sad": [5], "Nobody": []}.items():
        (root / name).mkdir(parents=True)
        for r in rows:
            (root / name / f"img_{r:04d}.jpg").write_bytes(b"x")
    assert main(["labels", "--index", str(store.dir), "--sae", str(sae_dir), "--folders", str(root)]) == 0
    prof = LabelProfiles.load(sae_dir / "labels")
    assert prof.labels == ["Happy", "Sad"] and prof.skipped == ["Nobody"] and prof.counts.tolist() == [3, 1]
    assert "skipped (no image): Nobody" in capsys.readouterr().out


def test_profile_arrays_ignore_stored_zeros():
    import scipy.sparse as sp

    from saefe.labels.profiles import profile_arrays

    # row 0 stores an explicit 0.0 for feature 1 (ReLU output kept by top-k): it did not fire
    codes = sp.csr_matrix((np.array([2.0, 0.0, 1.0]), np.array([0, 1, 1]), np.array([0, 2, 3])), shape=(2, 3))
    assert codes.nnz == 3
    mean, freq, counts = profile_arrays(codes, np.array([[True], [True]]))
    assert mean.tolist() == [[1.0, 0.5, 0.0]] and freq.tolist() == [[0.5, 0.5, 0.0]] and counts.tolist() == [2]
