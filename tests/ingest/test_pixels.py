"""The split pre-processing (uint8 resize on the CPU, affine on the device) equals the processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import SiglipImageProcessor

from saefe.ingest.pixels import PixelPlan


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (int(rng.integers(20, 90)), int(rng.integers(20, 90)), 3),
                                         dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("kw", [dict(), dict(image_mean=[0.48, 0.45, 0.4], image_std=[0.26, 0.26, 0.27]),
                                dict(do_normalize=False), dict(resample=2)])
def test_plan_reproduces_the_processor(kw):
    proc = SiglipImageProcessor(size={"height": 32, "width": 40}, **kw)
    plan = PixelPlan.from_processor(proc)
    assert plan is not None
    imgs = _images(5)
    want = proc(images=imgs, return_tensors="pt")["pixel_values"]
    u8 = plan.resize(imgs)
    assert u8.dtype == torch.uint8 and u8.shape == (5, 3, 32, 40)
    torch.testing.assert_close(plan.finish(u8, torch.float32), want, atol=1e-5, rtol=0)


def test_plan_declines_what_it_cannot_reproduce():
    class Crop:
        do_resize, size, do_center_crop = True, {"height": 8, "width": 8}, True

    class Shortest:
        do_resize, size = True, {"shortest_edge": 224}

    assert PixelPlan.from_processor(Crop()) is None
    assert PixelPlan.from_processor(Shortest()) is None
    assert PixelPlan.from_processor(object()) is None


def test_encoder_embeds_the_same_through_either_path(demo_encoder):
    enc = demo_encoder
    imgs = _images(6)
    assert enc.pixel_plan is not None and enc.preprocess_cpu(imgs).dtype == torch.uint8
    fast = enc.embed_images(imgs)
    slow = enc.embed_pixels(enc.image_processor(images=imgs, return_tensors="pt")["pixel_values"])
    np.testing.assert_allclose(fast, slow, atol=1e-5)


def test_the_model_gets_channels_last_pixels_whatever_the_loader_made(demo_encoder):
    """encoder.model_layout: the tower always sees channels-last memory (cuDNN's fast layout for the
    patch convolution), so contiguous and channels-last uint8 give the same vectors bit for bit,
    and the layout changes no value (equal to a plain NCHW pass up to float rounding)."""
    from saefe.ingest.encoder import l2_normalise

    enc = demo_encoder
    imgs = _images(5)
    view = enc.preprocess_cpu(imgs)  # the thread loader's (n, 3, H, W) view of HWC memory
    assert view.is_contiguous(memory_format=torch.channels_last)
    assert enc.preprocess(imgs).is_contiguous(memory_format=torch.channels_last)
    a = enc.embed_pixels(view)
    b = enc.embed_pixels(view.contiguous())
    assert np.array_equal(a, b)
    with torch.inference_mode():
        plain = enc.image_features(enc.pixel_plan.finish(view.contiguous(), torch.float32).contiguous()).numpy()
    np.testing.assert_allclose(a, l2_normalise(plain), atol=1e-5)
