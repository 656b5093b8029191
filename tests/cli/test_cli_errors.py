"""Bad input gets a one-line error and exit code 1, never a traceback or a partial file."""

import json

import pytest

from rptq.cli import SUBCOMMANDS, main


def run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, pattern):
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert pattern in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_for_every_subcommand(capsys, command):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out


def test_no_arguments_prints_usage(capsys):
    assert main([]) == 2


def test_missing_model_path(capsys, tmp_path):
    code, _, err = run(capsys, ["calibrate", str(tmp_path / "nope"), "-o", str(tmp_path / "p")])
    assert_one_line_error(code, err, "does not exist")


def test_hub_id_offline(capsys, tmp_path):
    code, _, err = run(capsys, ["calibrate", "opt-6.7b", "-o", str(tmp_path / "p")])
    assert_one_line_error(code, err, "huggingface-cli download facebook/opt-6.7b")


def test_unsupported_architecture(capsys, tmp_path):
    model = tmp_path / "llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, _, err = run(capsys, ["calibrate", str(model), "-o", str(tmp_path / "p")])
    assert_one_line_error(code, err, "unsupported architecture llama")


def test_abits_5(capsys, model_dir, tmp_path):
    code, _, err = run(
        capsys, ["calibrate", str(model_dir), "--abits", "5", "-o", str(tmp_path / "p")]
    )
    assert_one_line_error(code, err, "--abits 5")


def test_more_clusters_than_channels(capsys, model_dir, tmp_path, calib_args):
    argv = ["calibrate", str(model_dir), "--abits", "4", "-o", str(tmp_path / "p"), *calib_args]
    argv[argv.index("--clusters") + 1] = "R1=100"
    code, _, err = run(capsys, argv)
    assert_one_line_error(code, err, "R1=100")
    assert not (tmp_path / "p").exists()


def test_unknown_dataset(capsys, model_dir, tmp_path, calib_args):
    argv = ["calibrate", str(model_dir), "--abits", "4", "-o", str(tmp_path / "p"), *calib_args]
    argv[argv.index("--calib-dataset") + 1] = "imagenet"
    code, _, err = run(capsys, argv)
    assert_one_line_error(code, err, "imagenet")


@pytest.mark.parametrize("text", ["", "too short"])
def test_empty_or_short_calibration_text(capsys, model_dir, tmp_path, calib_args, text):
    corpus = tmp_path / "calib.txt"
    corpus.write_text(text)
    argv = ["calibrate", str(model_dir), "--abits", "4", "-o", str(tmp_path / "p"), *calib_args]
    argv[argv.index("--calib-dataset") + 1] = str(corpus)
    code, _, err = run(capsys, argv)
    assert_one_line_error(code, err, "calib.txt")
    assert not (tmp_path / "p").exists()


def test_unknown_eval_dataset(capsys, model_dir, data_dir):
    code, _, err = run(
        capsys, ["eval", str(model_dir), "--datasets", "wikitext3", "--data-dir", str(data_dir)]
    )
    assert_one_line_error(code, err, "wikitext3")


def test_output_exists_without_force(capsys, model_dir, tmp_path, calib_args):
    out = tmp_path / "plan"
    out.mkdir()
    code, _, err = run(capsys, ["calibrate", str(model_dir), "-o", str(out), *calib_args])
    assert_one_line_error(code, err, "--force")


def test_output_directory_not_writable(capsys, model_dir, tmp_path, calib_args, monkeypatch):
    # CI runs as root, which may write anywhere, so the permission answer is simulated.
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr("rptq.io.os.access", lambda path, mode: False)
    code, _, err = run(capsys, ["calibrate", str(model_dir), "-o", str(locked / "p"), *calib_args])
    assert_one_line_error(code, err, "not writable")


def test_output_directory_missing(capsys, model_dir, tmp_path, calib_args):
    code, _, err = run(
        capsys, ["calibrate", str(model_dir), "-o", str(tmp_path / "a" / "b"), *calib_args]
    )
    assert_one_line_error(code, err, "does not exist")


def test_bad_cluster_spec_is_usage_error(capsys, model_dir, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["calibrate", str(model_dir), "--clusters", "R9=3", "-o", str(tmp_path / "p")])
    assert info.value.code == 2
