"""Helpers the benchmarks share: paths, measured subprocesses, machine facts, RESULTS.md sections.

Every heavy step runs in its own subprocess so its peak RSS is its own (os.wait4 returns the
child's rusage; RUSAGE_CHILDREN would report the maximum over all children so far). A watchdog
kills a child whose resident memory passes a limit: the machine is shared with other engineers'
test runs, and an out-of-memory kill could hit one of theirs instead of ours.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench" / ".cache"
RESULTS = REPO / "bench" / "RESULTS.md"
TINY_MODEL = CACHE / "opt-tiny-lm"
SHARED = REPO.parent / "shared"
PYTHON = sys.executable
RPTQ_EXPORT = str(Path(sys.executable).with_name("rptq-export"))
POLL_S = 0.2


def default_model() -> Path:
    """../shared/models/<first dir> when staged, else the trained tiny model."""
    models = SHARED / "models"
    if models.is_dir():
        dirs = sorted(p for p in models.iterdir() if p.is_dir())
        if dirs:
            return dirs[0]
    return TINY_MODEL


def require_model(path: Path) -> Path:
    """Exit with the command that makes the tiny model when `path` is missing."""
    if (path / "config.json").is_file():
        return path
    sys.exit(
        f"error: no model at {path}. Make the tiny one with\n"
        "  python bench/train_tiny_lm.py tokenize --data-dir ../shared/data "
        "-o bench/.cache/train_tokens.npy\n"
        "  python bench/train_tiny_lm.py train bench/.cache/train_tokens.npy "
        "-o bench/.cache/opt-tiny-lm --device cuda --minutes 2.5 --steps 1500 --batch 32"
    )


def shown(path: Path) -> str:
    """`path` relative to the repository when inside it (reports stay machine-independent)."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def default_data_dir() -> Path:
    """$RPTQ_DATA_DIR, else ../shared/data (the CLI's own default order)."""
    return Path(os.environ.get("RPTQ_DATA_DIR") or SHARED / "data")


@dataclass(frozen=True)
class Measured:
    """Outcome of one measured subprocess."""

    command: list[str]
    returncode: int
    elapsed_s: float
    peak_rss_bytes: int
    stdout: str
    stderr: str
    killed_for_memory: bool = False
    cpu_s: float = 0.0  # user + system CPU time of the child: less sensitive to load than wall
    load_1min: float = 0.0  # /proc/loadavg when the child ended

    @property
    def ok(self) -> bool:
        """Whether the command exited with status 0."""
        return self.returncode == 0

    def error_line(self) -> str:
        """The last meaningful stderr line, for a table cell."""
        if self.killed_for_memory:
            return f"killed by the bench at {self.peak_rss_bytes / 2**30:.1f} GiB RSS"
        lines = [ln.strip() for ln in self.stderr.splitlines() if ln.strip()]
        return lines[-1][:300] if lines else f"exit code {self.returncode}"


def _tree_rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and its descendants (Linux /proc)."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        pending += [int(c) for c in children]
    return total


def run_measured(
    command: Sequence[str], memory_limit_bytes: int, log_dir: Path, name: str
) -> Measured:
    """Run `command`, return wall time and peak RSS; kill it above `memory_limit_bytes`.

    stdout/stderr go to files under `log_dir` (pipes could fill and block a long child).
    The child's ru_maxrss starts at the calling process's own peak RSS (Linux keeps the
    high-water mark across vfork + exec: with torch imported here, `python -c pass` reports
    0.2 GiB), so callers should measure before importing anything heavy.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
    killed = False
    with open(out_path, "w") as out, open(err_path, "w") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(list(command), stdout=out, stderr=err, cwd=REPO)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if _tree_rss_bytes(proc.pid) > memory_limit_bytes:
                killed = True
                proc.send_signal(signal.SIGKILL)
            time.sleep(POLL_S)
        elapsed = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Measured(
        list(command),
        proc.returncode,
        elapsed,
        usage.ru_maxrss * 1024,
        out_path.read_text(),
        err_path.read_text(),
        killed,
        usage.ru_utime + usage.ru_stime,
        float(Path("/proc/loadavg").read_text().split()[0]),
    )


def machine_lines() -> list[str]:
    """CPU model, cores, RAM, date, tool versions and load: the context every number needs."""
    import onnxruntime
    import torch

    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    date = subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return [
        f"- machine: {cpu}, {os.cpu_count()} cores, {mem_kib / 2**20:.1f} GiB RAM, no GPU",
        f"- date: {date}",
        f"- python {platform.python_version()}, torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}",
        f"- load average when the report was written: {load} (the machine is shared with "
        "concurrent test runs, so timings are noisy)",
    ]


def utc_now() -> str:
    """ISO timestamp for log lines."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def gib(size_bytes: float) -> str:
    """Bytes as GiB with two decimals."""
    return f"{size_bytes / 2**30:.2f} GiB"


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section between `<!-- name:begin -->` and `<!-- name:end -->`."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else "# rptq benchmark results\n\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = f"{text.rstrip()}\n\n{block}"
    path.write_text(text)


def add_calibration_args(
    parser: argparse.ArgumentParser, model: Path, nsamples: int = 32, seq_len: int = 512
) -> None:
    """--model, --data-dir and the calibration flags (set, windows, length, seed) that the
    quality benchmarks share, with their defaults."""
    parser.add_argument("--model", type=Path, default=model)
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--calib-dataset", default="c4-sample")
    parser.add_argument("--nsamples", type=int, default=nsamples)
    parser.add_argument("--seq-len", type=int, default=seq_len)
    parser.add_argument("--seed", type=int, default=2)
