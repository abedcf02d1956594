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
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

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
    "Male": "a photo of a man",
    "Female": "a photo of a woman",
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

# Mood lighting: sky (top) and ground (bottom) colours per emotion.
_PALETTE = {
    "Happiness": ((255, 214, 92), (250, 160, 50)),
    "Sadness": ((100, 115, 145), (62, 72, 98)),
    "Anger": ((205, 42, 30), (130, 24, 16)),
    "Fear": ((62, 40, 92), (30, 72, 56)),
    "Surprise": ((110, 222, 245), (250, 248, 196)),
    "Peace": ((176, 224, 236), (110, 188, 112)),
    "Esteem": ((36, 36, 112), (90, 60, 130)),
    "Excitement": ((242, 76, 200), (255, 150, 70)),
}
# Arms: (upper, lower) angle in degrees from straight down, positive = outward.
_ARMS = {
    "Happiness": ((25, 35), (130, 165)),   # one arm waving
    "Sadness": ((4, 0), (4, 0)),           # hanging
    "Anger": ((55, -75), (150, 175)),      # hand on hip, fist raised
    "Fear": ((35, 165), (35, 165)),        # hands up to the face
    "Surprise": ((130, 150), (130, 150)),  # hands up beside the head
    "Peace": ((10, -25), (10, -25)),       # hands folded in front
    "Esteem": ((55, -75), (55, -75)),      # hands on hips
    "Excitement": ((160, 172), (160, 172)),  # both arms high
}
_HEIGHT = {"Kid": 0.48, "Teenager": 0.68, "Adult": 0.9}      # fraction of the image height
_HEAD = {"Kid": 0.25, "Teenager": 0.17, "Adult": 0.135}       # head diameter / figure height
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
_CLOTHES = [
    (200, 60, 60), (60, 90, 190), (60, 150, 80), (230, 200, 70), (140, 80, 170),
    (240, 140, 50), (50, 170, 180), (230, 230, 230), (60, 60, 60), (170, 120, 80),
]


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


# --------------------------------------------------------------------------- drawing


def _mix(a, b, t: float):
    return tuple(int(round(x * (1 - t) + y * t)) for x, y in zip(a, b))


def _clip3(c):
    return tuple(int(min(255, max(0, v))) for v in c)


