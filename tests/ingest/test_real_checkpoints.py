"""The real checkpoint path (issue 9), through stand-ins in the formats users download.

google/siglip-so400m-patch14-384 (SentencePiece ``spiece.model``, SiglipTokenizer) and
google/siglip2-so400m-patch14-384 (Gemma ``tokenizer.json``), at full SO400M width and 384 px
but 2 layers deep with random weights (tests/fixtures/checkpoints.py), loaded by hub id from an
HF cache with HF_HUB_OFFLINE=1 and from plain directories. The README's "Your own corpus" build
and a text search run as users run them (subprocesses); labels, saliency, the app's text search
and serve-clip run in-process on the index that build made.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from saefe.errors import ModelLoadError

REPO = Path(__file__).resolve().parents[2]
FLAVOURS = ["siglip", "siglip2"]
# What transformers says while loading that users need not see (shown with -v).
NOTICES = ("UNEXPECTED", "requires torchvision", "must be `None` or an integer", "Loading weights", "Traceback")


def photos(folder: Path, n: int = 3, corrupt: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 255, (120 + 10 * i, 160, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"photo_{i}.{'jpg' if i % 2 else 'png'}")
    if corrupt:
        (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


def run(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python ARGS`` in a fresh process from the repo, offline, as a user would run it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------
# Loading: the vision tower alone, the text side on first use, both identical to the full model
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_vision_only_load_embeds_exactly_as_the_full_model(standins, flavour):
    import torch
    from transformers import AutoTokenizer, SiglipModel

    from saefe.ingest.encoder import SiglipEncoder, l2_normalise

    d = standins.local_dir(flavour)  # a plain local directory
    enc = SiglipEncoder.from_pretrained(str(d), device="cpu")
    assert type(enc.model).__name__ == "SiglipVisionModel" and not enc.text_loaded
    assert enc.info.embedding_dim == 1152 and enc.info.image_size == (384, 384)
    assert type(enc.image_processor).__name__.startswith("SiglipImageProcessor")
    imgs = [Image.open(p) for p in sorted(photos(Path(d).parent / f"img_{flavour}", n=1, corrupt=False).iterdir())]
    vecs = enc.embed_images(imgs)
    assert not enc.text_loaded  # image work never loads the text tower or the tokenizer

    full = SiglipModel.from_pretrained(d).eval()
    with torch.inference_mode():
        px = enc.preprocess_cpu(imgs)  # the very pixels the encoder embedded (uint8 + affine on the device)
        px = enc.pixel_plan.finish(px, torch.float32) if px.dtype == torch.uint8 else px
        ref = full.get_image_features(pixel_values=px)
    ref = (ref if hasattr(ref, "shape") else ref.pooler_output).numpy()
    np.testing.assert_array_equal(vecs, l2_normalise(ref))  # same pixels, same weights, same ops
    ref_enc = SiglipEncoder.from_model(full, enc.image_processor, AutoTokenizer.from_pretrained(d), "ref", "cpu")

    texts = ["A photo of a HAPPY child at the beach", "sadness"]
    t = enc.embed_texts(texts)
    assert enc.text_loaded and type(enc.text_model).__name__ == "SiglipTextModel"
    np.testing.assert_array_equal(t, ref_enc.embed_texts(texts))
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)
    # Lower-cased before tokenizing, as both were trained (SigLIP 2's Gemma tokenizer does not do it).
    np.testing.assert_array_equal(enc.embed_texts([texts[0].lower()]), enc.embed_texts([texts[0]]))


def test_tokenizers_are_the_real_classes_and_pad_right(standins):
    from saefe.ingest.towers import load_tokenizer

    sp = load_tokenizer(str(standins.local_dir("siglip")), "siglip", True)
    gemma = load_tokenizer(str(standins.local_dir("siglip2")), "siglip2", True)
    assert type(sp).__name__ == "SiglipTokenizer" and type(gemma).__name__.startswith("GemmaTokenizer")
    for tok in (sp, gemma):
        ids = tok(["a happy child"], padding="max_length", max_length=12)["input_ids"][0]
        assert tok.padding_side == "right" and ids[-1] == tok.pad_token_id and tok.eos_token_id in ids
    assert gemma("a photo")["input_ids"][0] != gemma.bos_token_id  # no BOS, as SigLIP 2 was trained


def test_load_failures_are_one_line_errors(standins, tmp_path, offline_hub):
    from saefe.ingest.encoder import SiglipEncoder

    src = standins.local_dir("siglip")
    cases = {}
    with pytest.raises(ModelLoadError) as e:
        SiglipEncoder.from_pretrained("google/siglip-base-patch16-224", device="cpu")
    cases["not cached"] = str(e.value)
    assert "not in the Hugging Face cache" in cases["not cached"] and "models--google--siglip-base" in cases["not cached"]

    def variant(name: str, skip: set[str]) -> Path:
        """The checkpoint without some files (the others symlinked)."""
        d = tmp_path / name
        d.mkdir()
        for f in src.iterdir():
            if f.name not in skip:
                (d / f.name).symlink_to(f)
        return d

    no_tok = variant("no_tokenizer", {"spiece.model", "tokenizer_config.json", "special_tokens_map.json"})
    enc = SiglipEncoder.from_pretrained(str(no_tok), device="cpu")  # image-only: no tokenizer needed
    assert enc.embed_images([Image.new("RGB", (50, 40))]).shape == (1, 1152)
    with pytest.raises(ModelLoadError, match="tokenizer") as e:
        enc.embed_texts(["a dog"])
    cases["no tokenizer"] = str(e.value)

    no_proc = variant("no_processor", {"preprocessor_config.json"})
    with pytest.raises(ModelLoadError, match="preprocessor_config.json") as e:
        SiglipEncoder.from_pretrained(str(no_proc), device="cpu")
    cases["no processor"] = str(e.value)

    from safetensors.torch import load_file, save_file

    no_weights = variant("no_weights", {"model.safetensors"})
    with pytest.raises(ModelLoadError, match="no model.safetensors") as e:
        SiglipEncoder.from_pretrained(str(no_weights), device="cpu")
    cases["no weights"] = str(e.value)

    partial = variant("partial", {"model.safetensors"})
    weights = load_file(src / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "post_layernorm" not in k}, partial / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="lacks 2 vision-tower weights") as e:
        SiglipEncoder.from_pretrained(str(partial), device="cpu")
    cases["partial weights"] = str(e.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json") as e:
        SiglipEncoder.from_pretrained(str(empty), device="cpu")
    cases["not a checkpoint"] = str(e.value)

    naflex = tmp_path / "naflex"
    naflex.mkdir()
    (naflex / "config.json").write_text(json.dumps({"model_type": "siglip2"}))
    with pytest.raises(ModelLoadError, match="fixed-resolution") as e:
        SiglipEncoder.from_pretrained(str(naflex), device="cpu")
    cases["naflex"] = str(e.value)

    for what, msg in cases.items():
        assert "\n" not in msg and "Traceback" not in msg, what


# ----------------------------------------------------------------------------------------------
# The README's "Your own corpus" commands, by hub id, offline, as separate processes
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory, standins):
    """flavour -> (index dir, build process): `python scripts/build_index.py --images DIR
    --model google/... --out ...` with HF_HOME at the stand-ins' cache, run once per flavour."""
    root = tmp_path_factory.mktemp("real_builds")
    corpus = photos(root / "photos")
    done = {}

    def get(flavour):
        if flavour not in done:
            hub_id = standins.hub_id(flavour)
            out = root / f"index_{flavour}"
            p = run(["scripts/build_index.py", "--images", str(corpus), "--model", hub_id, "--out", str(out),
                     "--no-progress"], env={"HF_HOME": str(standins.hf_home)})
            done[flavour] = (out, p)
        return done[flavour]

    return get


