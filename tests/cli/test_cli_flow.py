"""The CLI end to end on a tiny model directory: calibrate, inspect, export, eval."""

import json

import pytest

from rptq.cli import main
from rptq.plan import QuantPlan


@pytest.fixture(scope="module")
def plan_dir(model_dir, calib_args, tmp_path_factory):
    out = tmp_path_factory.mktemp("plans") / "w4a4"
    assert main(["calibrate", str(model_dir), "--wbits", "4", "--abits", "4", "-o", str(out),
                 *calib_args]) == 0
    return out


def test_calibrate_writes_a_valid_plan(plan_dir):
    plan = QuantPlan.load(plan_dir)
    assert plan.recipe.label() == "W4A4"
    assert plan.recipe.calib_dataset == "c4-sample" and plan.recipe.seq_len == 64


def test_inspect_json(capsys, plan_dir):
    assert main(["inspect", str(plan_dir), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["recipe"] == "W4A4" and summary["layers"] == 2


def test_eval_reference_and_fp(capsys, model_dir, plan_dir, data_dir):
    base = ["eval", str(model_dir), "--datasets", "wikitext2", "--seq-len", "64", "--limit", "2",
            "--data-dir", str(data_dir), "--json", "-q"]
    assert main(base) == 0
    fp = json.loads(capsys.readouterr().out)
    assert main([*base, "--plan", str(plan_dir)]) == 0
    quant = json.loads(capsys.readouterr().out)
    assert fp["backend"] == "pytorch-fp" and quant["backend"] == "pytorch-reference"
    assert fp["windows"]["wikitext2"] == 2
    assert fp["perplexity"]["wikitext2"] != quant["perplexity"]["wikitext2"]


def test_plan_from_another_model_is_rejected(capsys, plan_dir, tmp_path):
    from rptq.tiny import make_tiny_opt

    other = tmp_path / "other"
    make_tiny_opt(num_layers=3, vocab_size=50272, max_positions=256).save_pretrained(other)
    code = main(["export", str(other), "--plan", str(plan_dir), "-o", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 1 and "does not match this model" in err
    assert not (tmp_path / "m.onnx").exists()
