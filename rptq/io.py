"""Atomic outputs: nothing half-written is ever left at the path the user asked for.

Outputs are written under a temporary name in the destination directory (same filesystem, so
the final rename is atomic) and renamed into place only after they are complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rptq.errors import OutputError


def check_output(path: Path, force: bool) -> None:
    """Refuse an existing output without --force, and an unwritable destination directory."""
    if path.exists() and not force:
        raise OutputError(f"{path} exists; pass --force to overwrite it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise OutputError(f"output directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output directory {parent} is not writable; choose another -o path")


@contextlib.contextmanager
def atomic_directory(path: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` when the block succeeds."""
    check_output(path, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_files(*paths: Path, force: bool = False) -> Iterator[tuple[Path, ...]]:
    """Yield temporary sibling paths; on success rename them onto `paths` in order.

    For ONNX with external data pass (data_file, model_file): the data lands first and the
    model last, so a model file never points at data that is not there yet.
    """
    for path in paths:
        check_output(path, force)
    tmps = tuple(path.with_name(f".{path.name}.{os.getpid()}.tmp") for path in paths)
    try:
        yield tmps
        for tmp, path in zip(tmps, paths, strict=True):
            if tmp.exists():
                os.replace(tmp, path)
    finally:
        for tmp in tmps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
