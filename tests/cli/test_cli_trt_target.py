"""`calibrate --target tensorrt` and `run --target tensorrt`: plans calibrated for the
TensorRT variant, exported for it, and refused for the other target."""

import json

from rptq.cli import main


def test_cli_calibrate_for_tensorrt_then_export(capsys, model_dir, calib_args, tmp_path):
    plan_dir, out = tmp_path / "plan", tmp_path / "m.onnx"
    flags = ["--wbits", "4", "--abits", "4", "--weight-method", "gptq", "--lorc-rank", "2"]
    args = ["calibrate", str(model_dir), *flags, "--target", "tensorrt", "-o", str(plan_dir)]
    assert main([*args, *calib_args]) == 0
    capsys.readouterr()
    export = ["export", str(model_dir), "--plan", str(plan_dir), "-o", str(out), "-q"]
    assert main(export) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "recalibrate with --target ort" in err
    assert main([*export, "--target", "tensorrt"]) == 0
    capsys.readouterr()
    assert main(["check", str(out), "--target", "tensorrt", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["errors"] == 0
    assert main(["inspect", str(plan_dir), "--json"]) == 0
    assert (
        "calibrated for --target tensorrt" in json.loads(capsys.readouterr().out)["weight method"]
    )


def test_cli_run_target_tensorrt_calibrates_for_it(capsys, model_dir, calib_args, tmp_path):
    out = tmp_path / "m.onnx"
    flags = ["--wbits", "3", "--abits", "8", "--weight-method", "gptqt", "--target", "tensorrt"]
    assert main(["run", str(model_dir), *flags, "-o", str(out), *calib_args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["target"] == "tensorrt"
    assert main(["check", str(out), "--target", "tensorrt", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["errors"] == 0
    flags = ["--weight-group-size", "64", "--target", "tensorrt"]
    assert main(["run", str(model_dir), *flags, "-o", str(tmp_path / "g.onnx"), *calib_args]) == 1
    assert "--weight-group-size 0, or use --target ort" in capsys.readouterr().err


def test_cli_calibrate_trt_weight_groups_is_stored_in_the_plan(
    capsys, model_dir, calib_args, tmp_path
):
    """`calibrate --target tensorrt --trt-weight-groups N` records N; without --target tensorrt
    the option is refused in one line."""
    plan_dir = tmp_path / "plan"
    flags = ["--wbits", "4", "--abits", "8", "--target", "tensorrt", "--trt-weight-groups", "2"]
    assert main(["calibrate", str(model_dir), *flags, "-o", str(plan_dir), *calib_args]) == 0
    capsys.readouterr()
    recipe = json.loads((plan_dir / "plan.json").read_text())["recipe"]
    assert recipe["trt_weight_groups"] == 2
    args = ["calibrate", str(model_dir), "--trt-weight-groups", "2", "-o", str(tmp_path / "o")]
    assert main([*args, *calib_args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "--trt-weight-groups applies to --target tensorrt only" in err
