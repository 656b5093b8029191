"""A nearly dead activation cluster in the TensorRT variant's float16 export (issue 13).

The variant writes U = X/s + z of each quantized activation in its producer (1/s folded into
the producer's weight and bias). A cluster of ReLU channels that are (almost) never positive
has a range near 0, so its scale was tiny (1.8e-6 seen in a TensorRT-calibrated plan, 7.8e-9
for an all-zero range), and fc1's bias folded with 1/s (1.4e6) left float16: the export
stopped. Calibration now keeps every cluster's scale at least the widest range / 2^16
(rptq.quant.qparams.floor_cluster_ranges). Here 32 fc1 channels of layer 1 are killed (bias
-1, weight rows 0) and the plan is per channel (k-means on the tiny model merges the dead
channels with a few small live ones; a per-channel plan gives each its own range [0, 0]):
the floored channels export in float16 and match the reference, and the negative control (the
same plan with the unfloored scales put back) still stops with the one-line PlanError.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from rptq.calib.runner import calibrate
from rptq.check.rules import check_model, errors
from rptq.errors import PlanError
from rptq.model.load import from_module
from rptq.plan import Recipe, folded_input_scale
from rptq.points import SITE_OF, Act
from rptq.quant.qparams import FLOOR_LEVELS, affine_params
from rptq.runtime.ort import OrtLogits, make_session
from rptq.runtime.parity import compare
from rptq.runtime.trt_reference import TrtReferenceModel
from rptq.tiny import make_tiny_opt
from rptq.workflow import quantized_graph
from tests.conftest import TINY_CLUSTERS
from tests.tolerances import TRT_VARIANT_FP16_MIN_SQNR_DB

DEAD = slice(0, 32)  # fc1 output channels of layer 1 whose ReLU output is always 0
ABITS = 8  # the floor bites most at 8 bits: a range below 1/256 of the widest


@pytest.fixture(scope="module")
def dead_model():
    model = make_tiny_opt()
    fc1 = model.model.decoder.layers[1].fc1
    with torch.no_grad():
        fc1.weight[DEAD] = 0.0
        fc1.bias[DEAD] = -1.0
    return from_module(model, name="tiny-opt-dead")


@pytest.fixture(scope="module")
def dead_plans(dead_model):
    """W4A8 RTN plans calibrated for either target (both export to the variant)."""
    windows = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(123))
    plans = {}
    for target in ("ort", "trt"):
        recipe = Recipe(
            wbits=4,
            abits=ABITS,
            clusters=dict(TINY_CLUSTERS),
            granularity="channel",
            nsamples=8,
            seq_len=64,
            calib_dataset="random",
            target=target,
        )
        plans[target] = calibrate(dead_model, windows, recipe)
    return plans


def _fc2_in(plan):
    return next(a for a in plan.acts if a.layer == 1 and a.act is Act.FC2_IN)


def _channel_scales(plan):
    """fc2_in's scale of each fc1 output channel of layer 1 (model order)."""
    sites = [s for s in plan.sites if s.layer == 1]
    return folded_input_scale([_fc2_in(plan)], sites, "fc2")


@pytest.mark.parametrize("target", ["ort", "trt"])
def test_dead_cluster_scale_is_floored(dead_plans, target):
    scale = _channel_scales(dead_plans[target])
    floor = scale.max() * 2**ABITS / FLOOR_LEVELS  # the widest range / 2^16
    assert scale.min() >= floor * (1 - 1e-6)
    # the dead channels sit exactly on the floor (their own range is [0, 0])
    np.testing.assert_allclose(scale[DEAD], floor, rtol=1e-5)


@pytest.mark.parametrize("target", ["ort", "trt"])
def test_float16_export_of_a_dead_cluster_runs_its_reference(dead_model, dead_plans, target):
    plan = dead_plans[target]
    graph = quantized_graph(dead_model, plan, dtype="float16", target="trt")
    assert errors(check_model(graph, "trt")) == []
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(42))
    result = compare(
        TrtReferenceModel(dead_model, plan)(ids),
        OrtLogits(make_session(graph, optimize=False))(ids),
    )
    assert result.sqnr_db >= TRT_VARIANT_FP16_MIN_SQNR_DB, result.describe()


def test_negative_control_the_unfloored_scale_leaves_float16(dead_model, dead_plans):
    """The ONNX Runtime plan (its weights do not depend on the activation scales) with the dead
    channels' scales as an all-zero range gets them without the floor."""
    plan = dead_plans["ort"]
    act = _fc2_in(plan)
    scale, zero = act.scale.copy(), act.zero.copy()
    unfloored, unfloored_zero = affine_params(np.zeros(1), np.zeros(1), ABITS)
    dead = np.isin(plan.site(1, SITE_OF[Act.FC2_IN]).perm, np.arange(256)[DEAD])
    scale[dead], zero[dead] = unfloored[0], unfloored_zero[0]
    broken_act = dataclasses.replace(act, scale=scale, zero=zero)
    broken = dataclasses.replace(plan, acts=tuple(broken_act if a is act else a for a in plan.acts))
    with pytest.raises(PlanError, match="not representable in float16"):
        quantized_graph(dead_model, broken, dtype="float16", target="trt")
