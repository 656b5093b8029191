"""ONNX Runtime on the exported QDQ graph vs the PyTorch fake-quant reference.

Calibrated plans on the tiny random OPT. Two levels: every quantized activation (the DQ output
in ORT against the reference's fake-quant output, in quantization steps) and the logits (SQNR)
plus perplexity. A negative control perturbs one cluster scale and must fail.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch

from rptq import names
from rptq.plan import QuantPlan
from rptq.points import SITE_OF
from rptq.quant.clusters import expand_to_positions
from rptq.quant.qparams import fake_quant
from rptq.runtime.ort import OrtLogits, make_session
from rptq.runtime.parity import compare, steps_apart
from rptq.runtime.perplexity import perplexity
from rptq.runtime.reference import ReferenceModel
from rptq.workflow import quantized_graph
from tests.parity.activations import record_activations
from tests.tolerances import (
    FOLD_ATOL,
    LOGITS_MIN_SQNR_DB,
    PPL_MAX_REL_DIFF,
    QDQ_DRIFT_MAX_STEPS,
    QDQ_MAX_FLIPPED_FRACTION,
)

RECIPES = {
    "W4A4": {"wbits": 4, "abits": 4},
    "W4A8": {"wbits": 4, "abits": 8},
    "W4A4KV": {"wbits": 4, "abits": 4, "only_quant_kv": True},
    "W3A3KV": {"wbits": 3, "abits": 3, "only_quant_kv": True},
}


@pytest.fixture(scope="module")
def eval_ids():
    return torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(42))


def reference_activations(loaded, plan: QuantPlan, ids: torch.Tensor) -> dict:
    """Every quantized activation as the reference computes it, keyed by (layer, act)."""
    return record_activations(ReferenceModel(loaded, plan), loaded, plan, ids)


def ort_activations(graph: onnx.ModelProto, plan: QuantPlan, ids: torch.Tensor) -> dict:
    """(input of Q, output of DQ) of every quantized activation, from ORT."""
    model = onnx.ModelProto()
    model.CopyFrom(graph)
    wanted = {}
    for quant in plan.acts:
        tensor = names.act_tensor(quant.layer, quant.act)
        wanted[(quant.layer, quant.act)] = (tensor, names.qdq(tensor)["dequantized"])
        for name in wanted[(quant.layer, quant.act)]:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = make_session(model, optimize=False)
    feeds = {
        names.GRAPH_INPUT_IDS: ids.numpy(),
        names.GRAPH_ATTENTION_MASK: np.ones_like(ids.numpy()),
    }
    flat = [name for pair in wanted.values() for name in pair]
    values = dict(zip(flat, session.run(flat, feeds), strict=True))
    return {key: (values[a], values[b]) for key, (a, b) in wanted.items()}


def positions_params(plan: QuantPlan, layer: int, act) -> tuple[np.ndarray, np.ndarray, int]:
    """Scale/zero of `act` per channel in the graph's (folded) order, and its bits."""
    quant = plan.act(layer, act)
    if act not in SITE_OF:
        return quant.scale, quant.zero, quant.bits
    sizes = plan.site(layer, SITE_OF[act]).sizes
    return (
        expand_to_positions(quant.scale, sizes),
        expand_to_positions(quant.zero, sizes),
        quant.bits,
    )


