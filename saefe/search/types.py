"""Query terms and result records: the types the engine and the remote clients share.

They live below both, so saefe.remote.backend_client can build results without importing the
engine (which imports the client): no import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MODES = ("direction", "features")
TERM_KINDS = ("embedding", "text", "image", "label", "expr", "features", "predefined")
MIX_KINDS = ("label", "expr", "features")


@dataclass
class Term:
    """One query term. value: list of floats | str | image bytes / PIL | label | expression |
    {feature id: weight}; weight may be negative (push away)."""

    kind: str
    value: Any
    weight: float = 1.0


@dataclass
class SearchResult:
    id: int
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)
    group: list[int] | None = None  # near-duplicates collapsed into this result (itself first)

    def to_json(self) -> dict[str, Any]:
        out = {"id": int(self.id), "score": float(self.score), **self.metadata}
        if self.group is not None:
            out.update(group_size=len(self.group), group_ids=list(self.group))
        return out


@dataclass
class FeatureReport:
    feature: int
    frequency: float | None
    top: list[SearchResult]
    bottom: list[SearchResult]
    labels: list[tuple[str, float]]
