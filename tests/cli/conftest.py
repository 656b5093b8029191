"""A tiny OPT saved as a Hugging Face directory, with OPT's real vocabulary size."""

import pytest


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """Tiny random OPT on disk (safetensors); vocab 50272 so OPT's tokenizer ids fit."""
    from rptq.tiny import make_tiny_opt

    path = tmp_path_factory.mktemp("models") / "tiny-opt"
    make_tiny_opt(vocab_size=50272, max_positions=256).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def calib_args(data_dir):
    """Fast calibration flags for the tiny model."""
    return [
        "--calib-dataset",
        "c4-sample",
        "--nsamples",
        "4",
        "--seq-len",
        "64",
        "--clusters",
        "R1=8,R2=4,R3=4,R4=8,R5=16",
        "--data-dir",
        str(data_dir),
        "-q",
    ]


@pytest.fixture(scope="session")
def plan_dir(model_dir, calib_args, tmp_path_factory):
    """A W4A4 plan of the tiny model, calibrated through the CLI once per session."""
    from rptq.cli import main

    out = tmp_path_factory.mktemp("plans") / "w4a4"
    assert (
        main(
            [
                "calibrate",
                str(model_dir),
                "--wbits",
                "4",
                "--abits",
                "4",
                "-o",
                str(out),
                *calib_args,
            ]
        )
        == 0
    )
    return out
