"""Drawing the demo's cartoon people: background mood scene, figure, face.

Split from corpus.py (which samples each image's spec and writes the corpus) so each stays
readable; everything here is a pure function of a spec dict, deterministic through the RNG
streams seeded by ``(seed, i)`` that it opens itself.
"""

from __future__ import annotations

import math

import numpy as np


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
_HEAD = {"Kid": 0.25, "Teenager": 0.17, "Adult": 0.135}       # head diameter / figure height
_CLOTHES = [
    (200, 60, 60), (60, 90, 190), (60, 150, 80), (230, 200, 70), (140, 80, 170),
    (240, 140, 50), (50, 170, 180), (230, 230, 230), (60, 60, 60), (170, 120, 80),
]



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
