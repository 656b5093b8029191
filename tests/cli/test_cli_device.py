"""`--device`: one device, a comma-separated list or cuda:all, checked before the model is read."""

import pytest
import torch

from rptq.cli import main
from tests.cli.test_cli_errors import assert_one_line_error


def calibrate(capsys, model_dir, out, device, calib_args=()):
    code = main(["calibrate", str(model_dir), "--device", device, "-o", str(out), *calib_args])
    return code, capsys.readouterr().err


def test_device_cuda_without_a_cuda_build(capsys, model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    code, err = calibrate(capsys, model_dir, tmp_path / "p", "cuda")
    assert_one_line_error(code, err, "--device cuda needs a CUDA build of torch")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("cuda:3", "cuda:3 is not available: this machine has 2 CUDA devices"),
        ("cuda:0,cuda:1,cuda:2", "cuda:2 is not available"),
        ("cuda:all,cuda:0", "cuda:all stands alone"),
        ("gpu0", "'gpu0' is not a device; use cpu, cuda, cuda:N"),
    ],
)
def test_device_list_errors(capsys, model_dir, tmp_path, monkeypatch, device, message):
    # a CUDA build with two GPUs, as parsing sees it (no device is touched before the error)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    code, err = calibrate(capsys, model_dir, tmp_path / "p", device)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "p").exists()


def test_device_list_of_cpus_writes_the_one_device_plan(capsys, model_dir, tmp_path, calib_args):
    for name, device in (("one", "cpu"), ("three", "cpu,cpu,cpu")):
        code, err = calibrate(capsys, model_dir, tmp_path / name, device, calib_args)
        assert code == 0, err
    for file in ("plan.json", "tensors.safetensors"):
        assert (tmp_path / "one" / file).read_bytes() == (tmp_path / "three" / file).read_bytes()
