"""What every artefact on disk records about the encoder that made it.

Indexes, SAEs and label profiles are only meaningful in the embedding space of one encoder, so
each carries an ``EncoderInfo`` and refuses to be combined with an artefact from another space.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from saefe.errors import IncompatibleError

FORMAT_VERSION = 1


@dataclass(frozen=True)
class EncoderInfo:
    """Identity of an embedding space: same model id and dim means vectors are comparable."""

    model_id: str
    embedding_dim: int
    image_size: tuple[int, int] = (0, 0)
    normalisation: str = "l2"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EncoderInfo":
        return cls(
            model_id=str(d["model_id"]),
            embedding_dim=int(d["embedding_dim"]),
            image_size=tuple(int(x) for x in d.get("image_size", (0, 0))),  # type: ignore[arg-type]
            normalisation=str(d.get("normalisation", "l2")),
        )

    @property
    def canonical_id(self) -> str:
        """google/siglip-x and a local copy in .../siglip-x name the same weights."""
        return self.model_id.rstrip("/").split("/")[-1]

    def check_compatible(self, other: "EncoderInfo", mine: str, theirs: str) -> None:
        """Raise IncompatibleError naming both sides when the two spaces differ."""
        if self.embedding_dim != other.embedding_dim or self.canonical_id != other.canonical_id:
            raise IncompatibleError(
                f"{mine} was made with encoder {self.model_id!r} (dim {self.embedding_dim}) but "
                f"{theirs} was made with {other.model_id!r} (dim {other.embedding_dim}); "
                "rebuild one of them with the same model"
            )


def check_dim(expected: int, got: int, what: str) -> None:
    if int(expected) != int(got):
        raise IncompatibleError(f"{what} has dimension {got}, expected {expected}")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON through a temp file + rename so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def file_sha256(path: str | os.PathLike, bufsize: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read in ``bufsize`` blocks (weights can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()
