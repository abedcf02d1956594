"""Training images for the demo model, drawn in memory by the demo generator.

Images come from ``_sample_spec(seed, i)`` + ``render_demo_image`` (the very code that writes the
demo corpus) with seeds of their own (10_000 and up by default), so the model never sees the
default demo corpus (seed 0) or the benchmark's held-out one. Each is resized by the same
SiglipImageProcessor that inference uses (rescale/normalise left out, so the pixels stay uint8:
a quarter of the memory) and kept with its planted labels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from saefe.demo.corpus import DEMO_AGES, DEMO_EMOTIONS, DEMO_GENDERS, DemoConfig, _sample_spec
from saefe.demo.render import render_demo_image


@dataclass
class LabelledImages:
    """``pixels``: (n, 3, S, S) uint8 as the processor resizes them; labels as indices into
    DEMO_EMOTIONS / DEMO_GENDERS / DEMO_AGES."""

    pixels: np.ndarray
    emotion: np.ndarray
    gender: np.ndarray
    age: np.ndarray
    seed: int

    def __len__(self) -> int:
        return len(self.emotion)


def to_model_input(pixels_u8) -> "torch.Tensor":  # noqa: F821
    """uint8 pixels -> the processor's normalised float input ((x / 255 - 0.5) / 0.5)."""
    import torch

    return torch.as_tensor(pixels_u8).float().mul_(2.0 / 255.0).sub_(1.0)


def _render_chunk(args) -> tuple[np.ndarray, np.ndarray]:
    seed, size, image_size, indices = args
    from saefe.demo.tiny_model import TinySiglipConfig, image_processor

    proc = image_processor(TinySiglipConfig(image_size=image_size))
    images, labels = [], []
    for i in indices:
        spec = _sample_spec(seed, int(i), size)
        img, _ = render_demo_image(spec)
        images.append(img)
        labels.append((DEMO_EMOTIONS.index(spec["emotion"]), DEMO_GENDERS.index(spec["gender"]),
                       DEMO_AGES.index(spec["age"])))
    px = proc(images=images, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"]
    return np.rint(px).astype(np.uint8), np.asarray(labels, dtype=np.int64)


def render_images(seed: int, n: int, image_size: int, corpus_size: int = DemoConfig.size,
                  workers: int | None = None, progress: bool = True) -> LabelledImages:
    """Draw demo images ``0..n-1`` of ``seed`` (processes in parallel when fork is available)."""
    import multiprocessing as mp

    chunks = [list(range(k, min(n, k + 250))) for k in range(0, n, 250)]
    jobs = [(seed, corpus_size, image_size, c) for c in chunks]
    workers = workers if workers is not None else min(os.cpu_count() or 1, 4)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"drawing images (seed {seed})", unit="img")
    parts = []
    if workers > 1 and len(chunks) > 1 and "fork" in mp.get_all_start_methods():
        with mp.get_context("fork").Pool(workers) as pool:
            for part in pool.imap(_render_chunk, jobs):  # imap keeps the order: deterministic
                parts.append(part)
                if bar is not None:
                    bar.update(len(part[1]))
    else:
        for job in jobs:
            parts.append(_render_chunk(job))
            if bar is not None:
                bar.update(len(parts[-1][1]))
    if bar is not None:
        bar.close()
    px = np.concatenate([p[0] for p in parts])
    lab = np.concatenate([p[1] for p in parts])
    return LabelledImages(px, lab[:, 0].copy(), lab[:, 1].copy(), lab[:, 2].copy(), seed)
