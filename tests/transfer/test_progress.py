import logging

from loader.transfer.progress import ProgressReporter


def test_logs_bytes_rate_and_eta_every_interval(caplog):
    now = [0.0]
    p = ProgressReporter(4 << 30, "rank 0", logging.getLogger("t"), interval_s=5, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="t"):
        now[0] = 1.0
        p.advance(1 << 30)  # before the interval: silent
        now[0] = 5.0
        p.advance(1 << 30)
        now[0] = 6.0
        p.advance(1 << 30)  # within the next interval: silent
    assert [r.getMessage() for r in caplog.records] == [
        "rank 0: 2.00/4.00 GiB (50%), 0.40 GiB/s, ETA 5.0s"
    ]


def test_line_before_any_progress_has_unknown_eta():
    p = ProgressReporter(10, "x", logging.getLogger("t"), clock=lambda: 0.0)
    assert "ETA unknown" in p.line()
