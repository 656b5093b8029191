"""The CLI end to end on a tiny model directory: calibrate, inspect, export, eval."""

import json

import pytest

from rptq.cli import main
from rptq.plan import QuantPlan


def quick_eval_flags(data_dir) -> list[str]:
    """Two 64-token wikitext2 windows, JSON summary: enough to compare two backends."""
    flags = ["--datasets", "wikitext2", "--seq-len", "64", "--limit", "2", "--json", "-q"]
    return [*flags, "--data-dir", str(data_dir)]


def test_calibrate_writes_a_valid_plan(plan_dir):
    plan = QuantPlan.load(plan_dir)
    assert plan.recipe.label() == "W4A4"
    assert plan.recipe.calib_dataset == "c4-sample"
    assert plan.recipe.seq_len == 64


def test_inspect_json(capsys, plan_dir):
    assert main(["inspect", str(plan_dir), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["recipe"] == "W4A4"
    assert summary["layers"] == 2


def test_eval_reference_and_fp(capsys, model_dir, plan_dir, data_dir):
    base = ["eval", str(model_dir), *quick_eval_flags(data_dir)]
    assert main(base) == 0
    fp = json.loads(capsys.readouterr().out)
    assert main([*base, "--plan", str(plan_dir)]) == 0
    quant = json.loads(capsys.readouterr().out)
    assert fp["backend"] == "pytorch-fp"
    assert quant["backend"] == "pytorch-reference"
    assert fp["windows"]["wikitext2"] == 2
    assert fp["perplexity"]["wikitext2"] != quant["perplexity"]["wikitext2"]


def test_plan_from_another_model_is_rejected(capsys, plan_dir, tmp_path):
    from rptq.tiny import make_tiny_opt

    other = tmp_path / "other"
    make_tiny_opt(num_layers=3, vocab_size=50272, max_positions=256).save_pretrained(other)
    code = main(["export", str(other), "--plan", str(plan_dir), "-o", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 1
    assert "does not match this model" in err
    assert not (tmp_path / "m.onnx").exists()


def test_export_with_plan_and_eval_onnx(capsys, model_dir, plan_dir, data_dir, tmp_path):
    out = tmp_path / "tiny-w4a4.onnx"
    assert (
        main(["export", str(model_dir), "--plan", str(plan_dir), "-o", str(out), "--json", "-q"])
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["bits"] == "W4A4"
    # 8 quantized activations per layer (2 layers): 7 per cluster, written as elementwise
    # quantizers (one Round each), and attn_probs per tensor, a Q/DQ pair; 6 weight DQ per layer
    assert summary["elementwise activation quantizers"] == 14
    assert summary["QuantizeLinear nodes"] == 2
    assert summary["DequantizeLinear nodes"] == 2 + 12
    assert out.exists()
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
    base = quick_eval_flags(data_dir)
    assert main(["eval", str(out), *base]) == 0
    ort = json.loads(capsys.readouterr().out)
    assert main(["eval", str(model_dir), "--plan", str(plan_dir), *base]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert ort["backend"] == "onnxruntime"
    rel = abs(ort["perplexity"]["wikitext2"] - ref["perplexity"]["wikitext2"])
    assert rel / ref["perplexity"]["wikitext2"] < 0.005


def test_default_command_calibrates_and_exports(capsys, model_dir, calib_args, tmp_path):
    out = tmp_path / "run.onnx"
    assert (
        main(
            [
                str(model_dir),
                "--wbits",
                "4",
                "--abits",
                "4",
                "--only-quant-kv",
                "-o",
                str(out),
                "--json",
                *calib_args,
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["bits"] == "W4A4KV"
    assert summary["elementwise activation quantizers"] == 4  # k and v of 2 layers, per cluster
    assert summary["QuantizeLinear nodes"] == 0
    code = main([str(model_dir), "--wbits", "4", "-o", str(out), *calib_args])
    assert code == 1
    assert "--force" in capsys.readouterr().err


def test_interrupted_export_leaves_nothing(capsys, model_dir, plan_dir, tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("rptq.exporter.save._write_model", interrupt)
    out = tmp_path / "m.onnx"
    code = main(["export", str(model_dir), "--plan", str(plan_dir), "-o", str(out), "-q"])
    assert code == 130
    assert list(tmp_path.iterdir()) == []


def test_eval_onnx_without_rptq_metadata(capsys, tmp_path, data_dir):
    import onnx

    path = tmp_path / "foreign.onnx"
    graph = onnx.helper.make_graph([], "g", [], [])
    onnx.save(onnx.helper.make_model(graph), path)
    code = main(["eval", str(path), "--data-dir", str(data_dir)])
    assert code == 1
    assert "not exported by rptq" in capsys.readouterr().err


def test_readme_demo_command(capsys):
    """Exactly the README's third command; the table must show every recipe at ORT parity."""
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("W", "FP32"))]
    assert [r[0] for r in rows] == ["FP32", "W8A8", "W4A8", "W4A4", "W4A4KV", "W3A3KV"]
    fp_ppl = float(rows[0][1])
    for row in rows[1:]:
        ref, ort, diff = float(row[1]), float(row[2]), float(row[3].rstrip("%"))
        assert abs(diff) < 0.5
        assert ref == pytest.approx(ort, rel=0.005)
        assert ref >= fp_ppl * 0.99  # quantization does not beat the FP model by luck


def test_export_without_plan_writes_the_fp_graph(capsys, model_dir, data_dir, tmp_path):
    out = tmp_path / "fp.onnx"
    assert main(["export", str(model_dir), "-o", str(out), "--json", "-q"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["bits"] == "FP"
    assert summary["QuantizeLinear nodes"] == 0
    base = quick_eval_flags(data_dir)
    assert main(["eval", str(out), *base]) == 0
    ort = json.loads(capsys.readouterr().out)
    assert main(["eval", str(model_dir), *base]) == 0
    ref = json.loads(capsys.readouterr().out)
    rel = abs(ort["perplexity"]["wikitext2"] - ref["perplexity"]["wikitext2"])
    assert rel / ref["perplexity"]["wikitext2"] < 1e-4
