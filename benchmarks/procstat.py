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


def rss_detail() -> dict[str, float]:
    """MB resident: VmRSS, RssAnon (the process' own), RssFile (page cache mapped in)."""
    return status_mb(("VmRSS", "RssAnon", "RssFile"))


def table(rows: list[list], head: list[str]) -> str:
    """A plain-text table for the benchmarks' printouts: first column left-aligned, the rest right."""
    cells = [[str(c) for c in r] for r in [head, *rows]]
    w = [max(len(r[i]) for r in cells) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([fmt(cells[0]), "  ".join("-" * x for x in w), *map(fmt, cells[1:])])


def rss_mb() -> float:
    return status_mb(("VmRSS",))["VmRSS"]


def peak_rss_mb() -> float:
    return status_mb(("VmHWM",))["VmHWM"]
