"""Calibration in the TensorRT variant's weight domain (calib/trt_domain.py): W' = W·diag(c),
H' = diag(1/c) H diag(1/c), symmetric codes; and the plan fields that carry it."""

import json

import numpy as np
import pytest
import torch

from rptq.calib.gptq import HessianTap
from rptq.calib.trt_domain import fold_problem
from rptq.calib.weight_methods import LinearProblem, quantize_linear
from rptq.errors import ConfigError
from rptq.plan import Recipe
from rptq.points import Act
from rptq.quant.trt_weights import requantize_folded, requantize_grouped, scale_groups
from tests.unit.test_gptq import correlated_problem

FQN = "model.decoder.layers.0.fc1"  # a plan entry is always one of a layer's linears


def folded_problem(seed: int, **recipe_fields):
    """A correlated problem with uneven activation scales c (as RPTQ clusters give)."""
    w, x, hessian = correlated_problem(seed)
    c = np.random.default_rng(seed + 10).uniform(0.02, 0.5, size=w.shape[1]).astype(np.float32)
    problem = LinearProblem("model.decoder.layers.0.fc1", torch.from_numpy(w), hessian, None)
    return w, x, c, fold_problem(problem, c), Recipe(**recipe_fields)


def test_folded_hessian_is_the_hessian_of_x_over_c():
    w, x, c, folded, _ = folded_problem(0)
    tap = HessianTap([Act.FFN_LN_OUT])
    tap(Act.FFN_LN_OUT, torch.from_numpy(x / c[None, :].astype(np.float64)).float())
    np.testing.assert_allclose(
        folded.hessian.numpy(), tap.hessian(Act.FFN_LN_OUT).numpy(), rtol=2e-4, atol=1e-3
    )
    np.testing.assert_array_equal(folded.weight.numpy(), (w * c[None, :]).astype(np.float32))


def test_folded_rtn_is_the_exports_requantization():
    w, _, c, folded, recipe = folded_problem(1, wbits=4, target="trt")
    quant = quantize_linear(folded, recipe)
    codes, scale = requantize_folded(w, c, 4)
    np.testing.assert_array_equal(quant.codes, codes)
    np.testing.assert_array_equal(quant.scale, scale)
    assert not quant.zero.any()
    np.testing.assert_array_equal(quant.folded_scale, c)
    # values() maps the folded codes back to the model's domain
    np.testing.assert_allclose(quant.values() * c[None, :], quant.folded_values(), rtol=1e-6)


def outlier_problem(seed: int, groups: int = 3):
    """A correlated problem whose c has an outlier cluster (30x) and a small one (0.1x)."""
    w, x, hessian = correlated_problem(seed)
    c = np.full(w.shape[1], 0.05, np.float32)
    c[:4], c[4:10] = 1.5, 0.005
    problem = LinearProblem(FQN, torch.from_numpy(w), hessian, None)
    return w, x, c, fold_problem(problem, c, groups)


def test_folded_rtn_with_scale_groups_is_the_exports_grouped_requantization():
    w, _, c, folded = outlier_problem(1)
    group_of = scale_groups(c, 3)
    np.testing.assert_array_equal(folded.scale_groups, group_of)
    quant = quantize_linear(folded, Recipe(wbits=4, target="trt"))
    codes, scale = requantize_grouped(w, c, 4, group_of)
    np.testing.assert_array_equal(quant.codes, codes)
    np.testing.assert_array_equal(quant.scale, scale.T)  # the plan's [out, groups]
    np.testing.assert_array_equal(quant.group_index, group_of)
    assert quant.zero.shape == quant.scale.shape
    assert not quant.zero.any()
    assert quant.extra_json() == {"folded_input": 1, "groups": 3}
    np.testing.assert_allclose(quant.values() * c[None, :], quant.folded_values(), rtol=1e-6)


def test_one_scale_group_keeps_the_per_row_form():
    w, _, c, folded = outlier_problem(1, groups=1)
    assert folded.scale_groups is None
    quant = quantize_linear(folded, Recipe(wbits=4, target="trt", trt_weight_groups=1))
    assert quant.group_index is None
    np.testing.assert_array_equal(quant.codes, requantize_folded(w, c, 4)[0])


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_scale_groups_lower_the_folded_output_error(method):
    """On an outlier c, one scale per row rounds the small clusters' columns to few codes."""
    _, x, c, grouped = outlier_problem(0)
    _, _, _, single = outlier_problem(0, groups=1)
    x_folded = x / c[None, :].astype(np.float64)
    w_folded = grouped.weight.numpy().astype(np.float64)
    errors = {}
    for name, problem in (("grouped", grouped), ("single", single)):
        quant = quantize_linear(problem, Recipe(wbits=4, weight_method=method, target="trt"))
        q = quant.folded_values().astype(np.float64)
        errors[name] = np.linalg.norm(x_folded @ w_folded.T - x_folded @ q.T)
    assert errors["grouped"] < 0.8 * errors["single"], errors


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_folded_gptq_lowers_the_folded_output_error_below_folded_rtn(bits, seed):
    """||X'W'ᵀ − X'Q(W')ᵀ|| with X' = X/c: what the variant's GEMM (codes times W') gets wrong."""
    _, x, c, folded, _ = folded_problem(seed)
    x_folded = x / c[None, :].astype(np.float64)
    w_folded = folded.weight.numpy().astype(np.float64)
    errors = {}
    for method in ("rtn", "gptq"):
        quant = quantize_linear(folded, Recipe(wbits=bits, weight_method=method, target="trt"))
        assert quant.codes.min() >= -(2 ** (bits - 1) - 1)  # symmetric grid, zero point 0
        q = quant.folded_values().astype(np.float64)
        errors[method] = np.linalg.norm(x_folded @ w_folded.T - x_folded @ q.T)
    # measured 0.71..0.81 on these problems
    assert errors["gptq"] < 0.85 * errors["rtn"], errors


