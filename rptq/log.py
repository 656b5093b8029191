"""Logging and progress for the CLI: stderr only, stdout is reserved for the summary."""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("rptq")


def setup(verbosity: int) -> None:
    """-v: DEBUG, default: INFO, -q: WARNING; one handler on stderr."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    root = logging.getLogger("rptq")
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextmanager
def stage(index: int, total: int, what: str) -> Iterator[None]:
    """Announce `[i/n] what`, then its elapsed time and the peak RSS so far."""
    log.info("[%d/%d] %s", index, total, what)
    started = time.perf_counter()
    yield
    log.info(
        "      done in %.1f s, peak RSS %.2f GiB",
        time.perf_counter() - started,
        peak_rss_bytes() / 2**30,
    )


def human_bytes(size: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.1f} GiB"
