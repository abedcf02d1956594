"""The built-in demo corpus: deterministic, EMOTIC layout, planted bias, resumable, separable."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from saefe.demo.corpus import (
    DEMO_AGES,
    DEMO_EMOTIONS,
    DEMO_GENDERS,
    DEMO_LABELS,
    DEMO_TEXT_PROMPTS,
    DemoConfig,
    _sample_spec,
    generate_demo,
)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_small")
    corpus = generate_demo(out, DemoConfig(n=120, seed=3, size=96), progress=False)
    return corpus


def test_labels_and_prompts():
    assert len(DEMO_EMOTIONS) == 8 and {"Esteem", "Happiness"} <= set(DEMO_EMOTIONS)
    assert DEMO_LABELS == DEMO_EMOTIONS + ["Male", "Female", "Kid", "Teenager", "Adult"]
    assert set(DEMO_TEXT_PROMPTS) == set(DEMO_LABELS)
    # (that the demo model's tokenizer knows every prompt word: tests/test_demo_model.py)


def test_layout_and_one_hot(small):
    df = pd.read_csv(small.annotations)
    assert len(df) == small.n == 120
    cols = ["Filename", "Arr_name", "Crop_name", "X_min", "Y_min", "X_max", "Y_max",
            *DEMO_EMOTIONS, "Valence", "Arousal", "Dominance", "Gender", "Age",
            *DEMO_GENDERS, *DEMO_AGES]
    assert list(df.columns) == cols
    assert df.Filename.tolist() == [f"demo_{i:05d}.png" for i in range(120)]
    assert sorted(p.name for p in small.images_dir.iterdir()) == df.Filename.tolist()
    assert (df[DEMO_EMOTIONS].sum(axis=1) == 1).all()
    assert set(df.Gender) <= set(DEMO_GENDERS) and set(df.Age) <= set(DEMO_AGES)
    for g in DEMO_GENDERS:
        assert (df[g] == (df.Gender == g).astype(int)).all()
    for a in DEMO_AGES:
        assert (df[a] == (df.Age == a).astype(int)).all()
    for c in ("Valence", "Arousal", "Dominance"):
        assert df[c].between(1, 10).all()
    # The bounding box holds the person and lies inside the image.
    assert ((df.X_min >= 0) & (df.Y_min >= 0) & (df.X_max < 96) & (df.Y_max < 96)).all()
    assert ((df.X_max - df.X_min) > 10).all() and ((df.Y_max - df.Y_min) > 20).all()
    meta = json.loads((small.root / "demo.json").read_text())
    assert meta["n"] == 120 and meta["seed"] == 3 and meta["size"] == 96
    assert meta["label_counts"] == {lab: int(df[lab].sum()) for lab in DEMO_LABELS}
    from PIL import Image

    with Image.open(small.images_dir / "demo_00007.png") as im:
        assert im.size == (96, 96) and im.mode == "RGB"


def test_deterministic(tmp_path, small):
    a = generate_demo(tmp_path / "a", DemoConfig(n=6, seed=3, size=96), progress=False)
    b = generate_demo(tmp_path / "b", DemoConfig(n=6, seed=4, size=96), progress=False)
    for i in range(6):
        name = f"demo_{i:05d}.png"
        # same seed: identical bytes, also as the prefix of a bigger corpus
        assert (a.images_dir / name).read_bytes() == (small.images_dir / name).read_bytes()
    assert any(
        (a.images_dir / f"demo_{i:05d}.png").read_bytes() != (b.images_dir / f"demo_{i:05d}.png").read_bytes()
        for i in range(6)
    )
    assert pd.read_csv(a.annotations).equals(pd.read_csv(small.annotations).head(6))


def test_planted_bias():
    # Sampling labels needs no drawing, so a large sample is cheap.
    specs = [_sample_spec(0, i, 128) for i in range(4000)]
    df = pd.DataFrame({k: [s[k] for s in specs] for k in ("emotion", "gender", "age")})
    male = df.assign(m=df.gender == "Male").groupby("emotion").m.mean()
    adult = df.assign(a=df.age == "Adult").groupby("emotion").a.mean()
    young = df.assign(y=df.age != "Adult").groupby("emotion").y.mean()
    assert male["Esteem"] > 0.75 and adult["Esteem"] > 0.7
    assert male["Peace"] < 0.3  # mostly women
    assert young["Excitement"] > 0.75  # mostly kids and teenagers
    for e in ("Happiness", "Sadness", "Anger", "Fear", "Surprise"):
        assert 0.4 < male[e] < 0.6, e
        assert 0.25 < adult[e] < 0.42, e
    counts = df.emotion.value_counts()
    assert counts.min() > 400  # every emotion well represented


def test_idempotent_and_resume(tmp_path):
    cfg = DemoConfig(n=10, seed=1, size=64)
    c = generate_demo(tmp_path, cfg, progress=False)
    files = sorted(c.images_dir.iterdir()) + [c.annotations, c.root / "demo.json"]
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    generate_demo(tmp_path, cfg, progress=False)
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes

    # A deleted image is redrawn, identical, and nothing else is rewritten.
    victim = c.images_dir / "demo_00004.png"
    original = victim.read_bytes()
    victim.unlink()
    generate_demo(tmp_path, cfg, progress=False)
    assert victim.read_bytes() == original
    for p in sorted(c.images_dir.iterdir()):
        if p != victim:
            assert p.stat().st_mtime_ns == mtimes[p], p

    # So does an interrupted run (what it leaves: demo.pending.json, no demo.json).
    (c.root / "demo.json").rename(c.root / "demo.pending.json")
    victim2 = c.images_dir / "demo_00007.png"
    original2 = victim2.read_bytes()
    victim2.unlink()
    generate_demo(tmp_path, cfg, progress=False)
    assert victim2.read_bytes() == original2
    for p in sorted(c.images_dir.iterdir()):
        if p not in (victim, victim2):
            assert p.stat().st_mtime_ns == mtimes[p], p
    assert (c.root / "demo.json").exists()
    assert not (c.root / "demo.pending.json").exists()

    # Another seed in the same folder redraws everything.
    c2 = generate_demo(tmp_path, DemoConfig(n=10, seed=2, size=64), progress=False)
    assert (c2.images_dir / "demo_00004.png").read_bytes() != original
    assert json.loads((c2.root / "demo.json").read_text())["seed"] == 2

    # A smaller n drops the images beyond it.
    generate_demo(tmp_path, DemoConfig(n=5, seed=2, size=64), progress=False)
    assert len(list(c2.images_dir.iterdir())) == 5
    assert len(pd.read_csv(c2.annotations)) == 5
