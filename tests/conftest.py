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
