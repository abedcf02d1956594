"""An engine that follows its index: a running app or server picks up an update without a restart.

``LiveEngine.engine`` returns the current Engine. At most every ``check_every`` seconds it stats
the index's manifest.json (one syscall); when the file changed (an update switched generation,
``saefe labels`` recorded an SAE...) it opens a fresh Engine with the same arguments and swaps
the reference. Each Engine reads only the generation its manifest named, and an update writes a
generation completely before switching the manifest (saefe.ingest.generation), so a request sees
the old index or the new one, never a half-written one. A failed reopen keeps the old engine
serving and is reported by ``reload()``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

CHECK_EVERY = 2.0


class LiveEngine:
    def __init__(self, opener: Callable[[], Any], index_dir: str | os.PathLike | None = None,
                 check_every: float = CHECK_EVERY, engine=None):
        self._open = opener
        self._engine = engine if engine is not None else opener()
        self.index_dir = Path(index_dir) if index_dir is not None else Path(self._engine.store.dir)
        self.check_every = float(check_every)
        self._stamp = self._manifest_stamp()
        self._checked = time.monotonic()
        self._lock = threading.Lock()  # one reopen at a time; readers never wait on it
        self.last_error: str | None = None
        self.reloads = 0

    @classmethod
    def static(cls, engine) -> "LiveEngine":
        """A fixed engine (tests, remote backends): never reopened by the watch."""
        live = cls(lambda: engine, getattr(getattr(engine, "store", None), "dir", None) or ".", check_every=float("inf"),
                   engine=engine)
        return live

    @classmethod
    def follow(cls, engine, check_every: float = CHECK_EVERY) -> "LiveEngine":
        """Follow ``engine``'s index (reopened with the arguments it was opened with); an engine
        not made by Engine.open, or one over a remote backend, stays as it is."""
        if getattr(engine, "_open_args", None) is None or getattr(engine, "backend", None) is not None:
            return cls.static(engine)
        return cls(engine.reopen, engine.store.dir, check_every=check_every, engine=engine)

    def _manifest_stamp(self) -> tuple | None:
        try:
            st = os.stat(self.index_dir / "manifest.json")
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    @property
    def engine(self):
        if self.check_every != float("inf") and time.monotonic() - self._checked >= self.check_every:
            self._checked = time.monotonic()
            if self._manifest_stamp() != self._stamp:
                self.reload()
        return self._engine

    @property
    def generation(self) -> int:
        store = getattr(self._engine, "store", None)
        return int(getattr(store, "generation", 0)) if store is not None else 0

    def reload(self, force: bool = False) -> dict[str, Any]:
        """Reopen the engine if the manifest changed (or always, with ``force``); returns the
        generation and size now served, whether it changed, and the error if the reopen failed."""
        if not self._lock.acquire(blocking=False):  # another thread is reopening: serve the current one
            return self.status(changed=False)
        try:
            stamp = self._manifest_stamp()
            if not force and stamp == self._stamp:
                return self.status(changed=False)
            old_gen = self.generation
            try:
                fresh = self._open()
            except Exception as e:  # noqa: BLE001 - keep serving the index we have
                self.last_error = f"{type(e).__name__}: {e}"
                self._stamp = stamp  # do not retry on every request; the next manifest change retries
                log.warning("could not reopen the index at %s (%s); still serving generation %d",
                            self.index_dir, self.last_error, old_gen)
                return self.status(changed=False)
            self._engine = fresh  # one reference swap: requests in flight keep the engine they hold
            self._stamp = stamp
            self.last_error = None
            self.reloads += 1
            log.info("index %s reloaded: generation %d -> %d, %d images", self.index_dir, old_gen, self.generation,
                     self._engine.n_total)
            return self.status(changed=True)
        finally:
            self._lock.release()

    def status(self, changed: bool = False) -> dict[str, Any]:
        return {"generation": self.generation, "n_total": int(self._engine.n_total), "changed": changed,
                "reloads": self.reloads, "error": self.last_error}


def one_blas_thread_per_request() -> None:
    """Servers run many small searches at once: give each one BLAS thread. A multi-threaded BLAS
    wakes its pool for every tiny product (a 60 x 128 Gram matrix took 15 ms instead of 0.01 ms
    on a busy 2-core host); parallelism comes from the concurrent requests instead."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # then the environment (OPENBLAS_NUM_THREADS=1) is the way
        log.debug("threadpoolctl not installed; BLAS threads left as they are")
        return
    threadpool_limits(1, user_api="blas")