def test_folded_lorc_factors_are_symmetric_and_fit_the_folded_error():
    w, _, c, folded, _ = folded_problem(2)
    recipe = Recipe(wbits=3, weight_method="gptq", lorc_rank=8, lorc_bits=8, target="trt")
    quant = quantize_linear(folded, recipe)
    assert not quant.lorc.u.zero.any()
    assert not quant.lorc.v.zero.any()
    plain = quantize_linear(folded, Recipe(wbits=3, weight_method="gptq", target="trt"))
    error = folded.weight.numpy() - plain.folded_values()
    assert np.linalg.norm(folded.weight.numpy() - quant.folded_values()) < np.linalg.norm(error)
    np.testing.assert_allclose(
        quant.values(), quant.folded_values() / c[None, :], rtol=1e-6, atol=1e-6
    )


def test_an_unfolded_problem_keeps_its_grid_and_gets_symmetric_factors():
    """A16/KV-only linears: the variant keeps the plan's asymmetric codes (C − z as INT8)."""
    w, _, _, _, _ = folded_problem(3)
    problem = fold_problem(LinearProblem(FQN, torch.from_numpy(w), None, None), None)
    recipe = Recipe(wbits=4, lorc_rank=4, lorc_bits=8, target="trt")
    quant = quantize_linear(problem, recipe)
    ort = quantize_linear(LinearProblem(FQN, torch.from_numpy(w), None, None), Recipe(wbits=4))
    np.testing.assert_array_equal(quant.codes, ort.codes)
    assert quant.folded_scale is None
    assert not quant.lorc.v.zero.any()


def test_recipe_target_is_validated_and_refuses_groups():
    with pytest.raises(ConfigError, match="use ort or tensorrt"):
        Recipe(target="tensorrt")
    with pytest.raises(ConfigError, match="--weight-group-size 0, or use --target ort"):
        Recipe(weight_group_size=64, target="trt")
    with pytest.raises(ConfigError, match="--trt-weight-groups must be >= 1"):
        Recipe(target="trt", trt_weight_groups=0)


def test_plan_json_holds_the_target_only_for_tensorrt(calibrate_tiny, tmp_path):
    """Optional field, no schema bump: ORT plans are written as before and load as "ort"."""
    from rptq.plan import QuantPlan

    for target in ("ort", "trt"):
        plan = calibrate_tiny(wbits=4, abits=4, target=target, lorc_rank=2, lorc_bits=8)
        plan.save(tmp_path / target)
        meta = json.loads((tmp_path / target / "plan.json").read_text())
        assert ("target" in meta["recipe"]) == (target == "trt")
        assert ("trt_weight_groups" in meta["recipe"]) == (target == "trt")
        loaded = QuantPlan.load(tmp_path / target)
        assert loaded.recipe.target == target
        assert loaded.recipe == plan.recipe
        for saved, read in zip(plan.weights, loaded.weights, strict=True):
            assert (read.folded_scale is None) == (target == "ort")
            np.testing.assert_array_equal(read.values(), saved.values())
            if saved.group_index is None:
                assert read.group_index is None
            else:
                np.testing.assert_array_equal(read.group_index, saved.group_index)
    assert any(w.group_index is not None for w in plan.weights)  # the trt plan has groups


def test_a_tensorrt_plan_from_before_scale_groups_loads_with_one(calibrate_tiny, tmp_path):
    """plan.json without trt_weight_groups (and weights without group_index) is such a plan."""
    from rptq.plan import QuantPlan

    plan = calibrate_tiny(wbits=4, abits=8, target="trt", trt_weight_groups=1)
    assert all(w.group_index is None for w in plan.weights)
    plan.save(tmp_path / "old")
    path = tmp_path / "old" / "plan.json"
    meta = json.loads(path.read_text())
    del meta["recipe"]["trt_weight_groups"]
    path.write_text(json.dumps(meta))
    loaded = QuantPlan.load(tmp_path / "old")
    assert loaded.recipe.trt_weight_groups == 1
    for saved, read in zip(plan.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(read.values(), saved.values())
