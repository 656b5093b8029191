"""--weight-method, --act-order, --lorc-rank and --lorc-bits through the CLI."""

import json

import pytest

from rptq.cli import main
from rptq.plan import QuantPlan, WeightMethod


def test_calibrate_gptqt_with_lorc_and_export(capsys, model_dir, calib_args, tmp_path):
    plan_dir = tmp_path / "plan"
    flags = ["--wbits", "3", "--weight-method", "gptqt", "--lorc-rank", "4", "--lorc-bits", "8"]
    assert main(["calibrate", str(model_dir), *flags, "-o", str(plan_dir), *calib_args]) == 0
    capsys.readouterr()
    plan = QuantPlan.load(plan_dir)
    assert plan.recipe.weight_method is WeightMethod.GPTQT
    assert all(w.binary is not None and w.lorc.rank == 4 for w in plan.weights)
    assert main(["inspect", str(plan_dir), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["weight method"] == "gptqt, LoRC rank 4 (int8 factors)"
    onnx_path = tmp_path / "model.onnx"
    assert (
        main(["export", str(model_dir), "--plan", str(plan_dir), "-o", str(onnx_path), "-q"]) == 0
    )
    assert onnx_path.is_file()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--weight-method", "gptqt", "--wbits", "8"], "gptqt needs --wbits 2..7"),
        (["--act-order"], "--act-order needs --weight-method gptq or gptqt"),
        (["--lorc-rank", "-2"], "--lorc-rank must be >= 0"),
        (["--weight-group-size", "24"], "--weight-group-size 24 must divide"),
        (["--weight-method", "gptqt", "--weight-group-size", "16"], "not supported with"),
    ],
)
def test_bad_weight_options_are_one_line_errors(capsys, model_dir, tmp_path, flags, message):
    out = tmp_path / "plan"
    assert main(["calibrate", str(model_dir), *flags, "-o", str(out), "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ")
    assert message in err
    assert "\n" not in err
    assert not out.exists()
