"""Progress without a terminal: plain log lines with counts, elapsed and remaining time."""

from __future__ import annotations

import logging

from rptq.log import Progress


def test_progress_logs_lines_when_not_on_a_terminal(caplog):
    with caplog.at_level(logging.INFO, logger="rptq"), Progress(4, "export", "parts", 0.0) as bar:
        for done in range(1, 5):
            bar.update(done, f"{done * 10} MiB written")
    lines = [r.getMessage().strip() for r in caplog.records]
    assert len(lines) == 4
    assert lines[0].startswith("export: 1/4 parts, ")
    assert "about" in lines[0]
    assert lines[0].endswith(", 10 MiB written")
    assert lines[-1].startswith("export: 4/4 parts")
    assert "about 0 s left" in lines[-1]


def test_progress_throttles_but_always_logs_the_end(caplog):
    with caplog.at_level(logging.INFO, logger="rptq"), Progress(50, "calibrate", "layers") as bar:
        for done in range(1, 51):
            bar.update(done)
    lines = [r.getMessage().strip() for r in caplog.records]
    assert lines == [lines[-1]]
    assert lines[-1].startswith("calibrate: 50/50 layers")
