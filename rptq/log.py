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


class Progress:
    """Progress of a long loop: a tqdm bar on a terminal, else a log line every `every_s`.

    Batch jobs and CI logs have no terminal, where tqdm stays silent; they still get "what is
    done, how long it took, how long is left" as plain lines. Call `update(done, note)` with the
    count done so far.
    """

    def __init__(self, total: int, desc: str, unit: str, every_s: float = 30.0) -> None:
        from tqdm.auto import tqdm

        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self._bar = tqdm(total=total, desc=desc, unit=unit, disable=None)
        self._started = self._logged = time.perf_counter()

    def update(self, done: int, note: str = "") -> None:
        """Record that `done` of `total` are finished; `note` is shown beside the count."""
        if not self._bar.disable:
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(done - self._bar.n)
            return
        now = time.perf_counter()
        if done < self.total and now - self._logged < self.every_s:
            return
        self._logged = now
        elapsed = now - self._started
        left = elapsed / done * (self.total - done) if done else float("nan")
        extra = f", {note}" if note else ""
        log.info(
            "      %s: %d/%d %s, %s elapsed, about %s left%s",
            self.desc,
            done,
            self.total,
            self.unit,
            _duration(elapsed),
            _duration(left),
            extra,
        )

    def close(self) -> None:
        """End the bar (or the last log line)."""
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN: nothing done yet
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
