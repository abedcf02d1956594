"""Start or join Ray, size the stages to what the cluster has, and turn failures into one line.

``local`` starts a private Ray on this machine (``ray.init(num_cpus=...)``) and stops it after
the build; ``auto`` joins the cluster this machine belongs to (``ray start --head`` / worker);
``ray://host:port`` joins a remote one through Ray Client. A session that is already connected
(tests share one per module) is reused and left running.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from saefe.errors import SaefeError

log = logging.getLogger(__name__)

# Passed to every worker: offline hub access and the model home, as this process has them.
_ENV_KEYS = ("SAEFE_HOME", "SAEFE_ALLOW_DOWNLOAD", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")


@dataclass
class RayConfig:
    address: str = "local"  # local | auto | ray://host:port
    num_cpus: int | None = None  # local only: CPUs Ray may use (default: all)
    num_gpus: int | None = None  # local only (default: what Ray detects)
    object_store_memory: int | None = None  # local only, bytes (default: Ray's, 30% of RAM)
    embed_batch_size: int = 0  # rows per model call; 0 = 256 on GPUs, 64 on CPUs
    # items per decode task (a chunk is cut into tasks; it commits whole). 512, not 128: fewer,
    # longer tasks; on 2 CPUs a 12k-image build takes 25.0 s instead of 31.7 s (bench_ray_build.py)
    task_size: int = 512
    decode_actors: int = 0  # 0 = every CPU not taken by a CPU model actor
    fused: bool | None = None  # CPU-only clusters: decode and embed in one actor (default yes)
    fault: dict | None = None  # tests: see mapper.DecodePreprocess


@dataclass
class Cluster:
    cpus: int
    gpus: int
    started_here: bool


def _runtime_env() -> dict:
    """A remote cluster's workers get the offline settings and this saefe package shipped."""
    env = {k: os.environ[k] for k in _ENV_KEYS if k in os.environ}
    return {"env_vars": env, "py_modules": [str(Path(__file__).resolve().parents[2])]}


@contextmanager
def _checkout_on_path() -> Iterator[None]:
    """While a local Ray starts: this checkout first on PYTHONPATH, so its workers import this
    saefe whatever is installed. A local raylet and its workers inherit this process' environment
    (the offline settings included), so no runtime env is needed: one would cost every worker
    process ~0.4 s to set up (bench_ray_build.py, 2 CPUs: two actors ready in 0.73 s with one, 0.32 s
    without)."""
    root = str(Path(__file__).resolve().parents[3])
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([root, *[p for p in (old or "").split(os.pathsep) if p]])
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def connect(rc: RayConfig) -> Cluster:
    """Connect (or start) and report the cluster's CPUs and GPUs."""
    try:
        import ray
    except ImportError:
        raise SaefeError('--ray needs Ray: pip install -e ".[distributed]"') from None
    if os.environ.get("SAEFE_RAY_LOGS") != "1":  # Ray Data's per-run INFO lines and stats
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    started = False
    if not ray.is_initialized():
        local = rc.address == "local"
        kw = dict(include_dashboard=False, logging_level=logging.WARNING,
                  log_to_driver=os.environ.get("SAEFE_RAY_LOGS") == "1")
        try:
            if local:
                with _checkout_on_path():
                    ray.init(num_cpus=rc.num_cpus, num_gpus=rc.num_gpus, object_store_memory=rc.object_store_memory, **kw)
            else:
                ray.init(address=rc.address, runtime_env=_runtime_env(), **kw)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise SaefeError(f"cannot reach the Ray cluster at {rc.address!r}: {str(e).splitlines()[0][:200]}") from None
        started = True
    res = ray.cluster_resources()
    return Cluster(int(res.get("CPU", 1)), int(res.get("GPU", 0)), started)


@contextmanager
def session(rc: RayConfig) -> Iterator[Cluster]:
    cluster = connect(rc)
    try:
        yield cluster
    finally:
        if cluster.started_here:
            import ray

            ray.shutdown()


def failure(exc: BaseException, committed: int, total: int, first_missing: int | None) -> SaefeError:
    """One line: what failed, how much is safe on disk, how to resume."""
    inner = exc
    while getattr(inner, "cause", None) is not None or inner.__cause__ is not None:  # Ray wraps errors
        inner = getattr(inner, "cause", None) or inner.__cause__
    detail = (str(inner).strip().splitlines() or [""])[0]
    where = f" at shard {first_missing}" if first_missing is not None else ""
    return SaefeError(
        f"the Ray build stopped{where} ({type(inner).__name__}: {detail[:240]}); {committed} of {total} "
        "shards of this run are committed; run the same command again to resume"
    )

