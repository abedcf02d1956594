"""The demo's trained tiny SigLIP: shipped, loaded like real SigLIP, guarded, re-trainable.

No quality thresholds here (benchmarks/bench_demo_model.py measures quality): these tests check
what the code guarantees: the loading path, the formats, the errors and the training script.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from saefe.demo import tiny_model as tm
from saefe.errors import ModelLoadError


def test_shipped_model_loads_through_from_pretrained_with_siglip_formats(capfd):
    from transformers import SiglipTokenizer

    from saefe.ingest.encoder import SiglipEncoder

    capfd.readouterr()
    enc = SiglipEncoder.from_pretrained("demo", device="cpu")
    out, err = capfd.readouterr()
    assert out == "" and err == "", "library notices leak into normal output"
    assert isinstance(enc.tokenizer, SiglipTokenizer)
    assert type(enc.image_processor).__name__.startswith("SiglipImageProcessor")
    assert type(enc.vision).__name__ == "SiglipVisionModel" and type(enc.text_model).__name__ == "SiglipTextModel"
    assert enc.info.model_id == tm.DEMO_MODEL_ID == "saefe/demo-siglip"
    d = tm.SHIPPED_DIR
    for name in tm.MODEL_FILES + (tm.RECORD,):
        assert (d / name).is_file(), name
    assert sum((d / n).stat().st_size for n in tm.MODEL_FILES) < 8 << 20  # a few MB
    cfg = json.loads((d / "config.json").read_text())
    vocab = cfg["text_config"]["vocab_size"]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert 0 <= cfg["text_config"][key] < vocab, key
    assert json.loads((d / "preprocessor_config.json").read_text())["image_processor_type"] == "SiglipImageProcessor"
    assert json.loads((d / "tokenizer_config.json").read_text())["tokenizer_class"] == "SiglipTokenizer"
    record = json.loads((d / tm.RECORD).read_text())
    assert record["weights_sha256"] == tm.sha256_file(d / tm.WEIGHTS)
    assert record["data"]["train"]["seed"] != 0 and record["data"]["validation"]["seed"] != 0
    t = enc.embed_texts(["a happy child", "an angry old man"])
    assert t.shape == (2, enc.info.embedding_dim) and np.allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)


def test_every_caption_word_is_one_token_of_the_shipped_tokenizer():
    from transformers import SiglipTokenizer

    from saefe.demo.captions import vocabulary_text
    from saefe.demo.corpus import DEMO_TEXT_PROMPTS

    tok = SiglipTokenizer(vocab_file=str(tm.SHIPPED_DIR / "spiece.model"))
    words = {w for line in vocabulary_text() for w in line.split()}
    words |= {w for p in DEMO_TEXT_PROMPTS.values() for w in p.split()}
    split = [w for w in sorted(words) if len(tok.tokenize(w)) != 1]
    assert not split


def _copy_model(tmp_path, monkeypatch):
    d = tmp_path / "model"
    shutil.copytree(tm.SHIPPED_DIR, d)
    monkeypatch.setenv("SAEFE_DEMO_MODEL", str(d))
    return d


@pytest.mark.parametrize("damage", ["truncate", "flip", "missing", "no_tokenizer"])
def test_damaged_weights_are_a_one_line_error_naming_the_file(tmp_path, monkeypatch, capsys, damage):
    from saefe.cli.main import main
    from saefe.ingest.encoder import SiglipEncoder

    d = _copy_model(tmp_path, monkeypatch)
    w = d / tm.WEIGHTS
    if damage == "truncate":
        w.write_bytes(w.read_bytes()[:1000])
    elif damage == "flip":
        data = bytearray(w.read_bytes())
        data[-100] ^= 0xFF
        w.write_bytes(bytes(data))
    elif damage == "missing":
        w.unlink()
    else:
        (d / "spiece.model").unlink()
    with pytest.raises(ModelLoadError) as e:
        SiglipEncoder.from_pretrained("demo", device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "saefe train-demo-model" in msg
    assert str(d / ("spiece.model" if damage == "no_tokenizer" else tm.WEIGHTS)) in msg
    # the CLI: exit status 2, that one line, no traceback
    images = tmp_path / "imgs"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(images / "a.png")
    capsys.readouterr()
    assert main(["build", "--images", str(images), "--out", str(tmp_path / "idx"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train-demo-model" in err and "Traceback" not in err


def test_retired_random_model_id_is_a_clear_error():
    from saefe.ingest.models import resolve_model

    with pytest.raises(ModelLoadError, match="saefe/tiny-siglip.*--force") as e:
        resolve_model("saefe/tiny-siglip")
    assert "\n" not in str(e.value)


def test_random_maker_has_the_shipped_architecture(tmp_path):
    from saefe.ingest.encoder import SiglipEncoder

    d = tm.make_tiny_siglip(tmp_path / "random")
    enc = SiglipEncoder.from_pretrained(str(d), device="cpu")
    shipped = json.loads((tm.SHIPPED_DIR / "config.json").read_text())
    mine = json.loads((d / "config.json").read_text())
    for part in ("vision_config", "text_config"):
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            assert mine[part][key] == shipped[part][key], (part, key)
    assert enc.info.model_id == tm.RANDOM_MODEL_ID  # the directory's marker, not the trained model's id
    t = enc.embed_texts(["a photo of a happy person"])
    assert t.shape == (1, enc.info.embedding_dim)


def test_captions_cover_partial_mentions_and_match_by_stated_attributes():
    from saefe.demo.captions import Mention, caption_for, captions_for_labels, positives
    from saefe.demo.corpus import DEMO_EMOTIONS

    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(400):
        text, m = caption_for("Anger", "Female", "Kid", rng)
        seen.add((m.emotion >= 0, m.gender >= 0, m.age >= 0))
        assert text == " ".join(text.split()) and "{" not in text
        if m.emotion < 0:
            assert not any(w in text for w in ("angry", "anger", "furious", "rage"))
    # every combination of stated attributes occurs, including single ones ("a girl" states two)
    assert {(True, False, False), (False, True, False), (False, False, True), (True, True, True)} <= seen
    assert caption_for("Happiness", "Male", "Adult", rng, mention=(True, False, False))[1] == Mention(emotion=0)
    text, m = caption_for("Peace", "Male", "Adult", rng, mention=(False, True, True))
    assert m == Mention(gender=0, age=2) and text  # e.g. "a man"
    e, g, a = np.array([0, 0, 1]), np.array([0, 1, 0]), np.array([2, 2, 2])
    assert Mention(emotion=0).matches(e, g, a).tolist() == [True, True, False]
    assert Mention(emotion=0, gender=1).matches(e, g, a).tolist() == [False, True, False]
    texts, mentions = captions_for_labels(e, g, a, np.random.default_rng(1))
    pos = positives(mentions, e, g, a)
    assert pos.shape == (3, 3) and pos[np.arange(3), np.arange(3)].all()  # a caption fits its own image
    assert len(DEMO_EMOTIONS) == 8


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from saefe.demo.train_model import DemoTrainConfig, train_demo_model

    out = tmp_path_factory.mktemp("trained") / "model"
    record = train_demo_model(out, DemoTrainConfig.tiny())
    return out, record


def test_training_script_writes_a_loadable_model_dir_with_its_record(tiny_run, monkeypatch):
    from saefe.ingest.encoder import SiglipEncoder

    out, record = tiny_run
    for name in tm.MODEL_FILES + (tm.RECORD,):
        assert (out / name).is_file(), name
    assert not list(out.parent.glob("*.tmp*"))
    saved = json.loads((out / tm.RECORD).read_text())
    assert saved["weights_sha256"] == tm.sha256_file(out / tm.WEIGHTS) == record["weights_sha256"]
    assert saved["data"]["train"]["seed"] == 10_000 and saved["config"]["seed"] == 0
    assert {"vision", "text"} <= set(saved["stages"]) and "text_p@20_single" in saved["metrics"]
    monkeypatch.setenv("SAEFE_DEMO_MODEL", str(out))
    enc = SiglipEncoder.from_pretrained("demo", device="cpu")
    assert enc.info.embedding_dim == 32 and enc.info.image_size == (32, 32)


def test_training_cli_tiny(tmp_path, capsys):
    from saefe.cli.main import main

    assert main(["train-demo-model", "--tiny", "--out", str(tmp_path / "m"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "demo model:" in out and (tmp_path / "m" / tm.WEIGHTS).exists()
    assert main(["train-demo-model", "--train-seed", "0", "--out", str(tmp_path / "x")]) == 2


def test_demo_build_replaces_an_index_of_the_retired_random_model(tmp_path, capsys):
    """An index/demo embedded by 'saefe/tiny-siglip' is generated data: the demo build redoes it."""
    from saefe.demo.pipeline import DemoBuildConfig, build_demo
    from saefe.ingest.build import BuildConfig
    from saefe.manifest import read_json, write_json_atomic

    cfg = DemoBuildConfig(build=BuildConfig(out=str(tmp_path / "idx"), progress=False), n=24, seed=5, with_sae=False)
    build_demo(cfg)
    m = read_json(tmp_path / "idx" / "manifest.json")
    m["build_key"]["model"] = m["encoder"]["model_id"] = "saefe/tiny-siglip"  # as an old build left it
    write_json_atomic(tmp_path / "idx" / "manifest.json", m)
    capsys.readouterr()
    summary = build_demo(cfg)
    assert "retired random-weight demo model" in capsys.readouterr().out
    assert summary.embedded_now == 24
    assert read_json(tmp_path / "idx" / "manifest.json")["encoder"]["model_id"] == tm.DEMO_MODEL_ID
    assert build_demo(cfg).embedded_now == 0  # and then it is simply complete
