"""Calibration with the windows split across GPUs gives the plan of one GPU (lent GPU machine).

Every window runs the same kernels on identical GPUs whichever shard holds it, so RTN plans are
byte-identical and GPTQ plans differ only through the merged Hessians' last bits.
"""

import pytest
import torch

from rptq.calib.runner import calibrate
from rptq.plan import ActMetric, WeightMethod
from tests.unit.test_calibrate_shards import assert_matches_up_to_hessian_rounding, recipe

pytestmark = pytest.mark.gpu


def assert_same_plan_files(one, many, tmp_path):
    one.save(tmp_path / "one")
    many.save(tmp_path / "many")
    for file in ("plan.json", "tensors.safetensors"):
        assert (tmp_path / "one" / file).read_bytes() == (tmp_path / "many" / file).read_bytes()


@pytest.mark.parametrize("metric", [ActMetric.MINMAX, ActMetric.EMA_MINMAX])
def test_two_shards_on_one_gpu_match_one(tiny_loaded, tiny_windows, tmp_path, metric):
    # One GPU twice: the threads, copies and replay of the multi-GPU path on the lent machine.
    plan_recipe = recipe(act_metric=metric)
    one = calibrate(tiny_loaded, tiny_windows, plan_recipe, device="cuda:0")
    many = calibrate(tiny_loaded, tiny_windows, plan_recipe, device="cuda:0,cuda:0,cuda:0")
    assert_same_plan_files(one, many, tmp_path)


@pytest.fixture
def all_gpus():
    count = torch.cuda.device_count()
    if count < 2:
        pytest.skip(f"needs at least 2 GPUs (this machine has {count})")
    names = {torch.cuda.get_device_name(i) for i in range(count)}
    if len(names) > 1:
        pytest.skip(f"needs identical GPUs for an exact comparison (found {sorted(names)})")
    return "cuda:all"


@pytest.mark.parametrize("metric", [ActMetric.MINMAX, ActMetric.EMA_MINMAX])
def test_all_gpus_rtn_plan_is_cuda0_plan(tiny_loaded, tiny_windows, tmp_path, all_gpus, metric):
    plan_recipe = recipe(act_metric=metric)
    one = calibrate(tiny_loaded, tiny_windows, plan_recipe, device="cuda:0")
    many = calibrate(tiny_loaded, tiny_windows, plan_recipe, device=all_gpus)
    assert_same_plan_files(one, many, tmp_path)


def test_all_gpus_gptq_plan_matches_cuda0(tiny_loaded, tiny_windows, all_gpus):
    plan_recipe = recipe(weight_method=WeightMethod.GPTQ, target="trt")
    one = calibrate(tiny_loaded, tiny_windows, plan_recipe, device="cuda:0")
    many = calibrate(tiny_loaded, tiny_windows, plan_recipe, device=all_gpus)
    assert_matches_up_to_hessian_rounding(tiny_loaded, one, many)
