"""`rptq-export generate` and the output folder through the CLI (in-process `main`)."""

import json

import numpy as np
import pytest

from rptq.cli import main

PROMPT = "Hello there, my name is"


@pytest.fixture(scope="module")
def past_folder(model_dir, data_dir, tmp_path_factory):
    """The tiny model's FP with-past graph as an output folder (tokenizer included)."""
    from rptq.exporter.options import ExportOptions
    from rptq.model.load import load_model
    from rptq.stack_folder import export_folder

    folder = tmp_path_factory.mktemp("gen-cli") / "out"
    export_folder(load_model(str(model_dir)), None, folder, ExportOptions(past=True), data_dir)
    return folder


def run_json(argv, capsys) -> dict:
    code = main([*argv, "--json", "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_generate_json_summary(past_folder, capsys):
    from rptq.runtime.decode import DecoderSession, greedy
    from rptq.runtime.ort import make_session

    summary = run_json(
        ["generate", str(past_folder), "--prompt", PROMPT, "--max-new-tokens", "12"], capsys
    )
    assert summary["sampling"] == "greedy"
    assert summary["prompt ids"][0] == 2  # OPT's "</s>" first, as transformers tokenizes
    assert summary["prompt tokens"] == len(summary["prompt ids"])
    decoder = DecoderSession(make_session(past_folder / "model.onnx"))
    want = greedy(decoder, np.array([summary["prompt ids"]]), None, 12)[0].tolist()
    # the CLI stops at eos; the plain greedy loop does not
    assert summary["new ids"] == want[: len(summary["new ids"])]
    assert summary["new tokens"] == len(summary["new ids"])
    assert summary["text"].startswith(PROMPT)
    assert summary["prefill tokens/s"] > 0
    assert summary["decode tokens/s"] >= 0
    assert summary["cache dtype"] == "float32"
    assert summary["cache bytes/token"] == 2 * 2 * 64 * 4  # K and V, 2 layers, hidden 64, fp32
    assert summary["cache MiB at 2048 tokens"] == pytest.approx(1024 * 2048 / 2**20, abs=0.01)


def test_generate_text_output_lists_the_speeds(past_folder, capsys):
    assert (
        main(
            [
                "generate",
                str(past_folder / "model.onnx"),
                "--prompt",
                PROMPT,
                "-q",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"text: {PROMPT}")
    keys = [line.split(":")[0] for line in out]
    for key in ("prefill tokens/s", "decode tokens/s", "cache bytes/token"):
        assert key in keys


def test_sampling_is_seeded(past_folder, capsys):
    args = [
        "generate",
        str(past_folder),
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        "8",
        "--temperature",
        "1.0",
        "--top-p",
        "0.95",
    ]
    first = run_json([*args, "--seed", "5"], capsys)
    again = run_json([*args, "--seed", "5"], capsys)
    assert first["sampling"] == "temperature 1.0, top-p 0.95, seed 5"
    assert first["new ids"] == again["new ids"]


def test_greedy_and_temperature_clash(past_folder, capsys):
    code = main(["generate", str(past_folder), "--prompt", PROMPT, "--greedy", "--top-p", "0.9"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err == "error: --greedy takes the arg-max; drop --temperature/--top-p, or --greedy"


def test_export_to_a_folder(model_dir, data_dir, tmp_path, capsys):
    """`export -o DIR/`: model.onnx and the side files, listed in the summary; no temporary."""
    folder = tmp_path / "out"
    summary = run_json(
        ["export", str(model_dir), "-o", f"{folder}/", "--data-dir", str(data_dir)], capsys
    )
    names = {p.name for p in folder.iterdir()}
    assert {
        "model.onnx",
        "config.json",
        "generation_config.json",
        "rptq_plan.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names
    listed = {line.split(" (")[0] for line in summary["files"]}
    assert listed == {str(folder / n) for n in names}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_into_an_empty_existing_folder(model_dir, data_dir, tmp_path, capsys):
    folder = tmp_path / "out"
    folder.mkdir()
    run_json(["export", str(model_dir), "-o", str(folder), "--data-dir", str(data_dir)], capsys)
    assert (folder / "model.onnx").is_file()
    assert (folder / "config.json").is_file()


def test_model_onnx_gets_its_side_files(model_dir, data_dir, tmp_path, capsys):
    run_json(
        ["export", str(model_dir), "-o", str(tmp_path / "model.onnx"), "--data-dir", str(data_dir)],
        capsys,
    )
    assert (tmp_path / "config.json").is_file()
    assert (tmp_path / "rptq_plan.json").is_file()
    code = main(["export", str(model_dir), "-o", str(tmp_path / "model.onnx"), "--force", "-q"])
    assert code == 0, capsys.readouterr().err


def test_model_onnx_side_files_are_not_overwritten_without_force(model_dir, tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    code = main(["export", str(model_dir), "-o", str(tmp_path / "model.onnx")])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err == f"error: {tmp_path / 'config.json'} exists; pass --force to overwrite it"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_unwritable_output_folder(model_dir, tmp_path, capsys, monkeypatch):
    """Simulated (root ignores directory modes): the check refuses before any work."""
    import rptq.io

    real_access = rptq.io.os.access
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(
        rptq.io.os,
        "access",
        lambda p, mode: False if str(p) == str(locked) else real_access(p, mode),
    )
    code = main(["export", str(model_dir), "-o", f"{locked}/out/"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err == f"error: output directory {locked} is not writable; choose another -o path"
    assert list(locked.iterdir()) == []


def test_int8_cache_folder_through_the_cli(model_dir, plan_dir, data_dir, tmp_path, capsys):
    """`export --plan W4A4 --kv-cache-dtype int8 -o DIR/`, then `generate DIR/`: the cache is
    the plan's int8 codes, a quarter of the fp32 cache per token."""
    folder = tmp_path / "out"
    run_json(
        [
            "export",
            str(model_dir),
            "--plan",
            str(plan_dir),
            "--kv-cache-dtype",
            "int8",
            "-o",
            f"{folder}/",
            "--data-dir",
            str(data_dir),
        ],
        capsys,
    )
    assert (folder / "genai_config.json").is_file()
    summary = run_json(
        ["generate", str(folder), "--prompt", PROMPT, "--max-new-tokens", "6"], capsys
    )
    assert summary["cache dtype"] == "int8"
    assert summary["cache bytes/token"] == 2 * 2 * 64  # K and V, 2 layers, hidden 64, 1 byte
    record = json.loads((folder / "rptq_plan.json").read_text())
    assert record["export"]["kv_cache_dtype"] == "int8"
    assert record["bits"] != "FP"
