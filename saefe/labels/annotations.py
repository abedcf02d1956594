"""Which corpus images carry which label: EMOTIC-style CSV, one folder per label.

Both readers return a :class:`Membership`: a boolean matrix (N_images x n_labels) aligned to the
embedding store's rows, the label names (its columns) and a :class:`MembershipReport` saying what
matched, what did not, and how continuous columns were thresholded.

EMOTIC CSV (one row per annotated person)::

    Filename, Arr_name, Crop_name, X_min, Y_min, X_max, Y_max, Peace, ..., Suffering,
    Valence, Arousal, Dominance, Gender, Age

* Emotion columns are 0/1 (any value > 0 counts as 1, empty counts as 0). Besides the 26 EMOTIC
  categories, any other column whose values are all 0/1 (and is not a known metadata column)
  becomes a label too, so the same layout works for other label sets.
* ``Gender`` (Male/Female) and ``Age`` (Kid/Teenager/Adult) are expanded to one-hot labels; if
  one-hot ``Male``/``Female``/``Kid``/``Teenager``/``Adult`` columns are present as well the two
  are OR-ed.
* Valence, Arousal and Dominance (EMOTIC's 1-10 scale) become thresholded labels
  ``"<Name> high"`` (value >= ``vad_high``, default 7) and ``"<Name> low"`` (value <= ``vad_low``,
  default 3); the rule is recorded in ``MembershipReport.thresholds``.
* Several rows for one image (several people) give the union of their labels.
* Rows are matched to corpus images by file name: the exact relative path when ``Filename``
  (optionally joined to a ``Folder`` column) equals or ends a corpus path, else the basename.
  A basename that names two corpus files cannot be resolved and is reported as ambiguous.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

import numpy as np

from saefe.errors import CorpusError

log = logging.getLogger(__name__)

DEMOGRAPHIC_LABELS = ["Kid", "Teenager", "Adult", "Male", "Female"]
CONTINUOUS_COLUMNS = ["Valence", "Arousal", "Dominance"]
EMOTION_LABELS = [
    "Peace", "Affection", "Esteem", "Anticipation", "Engagement", "Confidence", "Happiness",
    "Pleasure", "Excitement", "Surprise", "Sympathy", "Doubt/Confusion", "Disconnection",
    "Fatigue", "Embarrassment", "Yearning", "Disapproval", "Aversion", "Annoyance", "Anger",
    "Sensitivity", "Sadness", "Disquietment", "Fear", "Pain", "Suffering",
]
KNOWN_LABELS = DEMOGRAPHIC_LABELS + EMOTION_LABELS
GENDER_VALUES = {"male": "Male", "female": "Female", "m": "Male", "f": "Female"}
AGE_VALUES = {"kid": "Kid", "child": "Kid", "teenager": "Teenager", "teen": "Teenager", "adult": "Adult"}
# Columns of the EMOTIC export that are never labels.
METADATA_COLUMNS = {
    "filename", "folder", "arr_name", "crop_name", "x_min", "y_min", "x_max", "y_max",
    "gender", "age", "valence", "arousal", "dominance", "path", "url", "id", "index",
    "image_size", "width", "height", "orig_db", "person_id",
}
VAD_HIGH = 7.0
VAD_LOW = 3.0
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
N_EXAMPLES = 5


@dataclass
class MembershipReport:
    """What a reader matched; stored in labels.json and logged."""

    source: str
    kind: str  # "annotations" | "folders" | "texts"
    rows: int = 0  # CSV rows / files / prompts read
    matched_rows: int = 0
    unmatched_rows: int = 0
    unmatched_examples: list[str] = field(default_factory=list)
    ambiguous_rows: int = 0
    ambiguous_examples: list[str] = field(default_factory=list)
    images_labelled: int = 0
    layout: str = ""  # annotations: "gender/age columns", "one-hot", "both", "none"
    thresholds: dict[str, str] = field(default_factory=dict)  # label -> rule, e.g. "Valence >= 7"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    def log(self) -> None:
        log.info(
            "%s %s: %d rows, %d matched, %d images labelled", self.kind, self.source, self.rows,
            self.matched_rows, self.images_labelled,
        )
        if self.unmatched_rows:
            log.warning(
                "%d rows name an image that is not in the corpus, e.g. %s", self.unmatched_rows,
                ", ".join(self.unmatched_examples),
            )
        if self.ambiguous_rows:
            log.warning(
                "%d rows name a file name shared by several corpus images (not used), e.g. %s",
                self.ambiguous_rows, ", ".join(self.ambiguous_examples),
            )


@dataclass
class Membership:
    """matrix[i, j] is True when store row i carries label j."""

    matrix: np.ndarray  # (N, L) bool
    labels: list[str]
    report: MembershipReport

    def __iter__(self):  # allows ``matrix, labels, report = read_annotations(...)``
        return iter((self.matrix, self.labels, self.report))

    def counts(self) -> dict[str, int]:
        return {name: int(c) for name, c in zip(self.labels, self.matrix.sum(axis=0))}


# -- matching file names to store rows ----------------------------------------------------


def _norm_path(p: str) -> str:
    p = str(p).strip().replace("\\", "/")
    while p.startswith("./"):
        p = p[2:]
    return p


def store_paths(store) -> list[str]:
    """The store's per-row image paths (``path`` column, else ``url``), normalised."""
    md = store.metadata
    col = "path" if "path" in md.columns else ("url" if "url" in md.columns else None)
    if col is None:
        raise CorpusError(f"the index at {getattr(store, 'dir', '?')} has no 'path' or 'url' column to match labels to")
    return [_norm_path(p) if isinstance(p, str) else "" for p in md[col].tolist()]


