"""Faults from outside: Ctrl-C and SIGKILL in the middle of calibration and of export, a full
disk, an unwritable destination. The CLI runs in a child process (a signal or a file-size limit
must not hit pytest); the output name must not exist afterwards and a temporary of it is left
only where SIGKILL gave the process no chance to clean up (docs/errors.md)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rptq.cli import main

REPO_ROOT = Path(__file__).resolve().parents[2]
CLI = "import sys; from rptq.cli import main; sys.exit(main())"


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory):
    """48 thin layers: export and calibration take long enough to be interrupted mid-way."""
    from rptq.tiny import make_tiny_opt

    path = tmp_path_factory.mktemp("models") / "deep-opt"
    make_tiny_opt(num_layers=48, vocab_size=50272, max_positions=256).save_pretrained(path)
    return path


def start(args: list[str], cwd: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", CLI, *args], cwd=cwd, env=env, stderr=subprocess.PIPE, text=True,
        **popen,
    )  # fmt: skip


def wait_for(proc: subprocess.Popen, marker: str) -> str:
    """stderr up to the first line holding `marker` (the stage the signal must land in)."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            return "".join(seen)
    proc.wait()
    pytest.fail(f"the run ended (code {proc.returncode}) before {marker!r}: {''.join(seen)}")


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
@pytest.mark.parametrize("stage", ["calibration", "export"])
def test_signal_mid_run_leaves_no_output(sig, stage, deep_model, data_dir, tmp_path):
    if stage == "calibration":
        args = [str(deep_model), "--abits", "4", "--nsamples", "8", "--seq-len", "128",
                "--clusters", "R1=8,R2=4,R3=4,R4=8,R5=16", "--data-dir", str(data_dir),
                "-o", "out.onnx"]  # fmt: skip
        marker = "first layer took"
    else:
        args = ["export", str(deep_model), "-o", "out.onnx"]
        marker = "[2/2] exporting"
    proc = start(args, tmp_path)
    wait_for(proc, marker)
    proc.send_signal(sig)
    rest = proc.stderr.read()
    code = proc.wait(timeout=120)
    assert not (tmp_path / "out.onnx").exists()
    assert not (tmp_path / "out.onnx.data").exists()
    if sig == signal.SIGINT:
        assert code == 130, rest
        assert rest.strip().splitlines()[-1] == "interrupted", rest
        assert names(tmp_path) == [], "Ctrl-C must clean up its temporaries"
    else:
        assert code == -signal.SIGKILL
        # SIGKILL cannot be caught: only hidden temporaries may remain, never the output name
        assert all(name.startswith(".out.onnx.") for name in names(tmp_path)), names(tmp_path)


def test_full_disk_is_one_line_and_leaves_nothing(model_dir, tmp_path):
    """RLIMIT_FSIZE 1 MiB stands in for a full disk (same OSError path: EFBIG vs ENOSPC)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))

    proc = start(["export", str(model_dir), "-o", "out.onnx", "-q"], tmp_path, preexec_fn=limit)
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 1, err
    assert err.strip() == (
        "error: could not write out.onnx (File too large); check free space and permissions"
    )
    assert names(tmp_path) == []


def test_unwritable_destination(model_dir, tmp_path, capsys):
    """chmod 0o500; root ignores modes, so there the check is skipped with its reason."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: directory modes do not stop writes")
        assert main(["export", str(model_dir), "-o", str(locked / "out.onnx")]) == 1
        err = capsys.readouterr().err.strip()
        assert err == f"error: output directory {locked} is not writable; choose another -o path"
        assert names(locked) == []
    finally:
        locked.chmod(0o700)


def test_interrupt_reported_as_a_library_error_still_exits_130(monkeypatch, tmp_path, capsys):
    """A SIGINT inside a native call can surface as another error (safetensors' reader turned
    one into a TypeError that rptq reported as an unreadable checkpoint, exit 1): the exit code
    follows the signal."""
    from rptq import cli, commands
    from rptq.errors import ModelError

    def interrupted_read(_args):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs at the next bytecode boundary
                pass
        except KeyboardInterrupt:
            raise ModelError("cannot read x from y (...): re-download the checkpoint") from None
        raise AssertionError("SIGINT was not delivered")

    monkeypatch.setattr(commands, "cmd_export", interrupted_read)
    code = cli.main(["export", str(tmp_path / "model"), "-o", str(tmp_path / "out.onnx")])
    assert code == 130
    assert "interrupted" in capsys.readouterr().err
