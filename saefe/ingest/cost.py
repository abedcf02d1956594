"""What a build will cost, said once the first batch has been timed.

A full-depth SO400M embeds about a third of an image per second on 2 CPU cores (issue 9): a
folder of a million images is a month. Users should learn that after seconds, not after a
month of silence, and be told what is faster (a GPU, a remote clip_server, a Ray cluster).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("saefe.ingest.build")

# Builds shorter than this say nothing (the progress bar is enough).
QUIET_BELOW_S = 60.0
# Builds longer than this also get suggestions for a faster way.
SUGGEST_ABOVE_S = 20 * 3600.0


def format_rate(images_per_s: float) -> str:
    """``0.34``, ``3.4``, ``340``: enough digits to be non-zero for slow encoders."""
    if images_per_s >= 10:
        return f"{images_per_s:.0f}"
    if images_per_s >= 1:
        return f"{images_per_s:.1f}"
    return f"{images_per_s:.2g}"


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


@dataclass
class CostEstimate:
    """Fed the first timed batch (``observe``); logs images, images/s and ETA once."""

    images: int  # items this run still has to embed
    device: str | None = None  # the local encoder's device; None for a remote clip_server
    remote: bool = False
    done: bool = False
    message: str | None = None

    def observe(self, n: int, seconds: float) -> None:
        if self.done or n <= 0 or seconds <= 0:
            return
        self.done = True
        rate = n / seconds
        eta = self.images / rate
        where = "through the clip_server" if self.remote else f"on {self.device or 'this machine'}"
        msg = (f"embedding {self.images:,} images {where}: {format_rate(rate)} images/s on the first batch "
               f"of {n}, so about {format_duration(eta)}")
        if eta > SUGGEST_ABOVE_S:
            msg += "; faster: " + "; ".join(self.suggestions())
        self.message = msg
        if eta >= QUIET_BELOW_S:
            (log.warning if eta > SUGGEST_ABOVE_S else log.info)(msg)
        else:
            log.debug(msg)

    def suggestions(self) -> list[str]:
        out = []
        if not self.remote and not str(self.device or "").startswith("cuda"):
            out.append("a GPU (`--device cuda`)")
        out.append("a clip_server on a GPU machine (`--clip-server URL`, see `saefe serve-clip`)")
        out.append("a Ray cluster (`--ray`)")
        out.append("the build resumes where it stops, so it can also be run in parts")
        return out
