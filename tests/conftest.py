"""Shared fixtures: every test runs with SAEFE_HOME in a temp dir, offline."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def saefe_home(tmp_path_factory):
    """One tiny model per test session, built once, in a throwaway SAEFE_HOME."""
    home = tmp_path_factory.mktemp("saefe_home")
    old = os.environ.get("SAEFE_HOME")
    os.environ["SAEFE_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("SAEFE_HOME", None)
    else:
        os.environ["SAEFE_HOME"] = old


@pytest.fixture(scope="session")
def demo_encoder(saefe_home):
    from saefe.ingest.encoder import SiglipEncoder

    return SiglipEncoder.from_pretrained("demo", device="cpu")


@pytest.fixture(scope="session")
def standins(tmp_path_factory):
    """SO400M-shaped, 2-layer SigLIP / SigLIP 2 checkpoints (see tests/fixtures/checkpoints.py)."""
    from fixtures.checkpoints import StandIns

    return StandIns(tmp_path_factory.mktemp("standin_checkpoints"))


@pytest.fixture
def offline_hub(standins, monkeypatch):
    """Point the Hugging Face cache at the stand-ins' HF_HOME, offline, for this test and the
    processes it starts: hub ids then resolve exactly as after ``hf download`` on a user's machine."""
    import huggingface_hub.constants as hf_constants

    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(standins.hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(standins.hf_home / "hub"))
    return standins