class PathMatcher:
    """Resolve a file name (basename or relative path) to store rows."""

    def __init__(self, paths: list[str]):
        self.by_path: dict[str, list[int]] = defaultdict(list)
        self.by_base: dict[str, list[int]] = defaultdict(list)
        self.paths = paths
        for i, p in enumerate(paths):
            if not p:
                continue
            self.by_path[p].append(i)
            self.by_base[PurePosixPath(p).name].append(i)

    def match(self, name: str, folder: str | None = None) -> tuple[list[int], str]:
        """-> (rows, status) with status "ok", "missing" or "ambiguous"."""
        name = _norm_path(name)
        if not name:
            return [], "missing"
        tries = []
        if folder:
            tries.append(_norm_path(f"{folder}/{name}"))
        tries.append(name)
        for t in tries:
            if t in self.by_path:
                return self.by_path[t], "ok"
        base = PurePosixPath(name).name
        cands = self.by_base.get(base, [])
        if not cands:
            return [], "missing"
        for t in tries:  # a relative path that ends a corpus path: "sub/x.jpg" vs "images/sub/x.jpg"
            if "/" in t:
                hits = [i for i in cands if self.paths[i].endswith("/" + t)]
                if hits:
                    return (hits, "ok") if len({self.paths[i] for i in hits}) == 1 else (hits, "ambiguous")
        if len({self.paths[i] for i in cands}) == 1:  # same file stored twice counts as one image
            return cands, "ok"
        return cands, "ambiguous"


# -- EMOTIC CSV ---------------------------------------------------------------------------


def _binary_column(values, name: str, strict: bool) -> np.ndarray | None:
    import pandas as pd

    s = values
    if s.dtype == bool:
        return s.to_numpy(dtype=bool)
    if not strict and not s.notna().any():
        return None
    num = pd.to_numeric(s, errors="coerce")
    bad = num.isna() & s.notna() & (s.astype(str).str.strip() != "")
    if bad.any():
        if not strict:
            return None
        ex = s[bad].astype(str).iloc[0]
        raise CorpusError(f"label column {name!r} should hold 0/1 values, found {ex!r}")
    num = num.fillna(0)
    if not strict and not num.isin([0, 1]).all():
        return None
    return (num > 0).to_numpy(dtype=bool)


