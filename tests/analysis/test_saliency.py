"""SmoothGrad saliency: shape/range, determinism, dependence on the direction, bad inputs, CLI."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from saefe.errors import IncompatibleError, SaefeError, SteeringError
from saefe.analysis.saliency import overlay, smoothgrad


@pytest.fixture(scope="module")
def image():
    img = Image.new("RGB", (96, 80), (200, 220, 240))
    d = ImageDraw.Draw(img)
    d.ellipse((30, 10, 60, 40), fill=(240, 200, 160))
    d.rectangle((25, 40, 65, 78), fill=(40, 60, 160))
    return img


def _dirs(encoder, n=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, encoder.info.embedding_dim)).astype(np.float32)


def test_shape_range_and_progress(demo_encoder, image):
    calls = []
    heat = smoothgrad(demo_encoder, image, _dirs(demo_encoder)[0], n=5, sigma=0.1, batch=2,
                      progress=lambda i, n: calls.append((i, n)))
    h, w = demo_encoder.info.image_size
    assert heat.shape == (h, w) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    assert calls == [(2, 5), (4, 5), (5, 5)]


def test_deterministic_with_seed(demo_encoder, image):
    d = _dirs(demo_encoder)[0]
    a = smoothgrad(demo_encoder, image, d, n=4, seed=3)
    b = smoothgrad(demo_encoder, image, d, n=4, seed=3)
    c = smoothgrad(demo_encoder, image, d, n=4, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # batch size does not change the result beyond float noise
    np.testing.assert_allclose(a, smoothgrad(demo_encoder, image, d, n=4, seed=3, batch=1), atol=1e-4)


def test_depends_on_direction(demo_encoder, image):
    d1, d2 = _dirs(demo_encoder, 2, seed=1)
    a = smoothgrad(demo_encoder, image, d1, n=4)
    b = smoothgrad(demo_encoder, image, d2, n=4)
    assert np.abs(a - b).mean() > 0.01
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] < 0.99
    # scaling the direction does not change the map (cosine)
    np.testing.assert_allclose(a, smoothgrad(demo_encoder, image, 5 * d1, n=4), atol=1e-4)


def test_sigma_zero_is_plain_gradient(demo_encoder, image):
    d = _dirs(demo_encoder)[0]
    a = smoothgrad(demo_encoder, image, d, n=1, sigma=0.0)
    b = smoothgrad(demo_encoder, image, d, n=3, sigma=0.0, seed=9)
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("kw,exc,msg", [
    ({"n": 0}, SaefeError, "n must be an integer >= 1"),
    ({"n": 2.5}, SaefeError, "n must be"),
    ({"sigma": -0.1}, SaefeError, "sigma"),
    ({"sigma": float("nan")}, SaefeError, "sigma"),
    ({"batch": 0}, SaefeError, "batch"),
    ({"direction": np.zeros(128)}, SteeringError, "zero vector"),
    ({"direction": np.full(128, np.nan)}, SteeringError, "NaN"),
    ({"direction": np.ones(5)}, IncompatibleError, "dimension 5"),
    ({"image": "not a PIL image"}, SaefeError, "PIL image"),
])
def test_bad_inputs(demo_encoder, image, kw, exc, msg):
    args = {"image": image, "direction": _dirs(demo_encoder)[0], "n": 2, **kw}
    with pytest.raises(exc, match=msg):
        smoothgrad(demo_encoder, **args)


def test_overlay(image):
    heat = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    out = overlay(image, heat, alpha=0.5)
    assert out.size == image.size and out.mode == "RGB"
    assert np.array_equal(np.asarray(overlay(image, heat, alpha=0.0)), np.asarray(image))
    with pytest.raises(SaefeError, match="alpha"):
        overlay(image, heat, alpha=2)
    with pytest.raises(SaefeError, match="2-D"):
        overlay(image, np.zeros(5))


def test_cli_writes_png(tmp_path, image, capsys):
    from fixtures.synthetic import build_synthetic

    from saefe.cli.main import main
    from saefe.ingest.encoder import SiglipEncoder

    info = SiglipEncoder.from_pretrained("demo", device="cpu").info
    index_dir, sae_dir, _ = build_synthetic(tmp_path, info, n=60)
    src = tmp_path / "in.png"
    image.save(src)
    out = tmp_path / "heat.png"
    for sel in (["--feature", "3"], ["--label", "Esteem"], ["--expr", "Esteem - Male"]):
        rc = main(["saliency", "--index", str(index_dir), "--image", str(src), *sel, "--n", "2",
                   "--out", str(out), "--heat-out", str(tmp_path / "h.npy"), "--no-progress"])
        assert rc == 0
        assert Image.open(out).size == image.size
        assert np.load(tmp_path / "h.npy").shape == tuple(info.image_size)
    capsys.readouterr()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    for argv, msg in (
        (["--image", str(bad), "--feature", "3"], "cannot use image"),
        (["--image", str(tmp_path / "missing.png"), "--feature", "3"], "cannot read image"),
        (["--image", str(src), "--feature", "64"], "out of range"),
        (["--image", str(src), "--feature", "3", "--n", "0"], "n must be"),
        (["--image", str(src), "--feature", "3", "--sigma", "-1"], "sigma"),
        (["--image", str(src), "--label", "Nope"], "unknown label"),
    ):
        rc = main(["saliency", "--index", str(index_dir), *argv, "--out", str(out), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err, (argv, err)
