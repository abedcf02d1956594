"""Memory figures of this process for the benchmarks, from /proc/self/status (Linux): resident
set (VmRSS), its anonymous part (RssAnon: the process' own) and file-backed part (RssFile: page
cache mapped in, reclaimable and shared), and the peak (VmHWM: unlike getrusage's ru_maxrss it is
not inherited from the parent across exec)."""

from __future__ import annotations

KEYS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def status_mb(keys=KEYS) -> dict[str, float]:
    """{key: MB} for the /proc/self/status lines named in ``keys`` (NaN where absent)."""
    out = {k: float("nan") for k in keys}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in out:
                out[key] = int(line.split()[1]) / 1024
    return out


def rss_mb() -> float:
    return status_mb(("VmRSS",))["VmRSS"]


def peak_rss_mb() -> float:
    return status_mb(("VmHWM",))["VmHWM"]
