"""Query a remote search backend that speaks meme-search-engine's HTTP API (or ``saefe serve-backend``).

``RemoteBackend(url)`` reads ``GET /`` (``n_total``, ``d_emb``, ``predefined_embedding_names``) and
searches with ``POST /``: ``{"terms": [{"embedding": [...], "weight": 1}], "k": k}``. Each match
``[score, filename_or_url, filename_hash, format_bitmask, [width, height] | null, ...]`` becomes a
``SearchResult`` (score = match[0]; match[1] goes to metadata ``url`` when it is http(s), else
``path``; match[4] gives ``width``/``height``; match[2] is kept as ``sha256`` when it is one,
else as ``filename_hash``). A remote match has no row id here, so ``id`` is its rank.
"""

from __future__ import annotations

import base64
import math
import re
from typing import Any, Sequence

import numpy as np

from saefe.remote.clip_client import _env_float, request_with_retries
from saefe.errors import IncompatibleError, RemoteError
from saefe.search.types import SearchResult

_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


class RemoteBackend:
    """A remote search index (meme-search-engine API) with the engine's search_vector interface."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float | None = None,
        retries: int | None = None,
        backoff: float | None = None,
        max_backoff: float = 8.0,
        session=None,
        sleep=None,
    ):
        import requests

        if not url or not url.startswith(("http://", "https://")):
            raise RemoteError(f"backend URL must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.timeout = float(timeout if timeout is not None else _env_float("SAEFE_REMOTE_TIMEOUT", 120.0))
        self.retries = int(retries if retries is not None else _env_float("SAEFE_REMOTE_RETRIES", 4))
        self.backoff = float(backoff if backoff is not None else _env_float("SAEFE_REMOTE_BACKOFF", 0.5))
        self.max_backoff = float(max_backoff)
        self.session = session or requests.Session()
        self._sleep = sleep
        info = self._json(self._retrying(lambda: self.session.get(self.url + "/", timeout=self.timeout)), "GET /")
        try:
            if not isinstance(info, dict):
                raise TypeError("not an object")
            self.n_total = int(info["n_total"])
            self.d_emb = int(info["d_emb"])
            names = info.get("predefined_embedding_names") or []
            if not isinstance(names, list):
                raise TypeError("predefined_embedding_names is not a list")
            self.predefined_names = [str(n) for n in names]
        except (KeyError, TypeError, ValueError) as e:
            raise RemoteError(
                f"backend at {self.url} sent a malformed GET / reply ({type(e).__name__}: {e}); "
                "expected n_total, d_emb, predefined_embedding_names"
            ) from None
        if self.d_emb < 1 or self.n_total < 0:
            raise RemoteError(f"backend at {self.url} reports d_emb {self.d_emb}, n_total {self.n_total}")

    def __repr__(self) -> str:
        return f"RemoteBackend({self.url!r}, n_total={self.n_total}, d_emb={self.d_emb})"

    @property
    def dim(self) -> int:
        return self.d_emb

    # -- transport ---------------------------------------------------------------------------
    def _retrying(self, send):
        return request_with_retries(
            send, what="backend", url=self.url, retries=self.retries,
            backoff=self.backoff, max_backoff=self.max_backoff, sleep=self._sleep,
        )

    def _json(self, resp, what: str):
        if resp.status_code != 200:
            text = resp.text.strip()
            try:
                body = resp.json()
                if isinstance(body, dict) and "error" in body:
                    text = str(body["error"])
            except ValueError:
                pass
            text = " ".join(text.split())[:300] or "(empty body)"
            verb = "rejected" if 400 <= resp.status_code < 500 else "failed"
            raise RemoteError(f"backend at {self.url} {verb} {what} (HTTP {resp.status_code}): {text}")
        try:
            return resp.json()
        except ValueError:
            raise RemoteError(
                f"backend at {self.url} sent a reply to {what} that is not JSON: {resp.text[:120]!r}"
            ) from None

    # -- search ------------------------------------------------------------------------------
    def _check_vec(self, vec, what: str) -> list[float]:
        v = np.asarray(vec, dtype=np.float32)
        if v.ndim == 2 and v.shape[0] == 1:
            v = v[0]
        if v.ndim != 1 or v.shape[0] != self.d_emb:
            raise IncompatibleError(f"{what} has shape {tuple(v.shape)}, but the backend at {self.url} has d_emb {self.d_emb}")
        if not np.isfinite(v).all():
            raise RemoteError(f"{what} contains NaN or inf")
        return v.astype(float).tolist()

    def search_vector(self, vec, k: int) -> list:
        """Top-k images for a query vector, sent as one embedding term of weight 1."""
        return self.search_terms([{"embedding": vec, "weight": 1.0}], k)

    def search_terms(self, terms: Sequence[dict[str, Any]], k: int) -> list:
        """Terms as in the API: ``{"embedding": vec}``, ``{"text": str}``, ``{"image": bytes | base64 str}``,
        ``{"predefined_embedding": name}``, each with an optional ``weight``."""
        k = int(k)
        if k < 1:
            raise RemoteError(f"k must be at least 1, got {k}")
        wire = []
        for i, term in enumerate(terms):
            t: dict[str, Any] = {}
            for key, value in term.items():
                if key == "embedding":
                    t[key] = self._check_vec(value, f"term {i} embedding")
                elif key == "image":
                    t[key] = base64.b64encode(bytes(value)).decode("ascii") if isinstance(value, (bytes, bytearray)) else str(value)
                elif key == "weight":
                    w = float(value)
                    if not math.isfinite(w):
                        raise RemoteError(f"term {i} weight is {w}")
                    t[key] = w
                elif key in ("text", "predefined_embedding"):
                    t[key] = str(value)
                else:
                    raise RemoteError(f"term {i} has unknown type {key!r} (embedding, text, image, predefined_embedding)")
            wire.append(t)
        if not wire:
            raise RemoteError("a search needs at least one term")
        body = {"terms": wire, "k": k, "include_video": False}
        resp = self._retrying(lambda: self.session.post(self.url + "/", json=body, timeout=self.timeout))
        reply = self._json(resp, "the search")
        return self._parse_matches(reply, k)

    def _parse_matches(self, reply, k: int) -> list:
        bad = f"backend at {self.url} sent a malformed search reply"
        if not isinstance(reply, dict) or not isinstance(reply.get("matches"), list):
            raise RemoteError(f"{bad}: expected an object with a 'matches' array")
        out = []
        for rank, m in enumerate(reply["matches"][:k]):
            if not isinstance(m, (list, tuple)) or len(m) < 2:
                raise RemoteError(f"{bad}: match {rank} is not [score, filename, ...]")
            score, name = m[0], m[1]
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                raise RemoteError(f"{bad}: match {rank} has score {score!r}")
            if not isinstance(name, str) or not name:
                raise RemoteError(f"{bad}: match {rank} has filename {name!r}")
            meta: dict[str, Any] = {}
            meta["url" if name.startswith(("http://", "https://")) else "path"] = name
            h = m[2] if len(m) > 2 else None
            if isinstance(h, str) and h:
                meta["sha256" if _SHA256.match(h) else "filename_hash"] = h
            size = m[4] if len(m) > 4 else None
            if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in size):
                meta["width"], meta["height"] = int(size[0]), int(size[1])
            if len(m) > 3 and isinstance(m[3], int):
                meta["format_bitmask"] = m[3]
            out.append(SearchResult(rank, float(score), meta))
        return out

    def close(self) -> None:
        self.session.close()
