"""The headline command as a new user types it, with nothing but a model in the HF cache.

`rptq-export facebook/opt-125m --abits 4 -o model.onnx`: no --data-dir (the built-in C4 text),
no --device (auto), no --nsamples (capped to what the text holds). The model is a tiny random
OPT under the real hub id in a temporary HF_HOME, with the OPT tokenizer saved beside it as
`save_pretrained` writes it, exactly the files a hub snapshot has. The CLI runs in a fresh
process so that HF_HOME is read the way a user's shell sets it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from rptq.calib_text import BUILTIN_FILE, builtin_documents, default_nsamples

REPO_ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"
CLI = "import sys; from rptq.cli import main; sys.exit(main())"


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, data_dir):
    """HF_HOME/hub/models--facebook--opt-125m/{refs/main, snapshots/<hash>/...}."""
    from rptq.data import load_tokenizer
    from rptq.tiny import make_tiny_opt

    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / "models--facebook--opt-125m"
    snapshot = repo / "snapshots" / SNAPSHOT
    make_tiny_opt(vocab_size=50272, max_positions=64).save_pretrained(snapshot)
    load_tokenizer(None, data_dir).save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return home


def rptq_export(args: list[str], cwd: Path, hf_home: Path, **env: str):
    environ = {k: v for k, v in os.environ.items() if k != "RPTQ_DATA_DIR"}
    environ.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT), **env)
    environ.pop("HF_HUB_CACHE", None)
    return subprocess.run(
        [sys.executable, "-c", CLI, *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_headline_command_runs_with_no_other_flag(hf_home, tmp_path):
    done = rptq_export(["facebook/opt-125m", "--abits", "4", "-o", "model.onnx"], tmp_path, hf_home)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "files:" in out, out
    assert "model.onnx" in out, out
    assert "calibration text: c4-builtin" in out, out
    assert "calibration windows: 128 x 64 tokens" in out, out  # capped: 128 fit in the text
    assert "device: cpu" in out or "device: cuda:0" in out, out
    assert "plan: calibrated in this run, kept in memory" in out, out
    assert (tmp_path / "model.onnx").is_file()
    # the plan print comes before calibration, the estimate after the first layer
    err = done.stderr
    assert err.index("plan: 128 windows x 64 tokens") < err.index("first layer took"), err
    import onnx

    graph_name = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph.name
    # the hub id, not the cache path; the CLI's default graph carries a KV cache
    assert graph_name == "rptq-facebook/opt-125m-with-past"
    assert "kv cache: float32" in out, out


def test_every_way_to_name_the_model_gives_the_hub_id(hf_home, tmp_path):
    """`opt-125m`, `facebook/opt-125m` and the snapshot's own path name the model (graph name,
    plan) as `facebook/opt-125m`; a plain local directory by its own name, not its path."""
    from rptq.model.load import load_model, model_name

    snapshot = next((hf_home / "hub").glob("models--*/snapshots/*"))
    assert model_name("opt-125m", snapshot) == "facebook/opt-125m"
    assert model_name("facebook/opt-125m", snapshot) == "facebook/opt-125m"
    assert load_model(str(snapshot)).name == "facebook/opt-125m"
    local = tmp_path / "somewhere" / "my-opt"
    local.mkdir(parents=True)
    assert model_name(str(local), local) == "my-opt"


def test_builtin_text_is_in_the_package_and_its_default_windows_scale_down():
    docs = builtin_documents()
    assert len(docs) == 320
    assert default_nsamples(156_314, 2048) == 76  # 76 non-overlapping 2048-token windows
    assert default_nsamples(156_314, 64) == 128  # RPTQ's 128 when they fit
    assert default_nsamples(10, 2048) == 1
    readme = (REPO_ROOT / "rptq" / "assets" / "README.md").read_text()
    assert "ODC-BY" in readme
    assert "yxanul/yxanul_0.6B" in readme


@pytest.mark.slow
def test_built_wheel_ships_the_calibration_text(tmp_path):
    """A non-editable install gets the sample: it is package data of the wheel."""
    import shutil

    pytest.importorskip("setuptools")
    source = tmp_path / "src"  # a copy: the build's egg-info and build/ stay out of the checkout
    shutil.copytree(
        REPO_ROOT / "rptq", source / "rptq", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
         str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {done.stderr.strip().splitlines()[-1:]}")
    wheel = next(tmp_path.glob("rptq-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert f"rptq/assets/{BUILTIN_FILE}" in names
    assert "rptq/assets/README.md" in names
