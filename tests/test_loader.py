"""The parallel loader: item order, skips aligned with pixels, JPEG draft decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from saefe.ingest.corpus import FolderCorpus
from saefe.ingest.images import decode_image
from saefe.ingest.loader import ChunkLoader


def _jpeg(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_draft_covers_the_target_and_keeps_the_original_size():
    data = _jpeg(1600, 1200, 0)
    img = decode_image(data, draft_to=(384, 384))
    assert img.size[0] >= 384 and img.size[1] >= 384 and img.size[0] < 1600  # decoded at a reduced scale
    assert img.info["original_size"] == (1600, 1200)
    full = decode_image(data)
    assert full.size == (1600, 1200) and full.info["original_size"] == (1600, 1200)


def _preprocess(images):
    import torch

    return torch.stack([torch.from_numpy(np.asarray(im.resize((16, 16)), np.float32)).permute(2, 0, 1) for im in images])


@pytest.mark.parametrize("workers", [1, 4])
def test_chunk_loader_keeps_order_and_aligns_pixels(tmp_path, workers):
    for i in range(12):
        (tmp_path / f"{i:02d}.jpg").write_bytes(_jpeg(200 + 8 * i, 120, i))
    (tmp_path / "05.jpg").write_bytes(b"not an image")
    (tmp_path / "09.jpg").write_bytes(b"")
    corpus = FolderCorpus.scan(tmp_path)
    with ChunkLoader(corpus, _preprocess, (64, 64), workers) as loader:
        items, px = loader.load(0, len(corpus))
    assert [i for i, *_ in items] == list(range(12))
    reasons = {m["path"]: r for _, _, m, r in items if r}
    assert set(reasons) == {"05.jpg", "09.jpg"}
    good = [m for _, img, m, r in items if r is None]
    assert px.shape == (10, 3, 16, 16)
    assert [m["width"] for m in good] == [200 + 8 * i for i in range(12) if i not in (5, 9)]
    # the pixels of row j are those of the j-th good item, whatever the thread count
    expect = _preprocess([decode_image((tmp_path / m["path"]).read_bytes(), draft_to=(64, 64)) for m in good])
    assert np.array_equal(px.numpy(), expect.numpy())