def read_annotations(
    path: str | os.PathLike, store, vad_high: float = VAD_HIGH, vad_low: float = VAD_LOW
) -> Membership:
    """Read an EMOTIC-style CSV and align it to ``store``'s rows (see the module docstring)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"annotations file {path} does not exist")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=True)
    except pd.errors.EmptyDataError:
        raise CorpusError(f"annotations file {path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise CorpusError(f"annotations file {path} is not a readable CSV: {str(e).splitlines()[0]}") from None
    if df.empty:
        raise CorpusError(f"annotations file {path} has a header but no rows")
    cols = {str(c).strip().lower(): c for c in df.columns}
    if "filename" not in cols:
        raise CorpusError(
            f"annotations file {path} has no 'Filename' column (columns: {', '.join(map(str, df.columns[:12]))})"
        )
    if vad_low >= vad_high:
        raise CorpusError(f"VAD thresholds must satisfy low < high, got low {vad_low}, high {vad_high}")

    label_cols: dict[str, np.ndarray] = {}  # canonical label -> (rows,) bool
    canon = {name.lower(): name for name in KNOWN_LABELS}
    onehot_demo, expanded_demo = False, False
    for key, col in cols.items():
        if key in METADATA_COLUMNS or key.startswith("unnamed"):
            continue
        if key in canon:
            label_cols[canon[key]] = _binary_column(df[col], str(col), strict=True)
            onehot_demo |= canon[key] in DEMOGRAPHIC_LABELS
        else:
            arr = _binary_column(df[col], str(col), strict=False)
            if arr is not None:
                label_cols[str(col).strip()] = arr
                log.info("annotations: column %r taken as an extra 0/1 label", col)

    def _expand(colname: str, mapping: dict[str, str]) -> bool:
        if colname not in cols:
            return False
        vals = df[cols[colname]].fillna("").astype(str).str.strip().str.lower()
        unknown = sorted(set(vals) - set(mapping) - {"", "nan"})
        if unknown:
            log.warning("annotations: %s values %s are not recognised and ignored", colname, unknown[:5])
        for raw, label in mapping.items():
            hit = (vals == raw).to_numpy()
            label_cols[label] = label_cols.get(label, np.zeros(len(df), bool)) | hit
        return True

    expanded_demo |= _expand("gender", GENDER_VALUES)
    expanded_demo |= _expand("age", AGE_VALUES)

    thresholds: dict[str, str] = {}
    for name in CONTINUOUS_COLUMNS:
        key = name.lower()
        if key not in cols:
            continue
        vals = pd.to_numeric(df[cols[key]], errors="coerce").to_numpy(dtype=float)
        with np.errstate(invalid="ignore"):
            label_cols[f"{name} high"] = vals >= vad_high
            label_cols[f"{name} low"] = vals <= vad_low
        thresholds[f"{name} high"] = f"{name} >= {vad_high:g}"
        thresholds[f"{name} low"] = f"{name} <= {vad_low:g}"

    if not label_cols:
        raise CorpusError(
            f"annotations file {path} has no recognisable label columns (expected 0/1 columns such as "
            "Peace, Esteem, ..., or Gender/Age/Valence)"
        )
    # Stable label order: the seed's list first, then VAD, then extra columns as they appear.
    order = [n for n in KNOWN_LABELS if n in label_cols]
    order += [n for n in label_cols if n.split(" ")[0] in CONTINUOUS_COLUMNS and n not in order]
    order += [n for n in label_cols if n not in order]
    row_labels = np.stack([label_cols[n] for n in order], axis=1)

    matcher = PathMatcher(store_paths(store))
    n = len(matcher.paths)
    matrix = np.zeros((n, len(order)), dtype=bool)
    filenames = df[cols["filename"]].fillna("").astype(str).tolist()
    folders = df[cols["folder"]].fillna("").astype(str).tolist() if "folder" in cols else [None] * len(df)
    report = MembershipReport(source=str(path), kind="annotations", rows=len(df), thresholds=thresholds)
    report.layout = {(True, True): "both", (True, False): "one-hot", (False, True): "gender/age columns"}.get(
        (onehot_demo, expanded_demo), "none"
    )
    unmatched, ambiguous = [], []
    cache: dict[tuple[str, str | None], tuple[list[int], str]] = {}
    for r, (fname, folder) in enumerate(zip(filenames, folders)):
        key = (fname, folder)
        if key not in cache:
            cache[key] = matcher.match(fname, folder)
        rows, status = cache[key]
        if status == "ok":
            matrix[rows] |= row_labels[r]
            report.matched_rows += 1
        elif status == "ambiguous":
            ambiguous.append(fname)
        else:
            unmatched.append(fname or f"<row {r + 2}: empty Filename>")
    report.unmatched_rows = len(unmatched)
    report.unmatched_examples = list(dict.fromkeys(unmatched))[:N_EXAMPLES]
    report.ambiguous_rows = len(ambiguous)
    report.ambiguous_examples = list(dict.fromkeys(ambiguous))[:N_EXAMPLES]
    report.images_labelled = int(matrix.any(axis=1).sum())
    report.log()
    if report.matched_rows == 0:
        ex = ", ".join(report.unmatched_examples[:3] or report.ambiguous_examples[:3])
        raise CorpusError(
            f"no row of {path} matches an image of the index ({len(df)} rows, e.g. {ex}); "
            "rows are matched by the file name of the index's 'path' column"
        )
    return Membership(matrix=matrix, labels=order, report=report)


# -- one folder per label -----------------------------------------------------------------


def _iter_images(folder: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS:
                yield Path(dirpath) / f


def membership_from_folders(store, root: str | os.PathLike) -> Membership:
    """Labels = the sub-folders of ``root``; each image file in one marks that label.

    A file ``root/LABEL/rel/x.jpg`` is matched to the corpus path ``LABEL/rel/x.jpg`` (corpus root =
    ``root``), else a corpus path ending with ``/LABEL/rel/x.jpg`` or ``rel/x.jpg``, else its
    basename when unique in the corpus.
    """
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(f"label folder root {root} is not a directory")
    label_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not label_dirs:
        raise CorpusError(f"{root} has no sub-folders; expected one folder per label")
    matcher = PathMatcher(store_paths(store))
    labels = [d.name for d in label_dirs]
    matrix = np.zeros((len(matcher.paths), len(labels)), dtype=bool)
    report = MembershipReport(source=str(root), kind="folders")
    unmatched, ambiguous = [], []
    for j, d in enumerate(label_dirs):
        for f in _iter_images(d):
            report.rows += 1
            rel = f.relative_to(d).as_posix()
            rows, status = matcher.match(rel, folder=d.name)
            if status == "missing" and "/" in rel:
                rows, status = matcher.match(f.name)
            if status == "ok":
                matrix[rows, j] = True
                report.matched_rows += 1
            elif status == "ambiguous":
                ambiguous.append(f"{d.name}/{rel}")
            else:
                unmatched.append(f"{d.name}/{rel}")
    report.unmatched_rows = len(unmatched)
    report.unmatched_examples = unmatched[:N_EXAMPLES]
    report.ambiguous_rows = len(ambiguous)
    report.ambiguous_examples = ambiguous[:N_EXAMPLES]
    report.images_labelled = int(matrix.any(axis=1).sum())
    report.log()
    if report.rows == 0:
        raise CorpusError(f"the label folders under {root} hold no image files")
    if report.matched_rows == 0:
        raise CorpusError(
            f"no image under {root} matches an image of the index (e.g. {', '.join(unmatched[:3] or ambiguous[:3])})"
        )
    return Membership(matrix=matrix, labels=labels, report=report)
