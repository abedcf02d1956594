"""``saefe saliency``: SmoothGrad heat map of a feature (or a label / expression mix) on an image.

Seed semantics: for ``n`` noisy copies of the preprocessed pixel tensor ``x``
(noise = sigma * std(x) * N(0, I)), take |d score / d pixels| averaged over the colour channels,
where score = cosine(image embedding, direction); the heat map is the mean over the copies,
scaled to [0, 1] by its maximum. ``direction`` is the SAE decoder column of a feature, or the
normalised mix direction of a label / expression (``Engine.direction(Engine.mix(term))``).

Python API (the Gradio app uses it)::

    heat = smoothgrad(encoder, image, direction, n=16, sigma=0.15)   # (H, W) float32 in [0, 1]
    overlay(image, heat, alpha=0.5).save("heat.png")
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import numpy as np

from saefe.errors import IncompatibleError, SaefeError, SteeringError

log = logging.getLogger(__name__)

DEFAULT_N = 16
DEFAULT_SIGMA = 0.15
DEFAULT_CMAP = "jet"


def _check_params(n, sigma, batch) -> tuple[int, float, int]:
    try:
        n_i = int(n)
        ok = float(n) == n_i
    except (TypeError, ValueError):
        ok = False
    if not ok or n_i < 1:
        raise SaefeError(f"number of noisy samples n must be an integer >= 1, got {n!r}")
    try:
        s = float(sigma)
    except (TypeError, ValueError):
        raise SaefeError(f"noise level sigma must be a number >= 0, got {sigma!r}") from None
    if not math.isfinite(s) or s < 0:
        raise SaefeError(f"noise level sigma must be a finite number >= 0, got {sigma!r}")
    try:
        b = int(batch)
    except (TypeError, ValueError):
        b = 0
    if b < 1:
        raise SaefeError(f"batch must be an integer >= 1, got {batch!r}")
    return n_i, s, b


def _check_direction(direction, dim: int) -> np.ndarray:
    d = np.asarray(direction, dtype=np.float64).reshape(-1)
    if d.shape[0] != dim:
        raise IncompatibleError(f"saliency direction has dimension {d.shape[0]}, the encoder's embeddings have {dim}")
    if not np.isfinite(d).all():
        raise SteeringError("saliency direction contains NaN or infinity")
    norm = float(np.linalg.norm(d))
    if norm < 1e-12:
        raise SteeringError("saliency direction is a zero vector")
    return (d / norm).astype(np.float32)


def _as_rgb(image):
    from PIL import Image

    from saefe.ingest.images import to_rgb

    if not isinstance(image, Image.Image):
        raise SaefeError(f"saliency needs a PIL image, got {type(image).__name__}")
    return to_rgb(image)


def smoothgrad(
    encoder,
    image,
    direction: np.ndarray,
    n: int = DEFAULT_N,
    sigma: float = DEFAULT_SIGMA,
    progress: Callable[[int, int], None] | None = None,
    batch: int = 8,
    seed: int | None = 0,
) -> np.ndarray:
    """SmoothGrad saliency of cosine(embedding, direction): (H, W) float32 in [0, 1] at the
    model's input resolution (H, W = the preprocessed pixel tensor's size).

    ``encoder`` is a local :class:`saefe.ingest.encoder.SiglipEncoder` (``preprocess`` and a
    differentiable ``image_features``); a remote clip_server cannot give gradients.
    ``progress(i, n)`` is called after each batch with the number of copies done.
    ``seed`` makes the noise reproducible (None: fresh noise each call).
    """
    import torch

    n, sigma, batch = _check_params(n, sigma, batch)
    if not (hasattr(encoder, "preprocess") and hasattr(encoder, "image_features")):
        raise SaefeError("saliency needs a local encoder (gradients do not pass through a remote clip_server)")
    image = _as_rgb(image)
    d = _check_direction(direction, int(encoder.info.embedding_dim))

    with torch.enable_grad():
        x = encoder.preprocess([image]).detach()  # (1, C, H, W), on the model's device/dtype
        xf = x.float()
        std = float(xf.std())
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(int(seed))
        else:
            gen.seed()
        dirt = torch.from_numpy(d).to(x.device)
        acc = torch.zeros(x.shape[-2:], dtype=torch.float64)
        done = 0
        params = list(encoder.model.parameters()) if hasattr(encoder, "model") else []
        saved = [p.requires_grad for p in params]
        for p in params:  # no parameter gradients: only d score / d pixels is needed
            p.requires_grad_(False)
        try:
            while done < n:
                b = min(batch, n - done)
                noise = torch.randn((b, *x.shape[1:]), generator=gen, dtype=torch.float32) * (sigma * std)
                xb = (xf + noise.to(x.device)).to(x.dtype).requires_grad_(True)
                feats = encoder.image_features(xb).float()
                score = torch.nn.functional.cosine_similarity(feats, dirt[None, :], dim=-1)
                (grad,) = torch.autograd.grad(score.sum(), xb)
                acc += grad.float().abs().mean(dim=1).sum(dim=0).double().cpu()
                done += b
                if progress is not None:
                    progress(done, n)
        finally:
            for p, r in zip(params, saved):
                p.requires_grad_(r)
    heat = (acc / n).numpy()
    if not np.isfinite(heat).all():
        raise SaefeError("saliency produced non-finite gradients")
    top = float(heat.max())
    heat = heat / top if top > 0 else np.zeros_like(heat)
    return heat.astype(np.float32)


def overlay(image, heat: np.ndarray, alpha: float = 0.5, cmap: str = DEFAULT_CMAP):
    """The heat map upsampled (bilinear) to the image's size, coloured with a matplotlib colormap
    and blended over the image: out = (1 - alpha) * image + alpha * colour. Returns RGB PIL."""
    from PIL import Image
    from matplotlib import colormaps

    image = _as_rgb(image)
    heat = np.asarray(heat, dtype=np.float32)
    if heat.ndim != 2 or heat.size == 0:
        raise SaefeError(f"heat map must be a 2-D array, got shape {heat.shape}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise SaefeError(f"alpha must be within [0, 1], got {alpha}")
    try:
        cm = colormaps[cmap]
    except KeyError:
        raise SaefeError(f"unknown matplotlib colormap {cmap!r}") from None
    h = np.nan_to_num(np.clip(heat, 0.0, 1.0))
    up = np.asarray(Image.fromarray(h, mode="F").resize(image.size, Image.BILINEAR), dtype=np.float32)
    colour = cm(np.clip(up, 0.0, 1.0))[..., :3] * 255.0
    base = np.asarray(image, dtype=np.float32)
    out = (1.0 - alpha) * base + alpha * colour
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")


# -- CLI ----------------------------------------------------------------------------------


def load_image(path: str | Path):
    """Read and decode an image file; SaefeError (not a traceback) when it is unusable."""
    from saefe.ingest.images import BadImage, decode_image

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SaefeError(f"cannot read image {path}: {e.strerror or type(e).__name__}") from None
    try:
        return decode_image(data)
    except BadImage as e:
        raise SaefeError(f"cannot use image {path}: {e}") from None
