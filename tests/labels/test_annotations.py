"""EMOTIC-style CSV reader and folder-per-label reader."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from saefe.labels.annotations import Membership, membership_from_folders, read_annotations
from saefe.errors import CorpusError
from saefe.manifest import EncoderInfo
from saefe.ingest.store import write_store

PATHS = ["images/a.jpg", "images/b.jpg", "sub/c.jpg", "other/c.jpg", "images/d.png", "images/e.jpg"]
INFO = EncoderInfo("test/enc", 8, (32, 32))


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    v = rng.normal(size=(len(PATHS), 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return write_store(tmp_path / "idx", v, pd.DataFrame({"path": PATHS}), INFO)


HEAD = "Unnamed: 0,Filename,Arr_name,Crop_name,X_min,Y_min,X_max,Y_max,Peace,Esteem,Doubt/Confusion,Fear,Valence,Arousal,Dominance"
ROWS = [
    # filename, peace, esteem, doubt, fear, V, A, D, gender, age
    ("a.jpg", 1, 0, 0, 0, 8, 5, 5, "Male", "Adult"),
    ("a.jpg", 0, 1, 0, 0, 2, 5, 5, "Female", "Kid"),  # second person of a.jpg: union
    ("b.jpg", 0, 0, 1, 1, 5, 9, "", "Female", "Teenager"),
    ("missing.jpg", 1, 1, 1, 1, 5, 5, 5, "Male", "Adult"),
    ("c.jpg", 1, 0, 0, 0, 5, 5, 5, "Male", "Adult"),  # two corpus files named c.jpg
    ("sub/c.jpg", 0, 0, 0, 1, 5, 5, 1, "Male", "Kid"),  # resolved by relative path
    ("gone.png", 0, 1, 0, 0, 5, 5, 5, "Female", "Adult"),
]


def _csv(tmp_path, layout: str) -> str:
    head = HEAD
    if layout in ("columns", "both"):
        head += ",Gender,Age"
    if layout in ("onehot", "both"):
        head += ",Male,Female,Kid,Teenager,Adult"
    lines = [head]
    for i, (f, p, e, d, fe, v, a, dom, g, age) in enumerate(ROWS):
        row = [i, f, f"arr_{i}.npy", f"crop_{i}.npy", 0, 0, 10, 10, p, e, d, fe, v, a, dom]
        if layout in ("columns", "both"):
            row += [g, age]
        if layout in ("onehot", "both"):
            row += [int(g == "Male"), int(g == "Female"), int(age == "Kid"), int(age == "Teenager"), int(age == "Adult")]
        lines.append(",".join(map(str, row)))
    p = tmp_path / f"ann_{layout}.csv"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def _labels_of(m: Membership, row: int) -> set[str]:
    return {l for l, on in zip(m.labels, m.matrix[row]) if on}


@pytest.mark.parametrize("layout", ["columns", "onehot", "both"])
def test_emotic_layouts_union_and_report(store, tmp_path, layout, caplog):
    with caplog.at_level(logging.WARNING, logger="saefe.labels.annotations"):
        m = read_annotations(_csv(tmp_path, layout), store)
    assert m.matrix.shape == (len(PATHS), len(m.labels)) and m.matrix.dtype == bool
    assert "Unnamed: 0" not in m.labels and "X_min" not in m.labels
    a = _labels_of(m, 0)
    assert a == {"Peace", "Esteem", "Male", "Female", "Adult", "Kid", "Valence high", "Valence low"}
    assert _labels_of(m, 1) == {"Doubt/Confusion", "Fear", "Female", "Teenager", "Arousal high"}
    assert _labels_of(m, 2) == {"Fear", "Male", "Kid", "Dominance low"}  # sub/c.jpg
    assert _labels_of(m, 3) == set() and _labels_of(m, 4) == set() and _labels_of(m, 5) == set()
    r = m.report
    assert r.rows == 7 and r.matched_rows == 4
    assert r.unmatched_rows == 2 and set(r.unmatched_examples) == {"missing.jpg", "gone.png"}
    assert r.ambiguous_rows == 1 and r.ambiguous_examples == ["c.jpg"]
    assert r.images_labelled == 3
    assert r.layout == {"columns": "gender/age columns", "onehot": "one-hot", "both": "both"}[layout]
    assert r.thresholds["Valence high"] == "Valence >= 7" and r.thresholds["Dominance low"] == "Dominance <= 3"
    assert "missing.jpg" in caplog.text and "c.jpg" in caplog.text
    matrix, labels, report = m  # unpacks
    assert labels == m.labels


def test_both_layouts_are_ored(store, tmp_path):
    p = tmp_path / "both.csv"
    p.write_text("Filename,Peace,Gender,Male,Female\na.jpg,1,Female,1,0\nb.jpg,0,,0,1\n")
    m = read_annotations(p, store)
    assert _labels_of(m, 0) == {"Peace", "Male", "Female"}
    assert _labels_of(m, 1) == {"Female"}


def test_vad_thresholds_configurable_and_extra_label_column(store, tmp_path):
    p = tmp_path / "vad.csv"
    p.write_text("Filename,Valence,Custom,Notes\na.jpg,6,1,hello\nb.jpg,4,0,x\nsub/c.jpg,,1,\n")
    m = read_annotations(p, store, vad_high=6, vad_low=4)
    assert "Notes" not in m.labels  # free text is not a label
    assert _labels_of(m, 0) == {"Valence high", "Custom"}
    assert _labels_of(m, 1) == {"Valence low"}
    assert _labels_of(m, 2) == {"Custom"}  # empty valence: neither high nor low
    assert m.report.thresholds == {"Valence high": "Valence >= 6", "Valence low": "Valence <= 4"}


def test_relative_path_disambiguates_by_folder_column(store, tmp_path):
    p = tmp_path / "folder.csv"
    p.write_text("Folder,Filename,Fear\nother,c.jpg,1\n")
    m = read_annotations(p, store)
    assert m.matrix[3].tolist() == [True] and not m.matrix[2].any()


@pytest.mark.parametrize(
    "content, msg",
    [
        ("", "is empty"),
        ("Filename,Peace\n", "no rows"),
        ("Name,Peace\na.jpg,1\n", "no 'Filename' column"),
        ("Filename,X_min,Notes\na.jpg,3,hi\n", "no recognisable label columns"),
        ("Filename,Peace\nnowhere.jpg,1\nalso.jpg,0\n", "no row of"),
        ("Filename,Peace\na.jpg,yes\n", "should hold 0/1"),
    ],
)
def test_bad_csvs(store, tmp_path, content, msg):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(CorpusError, match=msg) as e:
        read_annotations(p, store)
    assert "\n" not in str(e.value)


def test_missing_file(store, tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        read_annotations(tmp_path / "nope.csv", store)


def test_folders(store, tmp_path):
    root = tmp_path / "labels"
    for rel in ["Happy/a.jpg", "Happy/e.jpg", "Sad/sub/c.jpg", "Sad/zzz.jpg", "Sad/c.jpg", "Sad/notes.txt"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    m = membership_from_folders(store, root)
    assert m.labels == ["Happy", "Sad"]
    assert m.matrix[:, 0].tolist() == [True, False, False, False, False, True]
    assert m.matrix[:, 1].tolist() == [False, False, True, False, False, False]
    assert m.report.rows == 5  # notes.txt is not an image
    assert m.report.unmatched_examples == ["Sad/zzz.jpg"]
    assert m.report.ambiguous_examples == ["Sad/c.jpg"]


def test_folders_errors(store, tmp_path):
    with pytest.raises(CorpusError, match="not a directory"):
        membership_from_folders(store, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no sub-folders"):
        membership_from_folders(store, tmp_path / "empty")
    (tmp_path / "r" / "L").mkdir(parents=True)
    (tmp_path / "r" / "L" / "x.jpg").write_bytes(b"x")
    with pytest.raises(CorpusError, match="no image under"):
        membership_from_folders(store, tmp_path / "r")
