"""The parallel loader: item order, skips aligned with pixels, JPEG draft decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
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


def test_process_loader_gives_the_thread_loaders_items_and_pixels(tmp_path):
    """Worker processes: the same items, skip reasons, metadata and pixels as the thread pool,
    chunk by chunk (chunks asked for in the order given, batches never crossing a chunk)."""
    from saefe.ingest.loader_procs import ProcessChunkLoader

    for i in range(23):
        (tmp_path / f"{i:02d}.jpg").write_bytes(_jpeg(120 + 8 * i, 96, i))
    (tmp_path / "07.jpg").write_bytes(b"not an image")
    (tmp_path / "16.jpg").write_bytes(b"")
    corpus = FolderCorpus.scan(tmp_path)
    spans = [(10, 20), (0, 10), (20, 23)]  # a resumed build's todo list need not start at 0
    with ChunkLoader(corpus, _preprocess, (64, 64), 2) as threads, \
            ProcessChunkLoader(corpus, _preprocess, (64, 64), 2, spans, batch=4) as procs:
        for lo, hi in spans:
            want, want_px = threads.load(lo, hi)
            got, got_px = procs.load(lo, hi)
            assert [(i, m, r) for i, _, m, r in got] == [(i, m, r) for i, _, m, r in want]
            assert [img is not None for _, img, _, _ in got] == [img is not None for _, img, _, _ in want]
            assert np.array_equal(got_px.numpy(), want_px.numpy())
            assert got_px.is_contiguous(memory_format=torch.channels_last)  # collated without a transpose


def test_build_with_loader_processes_matches_the_thread_build(tmp_path):
    from saefe.ingest.build import BuildConfig, build_index
    from saefe.ingest.store import EmbeddingStore

    for i in range(9):
        (tmp_path / "img" / f"{i}.jpg").parent.mkdir(exist_ok=True)
        (tmp_path / "img" / f"{i}.jpg").write_bytes(_jpeg(96 + 8 * i, 64, i))
    (tmp_path / "img" / "bad.jpg").write_bytes(b"junk")
    (tmp_path / "img" / "copy.jpg").write_bytes((tmp_path / "img" / "3.jpg").read_bytes())
    outs = {}
    for name, procs in (("threads", 0), ("procs", 2)):
        s = build_index(BuildConfig(images=str(tmp_path / "img"), out=str(tmp_path / name), model="demo",
                                    chunk_size=4, loader_processes=procs, progress=False))
        outs[name] = (EmbeddingStore.open(tmp_path / name), s)
    (a, sa), (b, sb) = outs["threads"], outs["procs"]
    assert a.metadata.equals(b.metadata) and np.array_equal(a.vectors_f32(), b.vectors_f32())
    assert sa.skipped == sb.skipped and len(a) == 9


def test_a_dead_loader_process_is_one_line_and_the_build_resumes(tmp_path, monkeypatch):
    """A worker killed mid-build (OOM, a decoder crash): one SaefeError, the chunks committed
    before it stay, and the same command finishes the rest without redoing them."""
    import os
    import time

    from saefe.errors import SaefeError
    from saefe.ingest import loader_procs
    from saefe.ingest.build import BuildConfig, build_index
    from saefe.ingest.store import EmbeddingStore

    for i in range(12):
        (tmp_path / "img" / f"{i:02d}.jpg").parent.mkdir(exist_ok=True)
        (tmp_path / "img" / f"{i:02d}.jpg").write_bytes(_jpeg(96 + 8 * i, 64, i))
    real = loader_procs._Items.__getitem__

    def dies_on_9(self, i):
        if int(i) == 9:  # in the worker process, once chunk 0 is on disk: as an OOM kill would
            for _ in range(600):
                if list((tmp_path / "out").rglob("000000.json")):
                    break
                time.sleep(0.05)
            os._exit(1)
        return real(self, i)

    cfg = BuildConfig(images=str(tmp_path / "img"), out=str(tmp_path / "out"), model="demo", chunk_size=4,
                      loader_processes=2, progress=False)
    monkeypatch.setattr(loader_procs._Items, "__getitem__", dies_on_9)
    with pytest.raises(SaefeError, match="loader worker process died"):
        build_index(cfg)
    monkeypatch.setattr(loader_procs._Items, "__getitem__", real)
    s = build_index(cfg)
    assert s.count == 12 and s.embedded_now <= 8  # chunk 0 (and perhaps chunk 1) was kept, not redone
    assert len(EmbeddingStore.open(tmp_path / "out")) == 12


@pytest.mark.parametrize("flag", ["--loader-processes", "--loader-workers", "--batch-size"])
def test_negative_loader_counts_are_one_line_errors(tmp_path, capsys, flag):
    from saefe.cli.main import main as cli

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(_jpeg(64, 64, 0))
    rc = cli(["build", "--images", str(tmp_path / "img"), "--out", str(tmp_path / "out"), "--model", "demo", flag, "-1"])
    err = capsys.readouterr().err
    assert rc == 2 and "must be 0 or more" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_batch_size_is_the_devices_default_or_the_flag(tmp_path):
    """--batch-size only changes how many images go through the model at once, never what is
    stored: the same items and metadata, the same vectors up to float rounding."""
    from saefe.ingest.build import BuildConfig, build_index
    from saefe.ingest.encoder import SiglipEncoder, default_batch_size
    from saefe.ingest.store import EmbeddingStore

    assert (default_batch_size("cuda"), default_batch_size("cpu")) == (256, 64)
    assert SiglipEncoder.from_pretrained("demo", device="cpu").batch_size == 64
    for i in range(7):
        (tmp_path / "img" / f"{i}.jpg").parent.mkdir(exist_ok=True)
        (tmp_path / "img" / f"{i}.jpg").write_bytes(_jpeg(96 + 8 * i, 64, i))
    stores = []
    for name, batch in (("default", 0), ("b3", 3)):
        build_index(BuildConfig(images=str(tmp_path / "img"), out=str(tmp_path / name), model="demo", batch_size=batch,
                                progress=False))
        stores.append(EmbeddingStore.open(tmp_path / name))
    a, b = stores
    assert a.metadata.equals(b.metadata)
    np.testing.assert_allclose(a.vectors_f32(), b.vectors_f32(), atol=2e-3)  # fp16 storage


def test_a_batch_that_does_not_fit_is_retried_at_half_the_size(caplog):
    """Out of GPU memory on a batch: the encoder halves its batch size and goes on (same vectors,
    one warning); out of memory on a single image is a one-line error."""
    import logging

    from saefe.errors import SaefeError
    from saefe.ingest.encoder import SiglipEncoder

    enc = SiglipEncoder.from_pretrained("demo", device="cpu", batch_size=8)
    h, w = enc.info.image_size
    px = torch.randint(0, 256, (9, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    want = enc.embed_pixels(px)
    real = enc.image_features
    fits = {"n": 2}

    def small_gpu(x):
        if len(x) > fits["n"]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(x)

    enc.image_features = small_gpu
    seen = []
    with caplog.at_level(logging.WARNING, logger="saefe.ingest.encoder"):
        got = enc.embed_pixels(px, on_batch=lambda n, s: seen.append(n))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert enc.batch_size == 2 and sum(seen) == 9 and max(seen) == 2  # 8 -> 4 -> 2
    assert "does not fit" in caplog.text
    fits["n"] = 0
    with pytest.raises(SaefeError, match="single image"):
        enc.embed_pixels(px)


def test_loader_processes_default_to_a_gpu_build_only():
    """No --loader-processes: worker processes on a GPU (one per core but two), threads on CPUs;
    an explicit count (0 = threads) wins either way."""
    from saefe.ingest.build import BuildConfig, _process_count
    from saefe.ingest.loader import default_workers

    auto = BuildConfig(images="x", out="y")
    assert _process_count(auto, "cuda") == max(1, default_workers() - 2) and _process_count(auto, "cuda:1") > 0
    assert _process_count(auto, "cpu") == 0 and _process_count(auto, None) == 0
    assert _process_count(BuildConfig(images="x", out="y", loader_processes=0), "cuda") == 0
    assert _process_count(BuildConfig(images="x", out="y", loader_processes=3), "cpu") == 3


def test_a_dataset_build_in_loader_processes_matches_the_thread_build(tmp_path):
    """GPU builds read in worker processes by default, whatever the source: a Hugging Face
    dataset (Arrow files the forked workers share) gives the same store either way, its bad
    row a skip in both."""
    import datasets

    from saefe.ingest.build import BuildConfig, build_index
    from saefe.ingest.store import EmbeddingStore

    imgs = [{"bytes": _jpeg(80 + 8 * i, 64, i), "path": f"{i}.jpg"} for i in range(7)]
    imgs.append({"bytes": b"not an image", "path": "bad.jpg"})
    ds = datasets.Dataset.from_dict({"image": imgs, "title": [f"t{i}" for i in range(8)]},
                                    features=datasets.Features({"image": datasets.Image(decode=False),
                                                                "title": datasets.Value("string")}))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    outs = {}
    for name, procs in (("threads", 0), ("procs", 2)):
        s = build_index(BuildConfig(dataset=str(tmp_path / "d.parquet"), out=str(tmp_path / name), chunk_size=3,
                                    loader_processes=procs, progress=False))
        outs[name] = (EmbeddingStore.open(tmp_path / name), s)
    (a, sa), (b, sb) = outs["threads"], outs["procs"]
    assert len(a) == 7 and sa.skipped == sb.skipped and sum(sa.skipped.values()) == 1
    assert a.metadata.equals(b.metadata) and np.array_equal(a.vectors_f32(), b.vectors_f32())
