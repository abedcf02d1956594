"""Error handling and input parsing for the page and the API.

User-facing failures (SaefeError) show as a warning toast plus an error line in the page (API
calls get them as ``gr.Error``); anything else is logged with its trace and shown as one line.
The server keeps serving either way.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Callable

import gradio as gr

from saefe.errors import SaefeError, SteeringError
from saefe.serve.app.state import as_feature_id

log = logging.getLogger("saefe.serve.app")


def ok(msg: str) -> str:
    return f"<span class='saefe-ok'>{msg}</span>"


def err(msg: str) -> str:
    return f"<span class='saefe-err'>Error: {msg}</span>"


def message(e: BaseException) -> str:
    if isinstance(e, SaefeError):
        return str(e)
    log.exception("unexpected error in the app")
    return f"internal error ({type(e).__name__}): {e}".splitlines()[0][:300]


def ui_safe(fn: Callable, n_out: int, status_index: int | None = None) -> Callable:
    """Wrap a UI handler: a failure becomes a warning toast + an error line in ``status``
    (output ``status_index``, default the last), the other outputs stay as they were."""

    si = n_out - 1 if status_index is None else status_index

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the page must show a line, not a trace
            msg = message(e)
            gr.Warning(msg, duration=5)
            out = [gr.skip()] * n_out
            out[si] = err(msg)
            return out if n_out > 1 else out[0]

    return wrapper


def api_safe(fn: Callable) -> Callable:
    """Wrap an API endpoint: failures reach the client as ``gr.Error`` with a one-line message."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as e:  # noqa: BLE001
            raise gr.Error(message(e), print_exception=False) from None

    return wrapper


# -- small parsers ------------------------------------------------------------------------


def read_bytes(image) -> bytes:
    if isinstance(image, dict):  # gradio FileData
        image = image.get("path")
    try:
        with open(str(image), "rb") as f:
            return f.read()
    except OSError as e:
        raise SaefeError(f"cannot read the query image: {e.strerror}") from None


def parse_feature_id(value, d_hidden: int | None = None) -> int:
    if isinstance(value, str):
        v = value.strip().lstrip("#fF")
        if not v:
            raise SteeringError("enter a feature id, e.g. f83 or 83")
        try:
            value = int(v)
        except ValueError:
            raise SteeringError(f"feature id must be an integer like f83, got {value.strip()!r}") from None
    f = as_feature_id(value, d_hidden)
    if f is None:
        raise SteeringError("enter a feature id, e.g. f83 or 83")
    return f


def parse_float(value, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SteeringError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise SteeringError(f"{what} must be finite, got {v}")
    return v


def parse_int(value, what: str) -> int:
    try:
        v = float(value)
        if not v.is_integer():
            raise ValueError
        return int(v)
    except (TypeError, ValueError, OverflowError):
        raise SaefeError(f"{what} must be an integer, got {value!r}") from None


def small_k(k) -> int:
    k = parse_int(k, "number of results")
    if not 1 <= k <= 100:
        raise SaefeError(f"number of results must be within [1, 100], got {k}")
    return k

