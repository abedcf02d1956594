"""Embed through a running clip_server (osmarks/meme-search-engine's protocol, or ``saefe serve-clip``).

``ClipServerEncoder(url)`` has the same interface as the local ``SiglipEncoder``: ``.info`` (from
``GET /config``), ``.embed_images(list[PIL.Image])`` and ``.embed_texts(list[str])``, both returning
``(n, d)`` float32 L2-normalised arrays.

Wire protocol: ``POST /`` with a msgpack map ``{"text": [str, ...]}`` or ``{"images": [bytes, ...]}``
(at most ``batch`` items, each image the bytes of an encoded image file); the reply is a msgpack
array with one item per input, the raw little-endian float16 bytes of the embedding. Errors come
back as status 500 with a msgpack string.

Images are sent losslessly (PNG) at full size so that an index built through the server equals one
built locally with the same model. Transient failures (connection errors, timeouts, 502/503/504)
are retried with bounded exponential backoff; everything else fails at once with a one-line
``RemoteError``.
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
from typing import Any, Callable, Sequence

import numpy as np

from saefe.errors import IncompatibleError, RemoteError
from saefe.manifest import EncoderInfo

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({502, 503, 504})
# PIL modes a PNG holds without loss; anything else is converted to RGB before sending.
_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def _short(e: BaseException) -> str:
    """One line from a requests exception (they nest urllib3 reprs several levels deep)."""
    import requests

    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    m = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", msg)
    if m:
        return m.group(1).strip()
    if isinstance(e, requests.Timeout):
        return "timed out"
    return msg if len(msg) <= 240 else msg[:237] + "..."


def _tries(n: int) -> str:
    return "" if n == 1 else f" (tried {n} times)"


def request_with_retries(
    send: Callable[[], Any],
    *,
    what: str,
    url: str,
    retries: int,
    backoff: float,
    max_backoff: float,
    sleep: Callable[[float], None] | None = None,
):
    """Call ``send()`` (returns a requests.Response) retrying transient failures.

    Retries connection errors, timeouts, cut-off replies and 502/503/504 up to ``retries`` times with exponential
    backoff (``backoff * 2**attempt`` seconds, capped at ``max_backoff``). Returns the last
    response for any other status; raises RemoteError when the server stays unreachable.
    """
    import requests

    attempt = 0
    while True:
        try:
            resp = send()
        except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema) as e:
            raise RemoteError(f"invalid {what} URL {url}: {_short(e)}") from None
        except requests.RequestException as e:  # connection refused/reset, timeout, cut-off reply
            if attempt >= retries:
                raise RemoteError(
                    f"cannot reach {what} at {url}: {_short(e)}{_tries(attempt + 1)}"
                ) from None
            err = _short(e)
        else:
            if resp.status_code not in RETRY_STATUS:
                return resp
            if attempt >= retries:
                raise RemoteError(
                    f"{what} at {url} is unavailable: HTTP {resp.status_code}{_tries(attempt + 1)}"
                )
            err = f"HTTP {resp.status_code}"
        delay = min(max_backoff, backoff * (2**attempt))
        log.warning("%s at %s: %s; retrying in %.2fs", what, url, err, delay)
        (sleep or time.sleep)(delay)
        attempt += 1


def image_to_png_bytes(image) -> bytes:
    """Lossless bytes of a PIL image (PNG, fast compression)."""
    if image.mode not in _PNG_MODES:
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class ClipServerEncoder:
    """A remote clip_server behind the local encoder's interface."""

    def __init__(
        self,
        url: str,
        *,
        expected_dim: int | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        backoff: float | None = None,
        max_backoff: float | None = None,
        max_request_bytes: int = 32 * 2**20,
        session=None,
        sleep: Callable[[float], None] | None = None,
    ):
        import requests

        if not url or not url.startswith(("http://", "https://")):
            raise RemoteError(f"clip_server URL must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.timeout = float(timeout if timeout is not None else _env_float("SAEFE_REMOTE_TIMEOUT", 120.0))
        self.retries = int(retries if retries is not None else _env_float("SAEFE_REMOTE_RETRIES", 4))
        self.backoff = float(backoff if backoff is not None else _env_float("SAEFE_REMOTE_BACKOFF", 0.5))
        self.max_backoff = float(max_backoff if max_backoff is not None else 8.0)
        self.max_request_bytes = int(max_request_bytes)
        self.session = session or requests.Session()
        self._sleep = sleep or time.sleep
        self.config = self._fetch_config()
        try:
            self.batch = int(self.config["batch"])
            dim = int(self.config["embedding_size"])
            size = self.config.get("image_size", (0, 0))
            if isinstance(size, (int, float)):
                size = (size, size)
            image_size = tuple(int(x) for x in size)
            if len(image_size) != 2:
                raise ValueError("image_size must be [h, w]")
            model = str(self.config.get("model", self.url))
        except (KeyError, TypeError, ValueError) as e:
            raise RemoteError(
                f"clip_server at {self.url} sent a malformed /config ({type(e).__name__}: {e}): {self.config!r:.200}"
            ) from None
        if self.batch < 1 or dim < 1:
            raise RemoteError(f"clip_server at {self.url} sent a malformed /config: batch {self.batch}, embedding_size {dim}")
        if expected_dim is not None and int(expected_dim) != dim:
            raise IncompatibleError(
                f"clip_server at {self.url} ({model}) embeds to dimension {dim}, expected {int(expected_dim)}"
            )
        self.expected_dim = dim
        self.info = EncoderInfo(model_id=model, embedding_dim=dim, image_size=image_size)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"ClipServerEncoder({self.url!r}, model={self.info.model_id!r}, dim={self.info.embedding_dim})"

    # -- transport ---------------------------------------------------------------------------
    def _retrying(self, send):
        return request_with_retries(
            send, what="clip_server", url=self.url, retries=self.retries,
            backoff=self.backoff, max_backoff=self.max_backoff, sleep=self._sleep,
        )

    def _fetch_config(self) -> dict:
        import msgpack

        resp = self._retrying(lambda: self.session.get(self.url + "/config", timeout=self.timeout))
        if resp.status_code != 200:
            raise RemoteError(
                f"clip_server at {self.url} answered GET /config with HTTP {resp.status_code}: {self._error_text(resp)}"
            )
        try:
            cfg = msgpack.unpackb(resp.content, raw=False)
        except Exception as e:  # noqa: BLE001 - any decode failure is a malformed reply
            raise RemoteError(f"clip_server at {self.url} sent a /config that is not msgpack ({type(e).__name__})") from None
        if not isinstance(cfg, dict):
            raise RemoteError(f"clip_server at {self.url} sent a /config that is not a map: {cfg!r:.200}")
        return cfg

    @staticmethod
    def _error_text(resp) -> str:
        """The server's msgpack error string, else the start of the body as text."""
        import msgpack

        try:
            msg = msgpack.unpackb(resp.content, raw=False)
            if isinstance(msg, bytes):
                msg = msg.decode("utf-8", "replace")
            text = msg if isinstance(msg, str) else repr(msg)
        except Exception:  # noqa: BLE001
            text = resp.content[:300].decode("utf-8", "replace")
        text = " ".join(text.split()) or "(empty body)"
        return text if len(text) <= 300 else text[:297] + "..."

    def _post(self, key: str, items: list) -> np.ndarray:
        import msgpack

        body = msgpack.packb({key: items}, use_bin_type=True)
        resp = self._retrying(
            lambda: self.session.post(
                self.url + "/", data=body, timeout=self.timeout,
                headers={"Content-Type": "application/msgpack"},
            )
        )
        if resp.status_code != 200:
            raise RemoteError(
                f"clip_server at {self.url} failed to embed {len(items)} {key} "
                f"(HTTP {resp.status_code}): {self._error_text(resp)}"
            )
        try:
            reply = msgpack.unpackb(resp.content, raw=False)
        except Exception as e:  # noqa: BLE001
            raise RemoteError(f"clip_server at {self.url} sent a reply that is not msgpack ({type(e).__name__})") from None
        return self._decode(reply, len(items))

    def _decode(self, reply, n: int) -> np.ndarray:
        d = self.expected_dim
        if not isinstance(reply, (list, tuple)):
            raise RemoteError(f"clip_server at {self.url} sent a {type(reply).__name__} instead of an array of embeddings")
        if len(reply) != n:
            raise RemoteError(f"clip_server at {self.url} returned {len(reply)} embeddings for {n} inputs")
        out = np.empty((n, d), np.float32)
        for i, item in enumerate(reply):
            if not isinstance(item, (bytes, bytearray)):
                raise RemoteError(f"clip_server at {self.url} sent embedding {i} as {type(item).__name__}, not float16 bytes")
            if len(item) != 2 * d:
                got = f"{len(item) / 2:g}"
                raise RemoteError(
                    f"clip_server at {self.url} returned an embedding of size {got}, expected {d} "
                    f"(embedding_size from its /config)"
                )
            out[i] = np.frombuffer(item, dtype="<f2").astype(np.float32)
        if not np.isfinite(out).all():
            raise RemoteError(f"clip_server at {self.url} returned non-finite values (NaN/inf) in its embeddings")
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        if (norms < 1e-6).any():
            raise RemoteError(f"clip_server at {self.url} returned an all-zero embedding")
        return out / norms  # fp16 rounding leaves |v| slightly off 1

    def _chunks(self, items: list, sizes: Sequence[int]):
        """Split into requests of at most ``batch`` items and about ``max_request_bytes``."""
        start, total = 0, 0
        for i, s in enumerate(sizes):
            if i > start and (i - start >= self.batch or total + s > self.max_request_bytes):
                yield items[start:i]
                start, total = i, 0
            total += s
        if start < len(items):
            yield items[start:]

    def _embed(self, key: str, items: list, sizes: Sequence[int]) -> np.ndarray:
        if not items:
            return np.zeros((0, self.expected_dim), np.float32)
        parts = [self._post(key, chunk) for chunk in self._chunks(items, sizes)]
        return np.concatenate(parts)

    # -- encoder interface -------------------------------------------------------------------
    def embed_images(self, images: Sequence) -> np.ndarray:
        """Embed PIL images (sent as lossless PNG)."""
        return self.embed_image_bytes([image_to_png_bytes(im) for im in images])

    def embed_image_bytes(self, blobs: Sequence[bytes]) -> np.ndarray:
        """Embed already-encoded image files (PNG/JPEG/... bytes) as they are."""
        blobs = [bytes(b) for b in blobs]
        return self._embed("images", blobs, [len(b) for b in blobs])

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        texts = [str(t) for t in texts]
        return self._embed("text", texts, [len(t.encode("utf-8")) for t in texts])

    def close(self) -> None:
        self.session.close()
