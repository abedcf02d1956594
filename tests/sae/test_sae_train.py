"""SAE training: quality on planted data, resume, report, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saefe.errors import CorpusError, SaefeError
from saefe.manifest import EncoderInfo
from saefe.sae.model import TopKSAE
from saefe.sae.metrics import atoms_recovered, evaluate, planted_data
from saefe.sae.train import CKPT_DIR, CKPT_JSON, TrainConfig, train_sae
from saefe.ingest.store import write_store

INFO = EncoderInfo("demo/tiny-siglip", 32, (64, 64))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    d = tmp_path_factory.mktemp("planted")
    x, atoms = planted_data(4000, 32, 48, 3, noise=0.01, seed=3)
    write_store(d / "index", x, None, INFO)
    return d / "index", x, atoms


def _cfg(index, out, **kw):
    base = dict(index_dir=str(index), out_dir=str(out), d_hidden=128, k=4, epochs=4, batch_size=128, lr=1e-2, progress=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_training_reduces_fvu_and_writes_everything(planted, tmp_path):
    index, x, atoms = planted
    res = train_sae(_cfg(index, tmp_path / "sae"))
    assert res.completed and not res.resumed and res.steps == 4 * int(np.ceil(3600 / 128))
    out = tmp_path / "sae"
    for f in ("model.safetensors", "config.json", "report.json", "activation_hist.png"):
        assert (out / f).exists(), f
    assert not (out / CKPT_DIR).exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["encoder"] == INFO.to_dict()
    assert cfg["training"]["options"]["pre_bias"] is True
    assert cfg["index"]["count"] == 4000
    rep = json.loads((out / "report.json").read_text())
    m = rep["validation"]
    assert set(m) >= {"fvu", "mean_l0", "dead_count", "dead_fraction", "dense_count", "dense_fraction", "n_inputs"}
    assert m["n_inputs"] == 400 and 0 < m["mean_l0"] <= 4
    assert (out / "activation_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # training improved on its own starting point (quality figures: benchmarks/bench_sae_quality.py)
    sae = TopKSAE.from_pretrained(out)
    fresh = TopKSAE(sae.config, INFO)
    base, _ = evaluate(fresh, x[:400])
    assert m["fvu"] < base["fvu"], (m["fvu"], base["fvu"])
    assert 0.0 <= atoms_recovered(sae.directions, atoms) <= 1.0
    # the report's numbers are the model's numbers on the validation split
    from saefe.ingest.store import EmbeddingStore

    stored = EmbeddingStore.open(index).vectors  # fp16, as trained on
    again, counts = evaluate(sae, stored, np.sort(np.setdiff1d(np.arange(4000), _train_ids(4000))))
    assert again["fvu"] == pytest.approx(m["fvu"], rel=1e-4)
    assert again["dead_count"] == m["dead_count"] == int((counts == 0).sum())


def _train_ids(n):
    from saefe.sae.train import split_ids

    return split_ids(n, 0.1, 0)[0]


def test_resume_after_interruption_continues_from_checkpoint(planted, tmp_path):
    index, _, _ = planted
    out = tmp_path / "sae"
    full = train_sae(_cfg(index, tmp_path / "ref", epochs=2))
    first = train_sae(_cfg(index, out, epochs=2, max_steps=35))  # 29 steps/epoch: stops inside epoch 2
    assert not first.completed and first.steps == 35
    state = json.loads((out / CKPT_DIR / CKPT_JSON).read_text())
    assert state["step"] == 35 and state["epoch"] == 1 and state["batch_in_epoch"] == 6
    assert (out / CKPT_DIR / state["tensors"]).exists()
    assert not (out / "model.safetensors").exists()
    second = train_sae(_cfg(index, out, epochs=2))
    assert second.completed and second.resumed and second.steps == full.steps == 58
    assert (out / "report.json").exists() and not (out / CKPT_DIR).exists()
    # same batches, same optimizer state: the resumed run ends where the uninterrupted one does
    a, b = TopKSAE.from_pretrained(out), TopKSAE.from_pretrained(tmp_path / "ref")
    assert torch.allclose(a.up_proj.weight, b.up_proj.weight, atol=1e-5)
    assert second.metrics["fvu"] == pytest.approx(full.metrics["fvu"], rel=1e-3)


def test_resume_with_other_settings_is_refused(planted, tmp_path):
    index, _, _ = planted
    train_sae(_cfg(index, tmp_path / "sae", max_steps=3))
    with pytest.raises(SaefeError, match="other settings.*--restart"):
        train_sae(_cfg(index, tmp_path / "sae", k=8))
    res = train_sae(_cfg(index, tmp_path / "sae", k=8, epochs=1, resume=False))
    assert res.completed and not res.resumed


@pytest.mark.parametrize("opts", [dict(unit_norm=True), dict(pre_bias=False, auxk=False), dict(topk_impl="dense"), dict(topk_impl="seed")])
def test_option_sets_train(planted, tmp_path, opts):
    index, _, _ = planted
    res = train_sae(_cfg(index, tmp_path / "sae", epochs=1, **opts))
    assert res.completed and 0.0 <= res.metrics["fvu"] < float("inf")
    sae = TopKSAE.from_pretrained(tmp_path / "sae")
    if opts.get("unit_norm"):
        assert torch.allclose(sae.directions.norm(dim=0), torch.ones(128), atol=1e-4)


def test_nan_in_store_is_a_clear_error(tmp_path):
    x, _ = planted_data(300, 32, 16, 2, seed=1)
    x[123, 5] = np.nan
    write_store(tmp_path / "index", x, None, INFO)
    with pytest.raises(CorpusError, match="non-finite.*row 123"):
        train_sae(_cfg(tmp_path / "index", tmp_path / "sae"))


def test_missing_index_and_bad_sizes(tmp_path, planted):
    with pytest.raises(CorpusError):
        train_sae(_cfg(tmp_path / "nope", tmp_path / "sae"))
    with pytest.raises(SaefeError, match="k must be"):
        train_sae(_cfg(planted[0], tmp_path / "sae", k=500))


def test_cli_train_sae(planted, tmp_path, capsys):
    from saefe.cli.main import main

    rc = main(["train-sae", "--index", str(planted[0]), "--out", str(tmp_path / "cli"), "--d-hidden", "64", "--k", "4",
               "--epochs", "1", "--no-progress", "--device", "cpu"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "FVU" in out and "dead" in out
    assert (tmp_path / "cli" / "report.json").exists()
    rc = main(["train-sae", "--index", str(tmp_path / "none"), "--out", str(tmp_path / "x")])
    assert rc == 2
