"""LoRC: factors of the weight error (exact at full rank, Eckart–Young below), plan entries."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from rptq.calib.lorc import lorc_correction
from rptq.errors import PlanError
from rptq.plan import PLAN_TENSORS, QuantPlan, WeightQuant, validate_plan
from rptq.plan_weights import LowRank, LowRankFactor
from rptq.quant.lowrank import lowrank_factors, lowrank_product
from rptq.quant.qparams import dequantize, quantize_rows

FQN = "model.decoder.layers.0.fc1"  # a plan entry is always one of a layer's linears


def quantized(seed: int, rows: int = 48, cols: int = 32, bits: int = 3):
    w = np.random.default_rng(seed).normal(size=(rows, cols)).astype(np.float32)
    codes, scale, zero = quantize_rows(w, bits)
    return w, WeightQuant(FQN, bits, codes, scale, zero)


@pytest.mark.parametrize(("rows", "cols"), [(48, 32), (32, 48)])
def test_full_rank_recovers_the_float_weight(rows, cols):
    w, quant = quantized(0, rows, cols)
    lorc = lorc_correction(torch.from_numpy(w), quant.values(), rank=10_000, bits=16)
    assert lorc.rank == min(rows, cols)  # clamped
    recovered = dataclasses.replace(quant, lorc=lorc).values()
    np.testing.assert_allclose(recovered, w, atol=2e-6)


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_rank_r_error_is_the_eckart_young_tail(rank):
    w, quant = quantized(1)
    error = w.astype(np.float64) - quant.values()
    singular = np.linalg.svd(error, compute_uv=False)
    lorc = lorc_correction(torch.from_numpy(w), quant.values(), rank=rank, bits=16)
    residual = error - lowrank_product(lorc.u.values, lorc.v.values)
    assert np.linalg.norm(residual) == pytest.approx(
        np.sqrt((singular[rank:] ** 2).sum()), rel=1e-5
    )
    assert np.linalg.norm(w - dataclasses.replace(quant, lorc=lorc).values()) < np.linalg.norm(
        error
    )


def test_factors_split_the_singular_values_evenly():
    w, quant = quantized(2)
    u_hat, v_hat = lowrank_factors(w - quant.values(), 3)
    np.testing.assert_allclose(
        np.linalg.norm(u_hat, axis=0), np.linalg.norm(v_hat, axis=0), rtol=1e-5
    )


def test_int8_factors_stay_close_to_float_factors():
    w, quant = quantized(3)
    exact = lorc_correction(torch.from_numpy(w), quant.values(), rank=8, bits=16)
    int8 = lorc_correction(torch.from_numpy(w), quant.values(), rank=8, bits=8)
    assert int8.u.values.dtype == np.int8
    assert int8.u.scale.shape == (48,)
    assert int8.v.scale.shape == (32,)
    float_branch = lowrank_product(exact.u.values, exact.v.values)
    int8_branch = lowrank_product(int8.u.dequantized(), int8.v.dequantized())
    # 8-bit rows of R = 8 values: about 1% relative error of the correction
    assert np.linalg.norm(int8_branch - float_branch) < 0.03 * np.linalg.norm(float_branch)
    np.testing.assert_array_equal(
        int8.u.dequantized(), dequantize(int8.u.values, int8.u.scale[:, None], int8.u.zero[:, None])
    )


def test_zero_error_needs_no_correction():
    w, quant = quantized(4)
    exact = quant.values()
    assert lorc_correction(torch.from_numpy(exact), exact, rank=4, bits=16) is None


@pytest.fixture(scope="module")
def lorc_plan(calibrate_tiny):
    return calibrate_tiny(wbits=4, weight_method="gptq", lorc_rank=4, lorc_bits=8)


def test_lorc_plan_round_trip(lorc_plan, tmp_path):
    lorc_plan.save(tmp_path / "plan")
    loaded = QuantPlan.load(tmp_path / "plan")
    for a, b in zip(lorc_plan.weights, loaded.weights, strict=True):
        assert b.lorc.rank == 4
        for name in ("u", "v"):
            fa, fb = getattr(a.lorc, name), getattr(b.lorc, name)
            np.testing.assert_array_equal(fa.values, fb.values)
            np.testing.assert_array_equal(fa.scale, fb.scale)
            np.testing.assert_array_equal(fa.zero, fb.zero)
        np.testing.assert_array_equal(a.values(), b.values())


def test_old_plans_without_lorc_or_binary_still_load(calibrate_tiny, tmp_path):
    plan = calibrate_tiny(wbits=4, abits=4)
    plan.save(tmp_path / "plan")
    meta_path = tmp_path / "plan" / "plan.json"
    meta = json.loads(meta_path.read_text())
    for key in ("lorc_rank", "lorc_bits", "gptq_percdamp", "gptq_block_size", "act_order"):
        del meta["recipe"][key]  # a plan written before these fields existed
    meta["recipe"]["weight_method"] = "rtn"
    meta_path.write_text(json.dumps(meta))
    loaded = QuantPlan.load(tmp_path / "plan")
    assert loaded.recipe.lorc_rank == 0
    assert all(w.lorc is None and w.binary is None for w in loaded.weights)


def _short_v(lr: LowRank) -> LowRank:
    v = lr.v
    return LowRank(lr.u, LowRankFactor(8, v.values[:-1], v.scale[:-1], v.zero[:-1]))


def _negative_scale(lr: LowRank) -> LowRank:
    return LowRank(LowRankFactor(8, lr.u.values, -lr.u.scale, lr.u.zero), lr.v)


def _infinite_float(lr: LowRank) -> LowRank:
    infinite = np.full(lr.u.values.shape, np.inf, np.float32)
    return LowRank(LowRankFactor(16, infinite), LowRankFactor(16, lr.v.dequantized()))


def _codes_without_scale(lr: LowRank) -> LowRank:
    return LowRank(LowRankFactor(8, lr.u.values), lr.v)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_short_v, "expected"),
        (_negative_scale, "non-positive"),
        (_infinite_float, "non-finite"),
        (_codes_without_scale, "int8 with scale/zero"),
    ],
)
def test_corrupt_lorc_factors_are_plan_errors(lorc_plan, change, message):
    first = lorc_plan.weights[0]
    broken = dataclasses.replace(first, lorc=change(first.lorc))
    plan = dataclasses.replace(lorc_plan, weights=(broken, *lorc_plan.weights[1:]))
    with pytest.raises(PlanError, match=message):
        validate_plan(plan, "plan")


def test_corrupt_lorc_file_is_a_plan_error(lorc_plan, tmp_path):
    lorc_plan.save(tmp_path / "plan")
    tensors = load_file(str(tmp_path / "plan" / PLAN_TENSORS))
    key = f"{lorc_plan.weights[0].fqn}.lorc.v"
    tensors[key] = tensors[key][:, :2].copy()
    save_file(tensors, str(tmp_path / "plan" / PLAN_TENSORS))
    with pytest.raises(PlanError, match="wrong dtype/shape"):
        QuantPlan.load(tmp_path / "plan")