def activation_mismatches(loaded, plan_ref: QuantPlan, plan_graph: QuantPlan, ids) -> list[str]:
    """Activations where the graph departs from the reference plan, as readable failure lines.

    Two checks per activation. Grid: ORT's DQ output must equal the plan's fake quantization
    of ORT's own Q input, exactly (this isolates the Q/DQ encoding from upstream drift).
    Drift: against the reference's tensor, codes may differ only where float accumulation
    order pushed a value across a rounding boundary upstream (few codes, few steps).
    """
    graph = quantized_graph(loaded, plan_graph)
    ref = reference_activations(loaded, plan_ref, ids)
    failures = []
    for (layer, act), (before, after) in ort_activations(graph, plan_graph, ids).items():
        scale, zero, bits = positions_params(plan_ref, layer, act)
        grid = fake_quant(before, scale, zero, bits)
        if not np.array_equal(grid, after):
            off = np.abs(grid - after).max() / scale.min()
            failures.append(
                f"layer {layer} {act}: DQ output off the plan's grid by {off:.2f} steps"
            )
        want = ref[(layer, act)]
        if act in SITE_OF:  # the graph holds channels in folded (cluster-contiguous) order
            want = want[..., torch.from_numpy(plan_ref.site(layer, SITE_OF[act]).perm)]
        steps, flipped = steps_apart(want, torch.from_numpy(after), torch.from_numpy(scale))
        if steps > QDQ_DRIFT_MAX_STEPS or flipped > QDQ_MAX_FLIPPED_FRACTION:
            failures.append(
                f"layer {layer} {act}: {steps:.2f} steps max, {flipped:.2%} codes differ"
            )
    return failures


@pytest.mark.parametrize("label", sorted(RECIPES))
def test_activations_on_the_reference_grid(label, tiny_loaded, calibrate_tiny, eval_ids):
    plan = calibrate_tiny(**RECIPES[label])
    assert activation_mismatches(tiny_loaded, plan, plan, eval_ids) == []


@pytest.mark.parametrize("optimize", [False, True], ids=["ORT_DISABLE_ALL", "ORT_ENABLE_ALL"])
@pytest.mark.parametrize("label", sorted(RECIPES))
def test_logits_and_perplexity(label, optimize, tiny_loaded, calibrate_tiny, eval_ids):
    plan = calibrate_tiny(**RECIPES[label])
    reference = ReferenceModel(tiny_loaded, plan)
    ort = OrtLogits(make_session(quantized_graph(tiny_loaded, plan), optimize=optimize))
    result = compare(reference(eval_ids), ort(eval_ids))
    assert result.sqnr_db >= LOGITS_MIN_SQNR_DB, f"{label}: {result.describe()}"
    ppl_ref = perplexity(reference, eval_ids).ppl
    ppl_ort = perplexity(ort, eval_ids).ppl
    assert abs(ppl_ort - ppl_ref) / ppl_ref <= PPL_MAX_REL_DIFF, (ppl_ref, ppl_ort)


def perturb_one_cluster(plan: QuantPlan, layer: int, act, factor: float) -> QuantPlan:
    acts = []
    for quant in plan.acts:
        if quant.layer == layer and quant.act == act:
            scale = quant.scale.copy()
            scale[0] *= factor
            quant = dataclasses.replace(quant, scale=scale)
        acts.append(quant)
    return dataclasses.replace(plan, acts=tuple(acts))


def test_negative_control_one_perturbed_cluster_scale_fails(tiny_loaded, calibrate_tiny, eval_ids):
    plan = calibrate_tiny(**RECIPES["W4A4"])
    target = next(a for a in plan.acts if a.layer == 1 and a.act.value == "fc2_in")
    broken = perturb_one_cluster(plan, target.layer, target.act, 1.25)
    failures = activation_mismatches(tiny_loaded, plan, broken, eval_ids)
    assert any("layer 1 fc2_in: DQ output off the plan's grid" in f for f in failures), failures


def test_folding_calibrated_permutations_keeps_the_fp_function(
    tiny_loaded, calibrate_tiny, eval_ids
):
    plan = calibrate_tiny(**RECIPES["W4A4"])
    fold_only = dataclasses.replace(plan, acts=(), weights=())
    assert {s.point.value for s in fold_only.sites} == {"R1", "R2", "R3", "R4", "R5"}
    folded = OrtLogits(make_session(quantized_graph(tiny_loaded, fold_only), optimize=False))
    unfolded = OrtLogits(make_session(quantized_graph(tiny_loaded, None), optimize=False))
    diff = (folded(eval_ids) - unfolded(eval_ids)).abs().max().item()
    assert diff <= FOLD_ATOL, f"max |diff| {diff:.3g}"
