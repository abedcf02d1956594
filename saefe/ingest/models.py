"""Model names that are not hub ids or directories (``demo``), resolved through plug-ins.

The ingest stage must not know about the demo that sits on top of it, yet ``--model demo`` and
the model id recorded in a demo index's manifest must load like any checkpoint. Providers are
registered as ``saefe.models`` entry points (pyproject.toml); each is called with the requested
name and returns ``(local_dir, model_id)`` when it owns the name, else ``None``.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable

Provider = Callable[[str], "tuple[Path, str] | None"]


@functools.lru_cache(maxsize=1)
def _providers() -> tuple[Provider, ...]:
    return tuple(ep.load() for ep in entry_points(group="saefe.models"))


def resolve_model(name: str) -> tuple[str, str]:
    """``(path to load from, model id to record)`` for a model name, alias or directory."""
    for provider in _providers():
        hit = provider(name)
        if hit is not None:
            return str(hit[0]), hit[1]
    path = str(name)
    marker = Path(path) / "SAEFE_MODEL_ID"
    return path, (marker.read_text().strip() if marker.exists() else path.rstrip("/"))


def canonical_model_id(name: str) -> str:
    """The id a build records for ``name`` without loading anything heavier than the provider."""
    for provider in _providers():
        hit = provider(name)
        if hit is not None:
            return hit[1]
    return name
