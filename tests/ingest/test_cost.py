"""A build's cost estimate (images, images/s after the first batch, ETA, faster options) and
the images/s figure of the build summary."""

from __future__ import annotations

import logging


from fixtures.folders import make_folder
from saefe.ingest import cost
from saefe.ingest.build import BuildConfig, BuildSummary, build_index
from saefe.ingest.cost import CostEstimate, format_duration, format_rate


def test_rates_and_durations_are_readable():
    assert [format_rate(x) for x in (0.34, 0.047, 3.44, 340.2)] == ["0.34", "0.047", "3.4", "340"]
    assert [format_duration(s) for s in (42, 600, 5 * 3600, 34 * 86400)] == ["42 s", "10 min", "5.0 h", "34.0 days"]


def test_summary_rate_is_not_rounded_to_zero():
    s = BuildSummary(out="o", count=24, skipped={}, duplicates=0, seconds=80.0, embedded_now=24, index_type="flat",
                     embed_seconds=71.0)
    assert "embedded this run: 24 in 80.0s (0.34 img/s while embedding)" in s.lines()
    done = BuildSummary(out="o", count=24, skipped={}, duplicates=0, seconds=0.1, embedded_now=0, index_type="flat",
                        already_built=True)
    assert "img/s" not in done.lines()[1]


def test_a_days_long_cpu_build_says_so_and_what_is_faster(caplog):
    with caplog.at_level(logging.INFO, logger="saefe.ingest.build"):
        est = CostEstimate(images=1_000_000, device="cpu")
        est.observe(4, 4 / 0.34)
        est.observe(4, 1.0)  # said once
    rec = [r for r in caplog.records if r.name == "saefe.ingest.build"]
    assert len(rec) == 1 and rec[0].levelno == logging.WARNING
    msg = rec[0].getMessage()
    assert "1,000,000 images on cpu" in msg and "0.34 images/s" in msg and "34.0 days" in msg
    assert "--device cuda" in msg and "--clip-server URL" in msg and "--ray" in msg

    on_gpu = CostEstimate(images=10**9, device="cuda")
    on_gpu.observe(64, 1.0)
    assert "--device cuda" not in on_gpu.message and "--ray" in on_gpu.message


def test_short_builds_stay_quiet(caplog):
    with caplog.at_level(logging.INFO, logger="saefe.ingest.build"):
        est = CostEstimate(images=100, device="cpu")
        est.observe(64, 1.0)
    assert est.message and "about 2 s" in est.message
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and r.name == "saefe.ingest.build"]


def test_build_reports_after_its_first_batch(tmp_path, caplog, monkeypatch, saefe_home):
    monkeypatch.setattr(cost, "QUIET_BELOW_S", 0.0)
    make_folder(tmp_path / "imgs", n=5, bad=False)
    with caplog.at_level(logging.INFO, logger="saefe.ingest.build"):
        s = build_index(BuildConfig(images=str(tmp_path / "imgs"), out=str(tmp_path / "o"), progress=False))
    msgs = [r.getMessage() for r in caplog.records if "images/s on the first batch" in r.getMessage()]
    assert len(msgs) == 1 and msgs[0].startswith("embedding 5 images on ")
    assert s.embedded_now == 5 and s.embed_seconds > 0 and "img/s while embedding" in s.lines()[1]