def _background(spec: dict):
    from PIL import Image, ImageDraw

    S = spec["size"]
    e = spec["emotion"]
    top, bot = _PALETTE[e]
    g, j = spec["bg_gain"], spec["bg_jitter"]
    top = _clip3([c * g + d for c, d in zip(top, j)])
    bot = _clip3([c * g + d for c, d in zip(bot, j)])
    t = np.linspace(0.0, 1.0, S, dtype=np.float32)[:, None, None]
    horizon = 0.62
    grad = np.where(
        t < horizon,
        np.array(top, np.float32) * (1 - t / horizon) + _mix(top, bot, 0.5) * (t / horizon),
        np.array(bot, np.float32),
    )
    arr = np.broadcast_to(grad, (S, S, 3)).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(arr), "RGB")
    d = ImageDraw.Draw(img)

    # Clutter: buildings, trees, balls, windows in colours drawn from the scene.
    for kind, a, b, c, w, h, col in spec["clutter"]:
        base = _CLOTHES[int(col * len(_CLOTHES)) % len(_CLOTHES)]
        fill = _mix(base, bot if b > 0.5 else top, 0.78)
        x0, y0 = a * S, S * (0.15 + 0.5 * b)
        ww, hh = S * (0.08 + 0.2 * w), S * (0.08 + 0.25 * h)
        if kind == 0:  # building / box
            d.rectangle([x0, y0, x0 + ww, y0 + hh], fill=fill)
        elif kind == 1:  # tree
            d.rectangle([x0 + ww * 0.42, y0 + hh * 0.6, x0 + ww * 0.58, y0 + hh], fill=_mix(fill, (60, 40, 20), 0.5))
            d.polygon([(x0, y0 + hh * 0.7), (x0 + ww / 2, y0), (x0 + ww, y0 + hh * 0.7)], fill=_mix(fill, (40, 120, 40), 0.4))
        elif kind == 2:  # ball / bush
            d.ellipse([x0, y0, x0 + ww * 0.7, y0 + ww * 0.7], fill=fill)
        else:  # window / picture frame
            d.rectangle([x0, y0, x0 + ww * 0.8, y0 + hh * 0.6], outline=fill, width=max(1, S // 64))

    # Scene cues that go with the mood.
    rng = np.random.default_rng([spec["seed"], spec["i"], 7])
    u = S / 128.0
    if e == "Happiness":  # sun
        sx, sy = S * rng.uniform(0.05, 0.95), S * rng.uniform(0.06, 0.2)
        d.ellipse([sx - 11 * u, sy - 11 * u, sx + 11 * u, sy + 11 * u], fill=(255, 245, 150))
    elif e == "Sadness":  # rain
        for _ in range(40):
            x, y = rng.uniform(0, S), rng.uniform(0, S)
            d.line([x, y, x - 2 * u, y + 7 * u], fill=(150, 170, 210), width=1)
    elif e == "Anger":  # jagged cracks
        for _ in range(3):
            x, y = rng.uniform(0, S), rng.uniform(0, S * 0.5)
            pts = [(x, y)]
            for _ in range(4):
                x, y = x + rng.uniform(-9, 9) * u, y + rng.uniform(4, 10) * u
                pts.append((x, y))
            d.line(pts, fill=(255, 200, 60), width=max(1, int(2 * u)))
    elif e == "Fear":  # glowing eyes in the dark
        for _ in range(int(rng.integers(2, 5))):
            x, y = rng.uniform(0, S), rng.uniform(0, S * 0.55)
            for dx in (-3 * u, 3 * u):
                d.ellipse([x + dx - 1.5 * u, y - 1.5 * u, x + dx + 1.5 * u, y + 1.5 * u], fill=(220, 240, 90))
    elif e == "Surprise":  # burst of rays
        bx, by = spec["cx"], spec["ground"] - spec["height"] * 0.85
        for k in range(16):
            a = 2 * math.pi * k / 16 + rng.uniform(0, 0.2)
            d.line([bx, by, bx + math.cos(a) * S, by + math.sin(a) * S], fill=(255, 255, 255), width=max(1, int(3 * u)))
    elif e == "Peace":  # soft clouds and flowers
        for _ in range(3):
            x, y = rng.uniform(0, S), rng.uniform(0, S * 0.35)
            d.ellipse([x - 12 * u, y - 4 * u, x + 12 * u, y + 4 * u], fill=(245, 250, 255))
        for _ in range(8):
            x, y = rng.uniform(0, S), rng.uniform(S * 0.7, S)
            d.ellipse([x - 2 * u, y - 2 * u, x + 2 * u, y + 2 * u], fill=(250, 240, 250))
    elif e == "Esteem":  # spotlight and podium
        cx, gy = spec["cx"], spec["ground"]
        d.polygon([(cx - 6 * u, 0), (cx + 6 * u, 0), (cx + 34 * u, gy), (cx - 34 * u, gy)], fill=(200, 170, 80))
        d.rectangle([cx - 26 * u, gy - 4 * u, cx + 26 * u, S], fill=(215, 185, 70))
    elif e == "Excitement":  # confetti
        for _ in range(45):
            x, y = rng.uniform(0, S), rng.uniform(0, S)
            c = _CLOTHES[int(rng.integers(len(_CLOTHES)))]
            d.rectangle([x, y, x + 2 * u, y + 2 * u], fill=c)
    return img


def _arm_points(sx, sy, side, angles, l1, l2):
    a1, a2 = (math.radians(a) for a in angles)
    ex, ey = sx + side * math.sin(a1) * l1, sy + math.cos(a1) * l1
    hx, hy = ex + side * math.sin(a2) * l2, ey + math.cos(a2) * l2
    return (sx, sy), (ex, ey), (hx, hy)


def _person_layer(spec: dict):
    """The person on a transparent layer (its alpha gives the bounding box)."""
    from PIL import Image, ImageDraw

    S = spec["size"]
    layer = Image.new("RGBA", (S, S), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    e, gender, age = spec["emotion"], spec["gender"], spec["age"]
    H, cx = spec["height"], spec["cx"]
    feet = spec["ground"] - spec["lift"]
    top_y = feet - H
    head_d = _HEAD[age] * H
    r = head_d / 2
    wscale = spec["width"]
    skin = spec["skin"]
    if e == "Anger":
        skin = _mix(skin, (230, 60, 50), 0.35)
    elif e == "Fear":
        skin = _mix(skin, (200, 220, 200), 0.3)
    hair = (200, 200, 205) if spec["grey"] else spec["hair"]
    top_c, bot_c = spec["top"], spec["bottom"]
    if age == "Adult":
        bot_c = _mix(top_c, (0, 0, 0), 0.15)
    female = gender == "Female"
    W = lambda v: max(1, int(round(v)))  # noqa: E731

    # Head position: bowed when sad or scared, chin up when proud.
    hx, hy = cx, top_y + r
    if e == "Sadness":
        hy += r * 0.35
    body_top = top_y + head_d
    rest = feet - body_top
    torso = rest * 0.46
    legs = rest - torso
    sh_y = body_top + rest * 0.04
    sh_w = H * (0.17 if age != "Kid" else 0.2) * wscale
    if e == "Esteem":
        sh_w *= 1.15
    if e == "Sadness":
        sh_y += r * 0.25
    hip_y = body_top + torso
    hip_w = sh_w * (0.85 if not female else 0.8)

    # Long hair behind the head, falling past the shoulders.
    if female:
        d.polygon([
            (hx - r * 1.3, hy - r * 0.2), (hx + r * 1.3, hy - r * 0.2),
            (hx + r * 1.7, hy + r * 3.4), (hx - r * 1.7, hy + r * 3.4),
        ], fill=hair)
        d.ellipse([hx - r * 1.35, hy - r * 1.3, hx + r * 1.35, hy + r * 0.8], fill=hair)

    # Legs: bare for kids' shorts and skirts/dresses, trousers (suit / jeans) otherwise.
    leg_w = W(H * 0.075)
    knee_bend = legs * (0.15 if e == "Fear" else 0.0)
    bare = female or age == "Kid"
    for side in (-1, 1):
        x0 = cx + side * hip_w * 0.45
        x1 = cx + side * hip_w * (0.55 if e != "Excitement" else 0.9)
        kx = (x0 + x1) / 2 + side * knee_bend
        d.line([(x0, hip_y), (kx, hip_y + legs * 0.5), (x1, feet)], fill=skin if bare else bot_c, width=leg_w, joint="curve")
        d.ellipse([x1 - leg_w, feet - leg_w * 0.7, x1 + leg_w * 1.0, feet + leg_w * 0.3], fill=(40, 30, 30))
    if age == "Kid" and not female:  # shorts
        d.rectangle([cx - hip_w, hip_y - torso * 0.08, cx + hip_w, hip_y + legs * 0.38], fill=bot_c)

    # Torso and lower garment.
    d.polygon([(cx - sh_w, sh_y), (cx + sh_w, sh_y), (cx + hip_w, hip_y), (cx - hip_w, hip_y)], fill=top_c)
    if female:  # dress (adult) or skirt
        flare = sh_w * (1.65 if age != "Kid" else 1.35)
        skirt_c = top_c if age == "Adult" else bot_c
        d.polygon([
            (cx - hip_w * 0.95, hip_y - torso * 0.35), (cx + hip_w * 0.95, hip_y - torso * 0.35),
            (cx + flare, hip_y + legs * 0.6), (cx - flare, hip_y + legs * 0.6),
        ], fill=skirt_c)
        # hair over the shoulders, in front
        for s in (-1, 1):
            d.polygon([
                (hx + s * r * 0.75, hy + r * 0.3), (hx + s * r * 1.4, hy + r * 0.3),
                (hx + s * r * 1.5, sh_y + torso * 0.45), (hx + s * r * 0.9, sh_y + torso * 0.45),
            ], fill=hair)
    else:
        d.line([(cx - hip_w, hip_y - torso * 0.02), (cx + hip_w, hip_y - torso * 0.02)], fill=(40, 30, 20), width=W(H * 0.012))
    if age == "Adult" and not female:  # suit: white shirt and tie
        d.polygon([(cx - sh_w * 0.35, sh_y), (cx + sh_w * 0.35, sh_y), (cx, sh_y + torso * 0.5)], fill=(245, 245, 245))
        d.polygon([(cx - sh_w * 0.08, sh_y), (cx + sh_w * 0.08, sh_y), (cx + sh_w * 0.1, sh_y + torso * 0.45), (cx, sh_y + torso * 0.52), (cx - sh_w * 0.1, sh_y + torso * 0.45)], fill=spec["tie"])
    elif age == "Teenager":  # hoodie: hood behind the neck, pocket
        d.ellipse([cx - sh_w * 0.6, sh_y - r * 0.45, cx + sh_w * 0.6, sh_y + r * 0.45], fill=_mix(top_c, (0, 0, 0), 0.25))
        d.rectangle([cx - hip_w * 0.6, hip_y - torso * 0.3, cx + hip_w * 0.6, hip_y - torso * 0.05], fill=_mix(top_c, (0, 0, 0), 0.15))
        lx, ly, lr = cx, sh_y + torso * 0.38, sh_w * 0.42  # graphic print
        d.ellipse([lx - lr, ly - lr, lx + lr, ly + lr], fill=(250, 250, 250))
        d.ellipse([lx - lr * 0.5, ly - lr * 0.5, lx + lr * 0.5, ly + lr * 0.5], fill=(20, 20, 20))
    elif age == "Kid":  # striped T-shirt
        step = max(3.0, torso / 5)
        y = sh_y + step * 0.5
        while y < hip_y - 1:
            d.rectangle([cx - sh_w, y, cx + sh_w, y + step * 0.45], fill=(255, 255, 255))
            y += step
    if female and age == "Adult":  # necklace
        d.arc([cx - sh_w * 0.4, sh_y - torso * 0.2, cx + sh_w * 0.4, sh_y + torso * 0.25], 20, 160, fill=(250, 225, 120), width=W(H * 0.012))
    if e == "Esteem":  # medal
        mx, my = cx, sh_y + torso * 0.38
        d.line([(cx - sh_w * 0.5, sh_y), (mx, my), (cx + sh_w * 0.5, sh_y)], fill=(200, 30, 30), width=W(H * 0.015))
        d.ellipse([mx - r * 0.35, my - r * 0.35, mx + r * 0.35, my + r * 0.35], fill=(255, 215, 0))

    # Arms (mirror-symmetric angle convention).
    l1, l2 = H * 0.17, H * 0.16
    arm_w = W(H * 0.065)
    for side, angles in zip((-1, 1), _ARMS[e]):
        sx = cx + side * sh_w * 0.92
        p0, p1, p2 = _arm_points(sx, sh_y + arm_w * 0.5, side, angles, l1, l2)
        d.line([p0, p1, p2], fill=top_c, width=arm_w, joint="curve")
        d.line([_mix_pt(p1, p2, 0.55), p2], fill=skin, width=arm_w)
        hr = arm_w * 0.75
        d.ellipse([p2[0] - hr, p2[1] - hr, p2[0] + hr, p2[1] + hr], fill=skin)

    # Neck and head.
    d.rectangle([cx - r * 0.3, hy + r * 0.7, cx + r * 0.3, sh_y + 1], fill=skin)
    d.ellipse([hx - r, hy - r, hx + r, hy + r], fill=skin)
    if female:  # fringe
        d.chord([hx - r * 1.05, hy - r * 1.1, hx + r * 1.05, hy + r * 0.5], 180, 360, fill=hair)
    else:  # short hair cap
        d.chord([hx - r * 1.05, hy - r * 1.12, hx + r * 1.05, hy + r * 0.35], 180, 360, fill=hair)
    if spec["beard"]:
        d.chord([hx - r * 0.95, hy - r * 0.35, hx + r * 0.95, hy + r * 1.2], 0, 180, fill=hair)

    _face(d, e, hx, hy, r, spec["beard"])
    return layer


def _mix_pt(a, b, t):
    return (a[0] * (1 - t) + b[0] * t, a[1] * (1 - t) + b[1] * t)


def _face(d, e, hx, hy, r, beard):
    ink = (30, 20, 20)
    lw = max(1, int(round(r * 0.14)))
    ex, ey, er = r * 0.38, hy - r * 0.05, r * 0.14
    my = hy + r * 0.45
    mw = r * 0.42
    if beard:
        my -= r * 0.05
    # Eyes.
    for s in (-1, 1):
        x = hx + s * ex
        if e in ("Fear", "Surprise"):
            d.ellipse([x - er * 1.7, ey - er * 1.7, x + er * 1.7, ey + er * 1.7], fill=(255, 255, 255))
            d.ellipse([x - er * 0.6, ey - er * 0.6, x + er * 0.6, ey + er * 0.6], fill=ink)
        elif e in ("Peace", "Happiness"):
            d.arc([x - er * 1.4, ey - er * 1.2, x + er * 1.4, ey + er * 1.2], 200, 340, fill=ink, width=lw)
        elif e == "Esteem":
            d.chord([x - er * 1.3, ey - er * 1.3, x + er * 1.3, ey + er * 1.3], 0, 180, fill=ink)
        else:
            d.ellipse([x - er, ey - er, x + er, ey + er], fill=ink)
    # Eyebrows.
    by = ey - r * 0.32
    for s in (-1, 1):
        xi, xo = hx + s * r * 0.15, hx + s * r * 0.6
        if e == "Anger":
            d.line([(xi, by + r * 0.12), (xo, by - r * 0.1)], fill=ink, width=lw + 1)
        elif e in ("Sadness", "Fear"):
            d.line([(xi, by - r * 0.12), (xo, by + r * 0.06)], fill=ink, width=lw)
        elif e == "Surprise":
            d.arc([xo - r * 0.2 if s < 0 else xi, by - r * 0.3, xi if s < 0 else xo + r * 0.2, by + r * 0.05], 200, 340, fill=ink, width=lw)
        elif e == "Esteem":
            d.line([(xi, by - r * 0.02), (xo, by - r * 0.1)], fill=ink, width=lw)
    # Mouth.
    if e in ("Happiness", "Peace"):
        d.arc([hx - mw, my - r * 0.3, hx + mw, my + r * 0.15], 20, 160, fill=ink, width=lw)
    elif e == "Excitement":
        d.chord([hx - mw * 1.1, my - r * 0.25, hx + mw * 1.1, my + r * 0.3], 0, 180, fill=(140, 20, 30))
    elif e == "Esteem":
        d.arc([hx - mw, my - r * 0.35, hx + mw * 1.1, my + r * 0.05], 20, 120, fill=ink, width=lw)
    elif e == "Sadness":
        d.arc([hx - mw, my, hx + mw, my + r * 0.35], 200, 340, fill=ink, width=lw)
    elif e == "Anger":
        d.rectangle([hx - mw, my - r * 0.06, hx + mw, my + r * 0.1], fill=(250, 250, 250), outline=ink)
    elif e == "Surprise":
        d.ellipse([hx - r * 0.17, my - r * 0.22, hx + r * 0.17, my + r * 0.25], fill=(90, 20, 30))
    elif e == "Fear":
        pts = [(hx - mw + k * mw / 3, my + (r * 0.06 if k % 2 else -r * 0.06)) for k in range(7)]
        d.line(pts, fill=ink, width=lw)
    # Tears, blush, sweat.
    if e == "Sadness":
        for s in (-1, 1):
            x = hx + s * ex
            d.ellipse([x - er * 0.8, ey + er * 1.5, x + er * 0.8, ey + er * 3.8], fill=(90, 160, 255))
    if e in ("Happiness", "Excitement"):
        for s in (-1, 1):
            x = hx + s * r * 0.62
            d.ellipse([x - r * 0.17, my - r * 0.25, x + r * 0.17, my - r * 0.08], fill=(250, 130, 150))
    if e == "Fear":
        d.ellipse([hx + r * 0.75, hy - r * 0.6, hx + r * 0.95, hy - r * 0.25], fill=(170, 210, 255))


def render_demo_image(spec: dict):
    """(PIL RGB image, person bounding box (x_min, y_min, x_max, y_max)) for one spec."""
    from PIL import Image, ImageFilter

    S = spec["size"]
    img = _background(spec).convert("RGBA")
    layer = _person_layer(spec)
    bbox = _bbox(layer, spec)
    img.alpha_composite(layer)
    img = img.convert("RGB")
    if spec["blur"] > 0:
        img = img.filter(ImageFilter.GaussianBlur(spec["blur"] * S / 128.0))
    if spec["flip"]:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    rng = np.random.default_rng([spec["seed"], spec["i"], 1])
    arr = np.asarray(img, np.float32) + rng.normal(0, spec["noise"], (S, S, 3)).astype(np.float32)
    img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    return img, bbox


def _bbox(layer, spec):
    S = spec["size"]
    x0, y0, x1, y1 = layer.getchannel("A").getbbox() or (0, 0, S, S)
    if spec["flip"]:
        x0, x1 = S - x1, S - x0
    return int(x0), int(y0), int(x1) - 1, int(y1) - 1


def demo_person_bbox(spec: dict) -> tuple[int, int, int, int]:
    return _bbox(_person_layer(spec), spec)


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
