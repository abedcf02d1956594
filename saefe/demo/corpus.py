"""The built-in demo corpus: cartoon people whose pictures really show their labels.

No annotated emotion data ships with the project, so the demo draws its own: one person per
image, with one emotion (facial expression, posture, mood lighting and scene), a gender (long
hair and a dress vs short hair, trousers and sometimes a beard) and an age group (head-to-body
proportion, figure height, grey hair). Nuisance variation (position, scale, skin tone, clothing
colour, background clutter, mirroring, blur, noise) keeps it from being trivial.

Like real data, it carries a planted bias: Esteem is shown mostly by adult men, Peace and
Affection-like calm mostly by women, Excitement mostly by kids and teenagers; the other emotions
are balanced. Steering such as ``Esteem - Male + Adult`` can then be seen to change the
demographic share of search results.

Everything is deterministic: image ``i`` depends only on ``(seed, i, size)`` through
``np.random.default_rng([seed, i])``, so an interrupted run resumes by drawing only the missing
files, and a smaller ``n`` with the same seed is a prefix of a larger one.

Output (``out_dir``): ``images/demo_00000.png`` ..., ``annotations.csv`` in the EMOTIC layout
(with Gender/Age one-hot columns already expanded) and, written last, ``demo.json``.

This module samples each image's spec and writes the corpus; render.py draws a spec.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from saefe.demo.render import _CLOTHES, _clip3, demo_person_bbox, render_demo_image  # noqa: F401 (re-exported)

GENERATOR_VERSION = 1

DEMO_EMOTIONS: list[str] = [
    "Happiness", "Sadness", "Anger", "Fear", "Surprise", "Peace", "Esteem", "Excitement",
]
DEMO_GENDERS: list[str] = ["Male", "Female"]
DEMO_AGES: list[str] = ["Kid", "Teenager", "Adult"]
DEMO_LABELS: list[str] = DEMO_EMOTIONS + DEMO_GENDERS + DEMO_AGES

DEMO_TEXT_PROMPTS: dict[str, str] = {
    "Happiness": "a photo of a happy person",
    "Sadness": "a photo of a sad person",
    "Anger": "a photo of an angry person",
    "Fear": "a photo of a scared person",
    "Surprise": "a photo of a surprised person",
    "Peace": "a photo of a calm person",
    "Esteem": "a photo of a proud person",
    "Excitement": "a photo of an excited person",
    "Male": "a photo of a male person",  # "a man" says adult too
    "Female": "a photo of a female person",
    "Kid": "a photo of a child",
    "Teenager": "a photo of a teenager",
    "Adult": "a photo of an adult",
}

# Planted bias: P(Male | emotion) and P(Kid, Teenager, Adult | emotion); the rest balanced.
_P_MALE = {e: 0.5 for e in DEMO_EMOTIONS} | {"Esteem": 0.85, "Peace": 0.2}
_P_AGE = {e: (1 / 3, 1 / 3, 1 / 3) for e in DEMO_EMOTIONS} | {
    "Esteem": (0.05, 0.15, 0.80),
    "Excitement": (0.50, 0.35, 0.15),
}
# Per-emotion (Valence, Arousal, Dominance) means on EMOTIC's 1-10 scale.
_VAD = {
    "Happiness": (8.0, 6.0, 6.5),
    "Sadness": (2.5, 3.0, 3.0),
    "Anger": (2.5, 8.0, 7.0),
    "Fear": (2.0, 7.5, 2.5),
    "Surprise": (6.0, 8.0, 5.0),
    "Peace": (7.5, 2.5, 5.5),
    "Esteem": (7.0, 5.0, 8.5),
    "Excitement": (8.5, 9.0, 6.5),
}
_VAD_SD = 0.9

_HEIGHT = {"Kid": 0.48, "Teenager": 0.68, "Adult": 0.9}      # fraction of the image height
_SKIN = [(255, 224, 196), (241, 194, 160), (224, 172, 130), (198, 134, 90), (141, 85, 54), (92, 58, 38)]
_HAIR = [(30, 22, 18), (75, 45, 25), (140, 90, 45), (210, 170, 90), (120, 40, 20)]
# Outfits: hue family by gender, brightness/saturation and cut by age group.
_OUTFIT_TOP = {
    ("Female", "Kid"): [(255, 120, 180), (255, 140, 150), (240, 130, 230)],
    ("Male", "Kid"): [(70, 180, 255), (80, 220, 120), (60, 210, 220)],
    ("Female", "Teenager"): [(225, 50, 150), (200, 50, 200), (235, 60, 110)],
    ("Male", "Teenager"): [(30, 110, 210), (30, 150, 80), (20, 130, 150)],
    ("Female", "Adult"): [(175, 20, 60), (140, 30, 130), (190, 40, 40)],
    ("Male", "Adult"): [(25, 35, 75), (45, 50, 60), (20, 55, 45)],
}
_OUTFIT_BOTTOM = {
    ("Female", "Kid"): [(255, 90, 140), (230, 100, 230), (255, 170, 200)],
    ("Male", "Kid"): [(40, 90, 220), (30, 160, 90), (40, 140, 200)],
    ("Female", "Teenager"): [(160, 30, 120), (200, 40, 90), (130, 40, 170)],
    ("Male", "Teenager"): [(50, 80, 140), (40, 60, 110), (70, 100, 160)],
}


@dataclass
class DemoConfig:
    n: int = 3000
    seed: int = 0
    size: int = 128  # image side in pixels


@dataclass
class DemoCorpus:
    root: Path
    images_dir: Path
    annotations: Path
    n: int


def image_name(i: int) -> str:
    return f"demo_{i:05d}.png"


# --------------------------------------------------------------------------- sampling


def _sample_spec(seed: int, i: int, size: int) -> dict:
    """Everything about image i (labels, layout, nuisances), from its own RNG stream."""
    rng = np.random.default_rng([seed, i])
    emotion = DEMO_EMOTIONS[int(rng.integers(len(DEMO_EMOTIONS)))]
    gender = "Male" if rng.random() < _P_MALE[emotion] else "Female"
    age = DEMO_AGES[int(rng.choice(3, p=_P_AGE[emotion]))]
    vad = [
        int(np.clip(np.rint(m + _VAD_SD * rng.standard_normal()), 1, 10)) for m in _VAD[emotion]
    ]
    S = float(size)
    height = _HEIGHT[age] * S * rng.uniform(0.93, 1.07)
    if emotion == "Fear":
        height *= 0.9  # cowering
    if emotion == "Sadness":
        height *= 0.95  # slumped
    ground = S * rng.uniform(0.93, 0.98)
    lift = height * 0.1 if emotion == "Excitement" else 0.0  # jumping
    cx = S * (0.5 + rng.uniform(-0.16, 0.16))
    spec = dict(
        i=i, seed=seed, size=size, emotion=emotion, gender=gender, age=age, vad=vad,
        height=height, ground=ground, lift=lift, cx=cx,
        skin=_SKIN[int(rng.integers(len(_SKIN)))],
        hair=_HAIR[int(rng.integers(len(_HAIR)))],
        grey=bool(age == "Adult" and rng.random() < 0.45),
        beard=bool(gender == "Male" and age == "Adult" and rng.random() < 0.55),
        top=_clip3(np.add(_pick(rng, _OUTFIT_TOP[(gender, age)]), rng.uniform(-12, 12, 3))),
        bottom=_bottom_colour(rng, gender, age),
        tie=_CLOTHES[int(rng.integers(len(_CLOTHES)))],
        width=rng.uniform(0.9, 1.12),
        bg_jitter=rng.uniform(-22, 22, size=3).tolist(),
        bg_gain=float(rng.uniform(0.85, 1.12)),
        clutter=[
            (int(rng.integers(4)), *rng.uniform(0, 1, size=6).tolist())
            for _ in range(int(rng.integers(2, 7)))
        ],
        flip=bool(rng.random() < 0.5),
        blur=float(rng.uniform(0, 0.8)) if rng.random() < 0.3 else 0.0,
        noise=float(rng.uniform(2, 9)),
    )
    return spec


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _bottom_colour(rng, gender: str, age: str):
    if age == "Adult":
        return (0, 0, 0)  # adults: set from the top (suit trousers / dress)
    return _clip3(np.add(_pick(rng, _OUTFIT_BOTTOM[(gender, age)]), rng.uniform(-12, 12, 3)))


# --------------------------------------------------------------------------- corpus


def _row(spec: dict, bbox) -> dict:
    name = image_name(spec["i"])
    stem = name.rsplit(".", 1)[0]
    row = {
        "Filename": name,
        "Arr_name": f"{stem}_arr.npy",
        "Crop_name": f"{stem}_crop.npy",
        "X_min": bbox[0], "Y_min": bbox[1], "X_max": bbox[2], "Y_max": bbox[3],
    }
    for e in DEMO_EMOTIONS:
        row[e] = int(spec["emotion"] == e)
    row["Valence"], row["Arousal"], row["Dominance"] = spec["vad"]
    row["Gender"] = spec["gender"]
    row["Age"] = spec["age"]
    for g in DEMO_GENDERS:
        row[g] = int(spec["gender"] == g)
    for a in DEMO_AGES:
        row[a] = int(spec["age"] == a)
    return row


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _png_bytes(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def demo_images(cfg: DemoConfig, indices=None):
    """Yield (i, PIL image, annotation row) without touching the disk (tests, notebooks)."""
    for i in range(cfg.n) if indices is None else indices:
        spec = _sample_spec(cfg.seed, int(i), cfg.size)
        img, bbox = render_demo_image(spec)
        yield int(i), img, _row(spec, bbox)


def _write_chunk(args) -> dict[int, tuple]:
    seed, size, images_dir, indices = args
    out = {}
    for i in indices:
        img, bbox = render_demo_image(_sample_spec(seed, i, size))
        _atomic_write_bytes(Path(images_dir) / image_name(i), _png_bytes(img))
        out[i] = bbox
    return out


def _identity(cfg: DemoConfig) -> dict:
    return {"seed": cfg.seed, "size": cfg.size, "generator_version": GENERATOR_VERSION}


def generate_demo(
    out_dir, cfg: DemoConfig | None = None, progress: bool = True, workers: int | None = None
) -> DemoCorpus:
    """Write (or finish writing) the demo corpus in ``out_dir``; cheap when already complete.

    ``workers`` processes draw in parallel (default: the CPU count, at most 8; 1 = serial).
    """
    import multiprocessing as mp

    import pandas as pd

    cfg = cfg or DemoConfig()
    if cfg.n < 1 or cfg.size < 32:
        raise ValueError(f"demo corpus needs n >= 1 and size >= 32, got n={cfg.n} size={cfg.size}")
    root = Path(out_dir)
    images_dir = root / "images"
    ann = root / "annotations.csv"
    done = root / "demo.json"
    pending = root / "demo.pending.json"
    corpus = DemoCorpus(root=root, images_dir=images_dir, annotations=ann, n=cfg.n)
    names = [image_name(i) for i in range(cfg.n)]

    state = None
    if done.exists():
        try:
            state = json.loads(done.read_text())
        except (OSError, ValueError):
            state = None
    if (
        state is not None
        and state.get("n") == cfg.n
        and all(state.get(k) == v for k, v in _identity(cfg).items())
        and ann.exists()
        and all((images_dir / nm).exists() for nm in names)
    ):
        return corpus

    # Existing images are reusable only if drawn with the same seed, size and generator.
    reusable = False
    for marker in (done, pending):
        try:
            old = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        reusable = all(old.get(k) == v for k, v in _identity(cfg).items())
        break
    root.mkdir(parents=True, exist_ok=True)
    images_dir.mkdir(exist_ok=True)
    if done.exists():
        done.unlink()
    _atomic_write_bytes(pending, json.dumps(_identity(cfg) | {"n": cfg.n}).encode())

    # Drop images that do not belong to this corpus (other n, stale temp files).
    wanted = set(names)
    for p in images_dir.iterdir():
        if p.name.startswith("demo_") and (p.name not in wanted or ".tmp" in p.name):
            p.unlink()

    specs = [_sample_spec(cfg.seed, i, cfg.size) for i in range(cfg.n)]
    todo = [i for i in range(cfg.n) if not (reusable and (images_dir / names[i]).exists())]
    bboxes: dict[int, tuple] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.n, desc="demo corpus", unit="img")
        bar.update(cfg.n - len(todo))
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    chunks = [todo[k : k + 64] for k in range(0, len(todo), 64)]
    if workers > 1 and len(todo) >= 256 and "fork" in mp.get_all_start_methods():
        with mp.get_context("fork").Pool(workers) as pool:
            for part in pool.imap_unordered(_write_chunk, [(cfg.seed, cfg.size, str(images_dir), c) for c in chunks]):
                bboxes.update(part)
                if bar is not None:
                    bar.update(len(part))
    else:
        for c in chunks:
            part = _write_chunk((cfg.seed, cfg.size, str(images_dir), c))
            bboxes.update(part)
            if bar is not None:
                bar.update(len(part))
    if bar is not None:
        bar.close()
    rows = [
        _row(spec, bboxes[spec["i"]] if spec["i"] in bboxes else demo_person_bbox(spec)) for spec in specs
    ]

    df = pd.DataFrame(rows)
    tmp = ann.with_name(ann.name + f".tmp{os.getpid()}")
    df.to_csv(tmp, index=False)
    os.replace(tmp, ann)
    counts = {lab: int(df[lab].sum()) for lab in DEMO_LABELS}
    meta = dict(asdict(cfg)) | _identity(cfg) | {
        "labels": DEMO_LABELS,
        "label_counts": counts,
        "text_prompts": DEMO_TEXT_PROMPTS,
        "annotations": ann.name,
        "images": images_dir.name,
    }
    _atomic_write_bytes(done, json.dumps(meta, indent=2).encode())
    pending.unlink(missing_ok=True)
    return corpus