@pytest.mark.slow
def test_loader_processes_build_by_hub_id_matches_the_thread_build(built, standins, tmp_path):
    """`--loader-processes` on the user's path: a SigLIP checkpoint from the HF cache by hub id, a
    folder with a corrupt file; the same rows, skips and vectors as the thread loader's build."""
    from saefe.ingest.store import EmbeddingStore

    ref, _ = built("siglip")
    out = tmp_path / "procs"
    photos_dir = json.loads((ref / "manifest.json").read_text())["corpus_root"]  # the fixture's folder
    p = run(["scripts/build_index.py", "--images", photos_dir, "--model", standins.hub_id("siglip"), "--out", str(out), "--no-progress", "--loader-processes", "2"],
            env={"HF_HOME": str(standins.hf_home)})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "broken.jpg" in p.stderr and "Traceback" not in p.stderr
    a, b = EmbeddingStore.open(ref), EmbeddingStore.open(out)
    assert list(a.metadata["path"]) == list(b.metadata["path"]) and len(b) == 3
    assert np.array_equal(a.vectors_f32(), b.vectors_f32())
    assert json.loads((ref / "manifest.json").read_text())["skipped"] == json.loads((out / "manifest.json").read_text())["skipped"]


@pytest.mark.slow
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_readme_build_and_text_search_by_hub_id_offline(built, offline_hub, flavour, capsys):
    standins = offline_hub
    out, p = built(flavour)
    capsys.readouterr()  # what the fixtures printed while making the stand-ins is not the user's output
    assert p.returncode == 0, p.stderr[-3000:]
    assert "index: " in p.stdout and "(3 images" in p.stdout and "skipped: " in p.stdout
    assert "img/s while embedding" in p.stdout and " 0 img/s" not in p.stdout
    assert "broken.jpg" in p.stderr  # the corrupt file is skipped with its reason
    for noise in NOTICES:
        assert noise not in p.stdout + p.stderr, noise
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["encoder"]["model_id"] == standins.hub_id(flavour) and manifest["dim"] == 1152
    assert manifest["skipped"] and manifest["count"] == 3

    # `saefe search --text` by hub id, offline (in-process: the build above proved HF_HOME resolution
    # in a fresh process; here the cache location is patched the same way for this process).
    from saefe.cli.main import main

    # random weights make the photos near-duplicates: --no-dedup shows all three
    assert main(["search", "--index", str(out), "--text", "a photo of a happy child", "--k", "3", "--json",
                 "--no-dedup"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert len(rows) == 3 and all(Path(r["path"]).name.startswith("photo_") for r in rows)
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    for noise in NOTICES:
        assert noise not in captured.err, noise


@pytest.mark.slow
def test_without_sentencepiece_images_work_and_text_says_what_to_install(built, standins):
    """The issue's first traceback: SigLIP's tokenizer without sentencepiece / protobuf. Image
    work must not need them, a SigLIP text query must say what to install in one line, and
    SigLIP 2's Gemma tokenizer.json must not need them at all."""
    v1, _ = built("siglip")
    v2, _ = built("siglip2")
    query = str(next((v1.parent / "photos").glob("photo_0.*")))
    calls = {
        "image": ["search", "--index", str(v1), "--image", query, "--k", "2"],
        "text": ["search", "--index", str(v1), "--text", "a happy child", "--k", "2"],
        "text2": ["search", "--index", str(v2), "--text", "a happy child", "--k", "2"],
    }
    # One interpreter with both packages hidden before anything imports them; each command's
    # exit status and stderr come back as JSON on the last line.
    driver = (
        "import sys\nsys.modules['sentencepiece'] = None\nsys.modules['google.protobuf'] = None\n"
        "import contextlib, io, json\nfrom saefe.cli.main import main\nout = {}\n"
        f"for name, argv in {calls!r}.items():\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):\n"
        "        rc = main(argv)\n"
        "    out[name] = [rc, err.getvalue()]\n"
        "print(json.dumps(out))\n"
    )
    p = run(["-c", driver], env={"HF_HOME": str(standins.hf_home)})
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["image"][0] == 0, res["image"]
    rc, err = res["text"]
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "pip install sentencepiece protobuf" in lines[0], err
    assert res["text2"][0] == 0, res["text2"]


# ----------------------------------------------------------------------------------------------
# labels --texts, saliency and the app's text search on the same indexes (in-process, by hub id)
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_labels_saliency_and_app_text_search(built, offline_hub, tmp_path, flavour, capsys):
    import torch

    from saefe.cli.main import main
    from saefe.ingest.store import EmbeddingStore
    from saefe.sae.model import SAEConfig, TopKSAE
    from saefe.search.engine import Engine
    from saefe.serve.app import SaefeApp

    index, p = built(flavour)
    assert p.returncode == 0, p.stderr[-3000:]
    info = EmbeddingStore.open(index).encoder_info
    torch.manual_seed(0)
    sae_dir = tmp_path / "sae"
    TopKSAE(SAEConfig(d_emb=1152, d_hidden=32, top_k=4), info).save_pretrained(sae_dir)

    prompts = tmp_path / "prompts.tsv"
    prompts.write_text("Happiness\ta photo of a happy person\nSadness\ta photo of a sad person\n")
    assert main(["labels", "--index", str(index), "--sae", str(sae_dir), "--texts", str(prompts), "--top-n", "2"]) == 0
    out = capsys.readouterr().out
    assert "Happiness" in out and "Sadness" in out

    image = next((index.parent / "photos").glob("photo_1.*"))
    png = tmp_path / "heat.png"
    rc = main(["saliency", "--index", str(index), "--sae", str(sae_dir), "--image", str(image), "--label", "Happiness",
               "--n", "1", "--batch", "1", "--out", str(png), "--heat-out", str(tmp_path / "heat.npy"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert np.load(tmp_path / "heat.npy").shape == (384, 384) and Image.open(png).size == Image.open(image).size

    engine = Engine.open(index, sae_dir=sae_dir)
    # random weights make the photos near-duplicates: show all three
    res = SaefeApp(engine).api_search_text_page("a photo of a happy person", k=3, dedup_threshold=0)
    assert res["kind"] == "text" and len(res["results"]) == 3
    assert engine.encoder.text_loaded and engine.encoder.info.model_id == offline_hub.hub_id(flavour)


# ----------------------------------------------------------------------------------------------
# serve-clip over HTTP, from a plain local directory
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_serve_clip_text_and_image_over_http(standins, flavour):
    import msgpack
    import requests

    from saefe.ingest.encoder import SiglipEncoder
    from saefe.serve.clip_server import make_app, start_in_thread

    enc = SiglipEncoder.from_pretrained(str(standins.local_dir(flavour)), device="cpu")
    url, stop = start_in_thread(make_app(enc, batch=4))
    try:
        cfg = msgpack.unpackb(requests.get(url + "/config", timeout=30).content)
        assert cfg["embedding_size"] == 1152 and cfg["image_size"] == [384, 384]
        img = Image.fromarray(np.random.default_rng(3).integers(0, 255, (90, 120, 3), dtype=np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        for body, local in (({"text": ["a happy child", "a sad man"]}, lambda: enc.embed_texts(["a happy child", "a sad man"])),
                            ({"images": [buf.getvalue()]}, lambda: enc.embed_images([img]))):
            r = requests.post(url + "/", data=msgpack.packb(body), timeout=120)
            assert r.status_code == 200, r.content[:300]
            got = np.stack([np.frombuffer(v, "<f2") for v in msgpack.unpackb(r.content)]).astype(np.float32)
            np.testing.assert_allclose(got, local(), atol=2e-3)  # sent as float16
    finally:
        stop()
