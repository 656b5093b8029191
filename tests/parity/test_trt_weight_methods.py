"""Plans calibrated for the TensorRT variant (`calibrate --target tensorrt`): GPTQ, GPTQT and
LoRC on the folded weights W·diag(s), exported verbatim, in ONNX Runtime vs the reference.

Bounds (tests/tolerances.py): every DQ output on its grid, the first activation where ORT's
codes differ from the reference's differs by a tie flip, logit SQNR and perplexity. RTN
calibrated for TensorRT must be today's re-quantized export bit for bit; negative controls: one
GPTQ weight exported with RTN codes (what the export did before plans knew their target), and
LoRC branches dropped.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from rptq.errors import PlanError
from rptq.points import SITE_OF, Act
from rptq.quant.qparams import grid_bounds
from rptq.runtime.ort import OrtLogits, make_session
from rptq.runtime.parity import compare, steps_apart
from rptq.runtime.perplexity import perplexity
from rptq.runtime.trt_reference import TrtReferenceModel
from rptq.workflow import quantized_graph
from tests.parity.activations import record_activations
from tests.parity.test_trt_variant_parity import ort_qdq, positions_params
from tests.tolerances import (
    LOGITS_MIN_SQNR_DB,
    PPL_MAX_REL_DIFF,
    QDQ_FIRST_FLIP_MAX_FRACTION,
    QDQ_FIRST_FLIP_MAX_STEPS,
)

# every method at W4A8 and W4A4, plus weight-only-folded settings (KV-only, A16)
SETTINGS = {
    "gptq-W4A8": {"wbits": 4, "abits": 8, "weight_method": "gptq"},
    "gptq-W4A4": {"wbits": 4, "abits": 4, "weight_method": "gptq", "act_order": True},
    "gptqt-W3A8": {"wbits": 3, "abits": 8, "weight_method": "gptqt"},
    "gptqt-W3A4": {"wbits": 3, "abits": 4, "weight_method": "gptqt"},
    "rtn+lorc-W4A8": {"wbits": 4, "abits": 8, "lorc_rank": 4},
    "rtn+lorc-W4A4": {"wbits": 4, "abits": 4, "lorc_rank": 4, "lorc_bits": 8},
    "gptq+lorc-W4A8": {"wbits": 4, "abits": 8, "weight_method": "gptq", "lorc_rank": 4,
                       "lorc_bits": 8},
    "gptq+lorc-W4A4": {"wbits": 4, "abits": 4, "weight_method": "gptq", "lorc_rank": 4},
    "gptqt+lorc-W4A4KV": {"wbits": 4, "abits": 4, "only_quant_kv": True,
                          "weight_method": "gptqt", "lorc_rank": 4, "lorc_bits": 8},
    "gptq+lorc-W4A16": {"wbits": 4, "abits": 16, "weight_method": "gptq", "lorc_rank": 4},
}  # fmt: skip
QUANTIZED_ACTS = [label for label in SETTINGS if not label.endswith("A16")]
# Eval windows on which a single one-step tie flip of one code cascades in gptq+lorc-W4A4 (on
# the AMD EPYC where this was measured: seed 1000 to 15 steps at layer 1 fc2_in, seed 1004 to
# 7 steps at layer 1 attn_ln_out); which windows hit a tie depends on the CPU's kernels, which
# is why the Intel Xeon saw 4 steps on seed 42 (tests/tolerances.py, QDQ_FIRST_FLIP_*).
CASCADE_SEEDS = (42, 1000, 1004)


@pytest.fixture(scope="module")
def eval_ids():
    return torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(42))


@pytest.fixture(scope="module")
def trt_plan(calibrate_tiny):
    def plan(label: str):
        return calibrate_tiny(target="trt", **SETTINGS[label])

    return plan


def ort_logits(loaded, plan, optimize: bool = False, **options) -> OrtLogits:
    graph = quantized_graph(loaded, plan, target="trt", **options)
    return OrtLogits(make_session(graph, optimize=optimize))


@pytest.mark.parametrize("label", sorted(SETTINGS))
def test_logits_and_perplexity(label, trt_plan, tiny_loaded, eval_ids):
    plan = trt_plan(label)
    assert all(w.folded_scale is not None for w in plan.weights) == (label in QUANTIZED_ACTS[:-1])
    reference = TrtReferenceModel(tiny_loaded, plan)
    ort = ort_logits(tiny_loaded, plan)
    result = compare(reference(eval_ids), ort(eval_ids))
    assert result.sqnr_db >= LOGITS_MIN_SQNR_DB, f"{label}: {result.describe()}"
    ppl_ref, ppl_ort = perplexity(reference, eval_ids).ppl, perplexity(ort, eval_ids).ppl
    assert abs(ppl_ort - ppl_ref) / ppl_ref <= PPL_MAX_REL_DIFF, (ppl_ref, ppl_ort)


@pytest.mark.parametrize("label", ["gptq-W4A4", "gptqt-W3A4", "gptq+lorc-W4A4"])
def test_logits_with_ort_optimisations_and_int4_blocks(label, trt_plan, tiny_loaded, eval_ids):
    plan = trt_plan(label)
    want = TrtReferenceModel(tiny_loaded, plan)(eval_ids)
    for options in ({"optimize": True}, {"int4_block_size": 64}):
        result = compare(want, ort_logits(tiny_loaded, plan, **options)(eval_ids))
        assert result.sqnr_db >= LOGITS_MIN_SQNR_DB, f"{label} {options}: {result.describe()}"


def drift_in_flow_order(loaded, plan, ids, graph_plan=None) -> list[tuple[str, float, float]]:
    """(activation, max steps, fraction of codes differing) of ORT vs the reference, in
    data-flow order (layer, then Act order); asserts every DQ output lies on its grid.
    `graph_plan` (default `plan`) exports the graph, `plan` drives the reference."""
    graph_plan = plan if graph_plan is None else graph_plan
    graph = quantized_graph(loaded, graph_plan, target="trt")
    ref = record_activations(TrtReferenceModel(loaded, plan), loaded, plan, ids)
    rows = []
    for (layer, act), (u, dq) in sorted(
        ort_qdq(graph, graph_plan, ids).items(),
        key=lambda item: (item[0][0], list(Act).index(item[0][1])),
    ):
        qmin, qmax = grid_bounds(plan.act(layer, act).bits)
        step = 1.0 if act in SITE_OF else float(plan.act(layer, act).scale[0])
        grid = np.clip(np.round(u / np.float32(step)), qmin, qmax) * np.float32(step)
        assert np.array_equal(grid.astype(np.float32), dq), f"layer {layer} {act}: off the grid"
        scale, zero = positions_params(plan, layer, act)
        codes = dq if act in SITE_OF else np.round(dq / np.float32(step))
        got = torch.from_numpy(((codes - zero) * scale).astype(np.float32))
        want = ref[(layer, act)]
        if act in SITE_OF:
            want = want[..., torch.from_numpy(plan.site(layer, SITE_OF[act]).perm)]
        rows.append((f"layer {layer} {act}", *steps_apart(want, got, torch.from_numpy(scale))))
    return rows


def first_difference(rows: list[tuple[str, float, float]]) -> tuple[str, float, float] | None:
    return next((row for row in rows if row[1] > 0), None)


def is_tie_flip(row: tuple[str, float, float] | None) -> bool:
    """No difference at all, or one step in few codes: what float rounding at a tie gives."""
    return row is None or (
        row[1] <= QDQ_FIRST_FLIP_MAX_STEPS + 1e-3 and row[2] <= QDQ_FIRST_FLIP_MAX_FRACTION
    )


@pytest.mark.parametrize("label", QUANTIZED_ACTS)
def test_first_differing_codes_are_tie_flips(label, trt_plan, tiny_loaded, eval_ids):
    """Every DQ is on its grid, and the first activation (in data-flow order) where ORT's codes
    differ from the reference's differs as a tie flip does. Later activations are not bounded
    in steps: one flipped 4-bit code moves an 8-bit LayerNorm output many of its steps
    (tests/tolerances.py); test_logits_and_perplexity bounds what that does to the output."""
    first = first_difference(drift_in_flow_order(tiny_loaded, trt_plan(label), eval_ids))
    assert is_tie_flip(first), first


@pytest.mark.parametrize("seed", CASCADE_SEEDS)
def test_gptq_lorc_w4a4_drift_is_a_tie_flip_on_other_windows(seed, trt_plan, tiny_loaded):
    """The Intel Xeon failure (`4.00 steps max, 0.62% codes differ` at layer 1 ffn_ln_out) was a
    cascade: on these windows the same setting cascades here too, from a one-step first flip."""
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(seed))
    plan = trt_plan("gptq+lorc-W4A4")
    assert is_tie_flip(first_difference(drift_in_flow_order(tiny_loaded, plan, ids)))
    result = compare(TrtReferenceModel(tiny_loaded, plan)(ids), ort_logits(tiny_loaded, plan)(ids))
    assert result.sqnr_db >= LOGITS_MIN_SQNR_DB, result.describe()


def test_negative_control_first_difference_catches_a_wrong_weight(
    trt_plan, calibrate_tiny, tiny_loaded, eval_ids
):
    """Layer 0 fc2 exported with RTN codes instead of GPTQ's: the first activation after it
    (layer 1 attn_ln_out) must differ by far more than a tie flip."""
    plan = trt_plan("gptq+lorc-W4A4")
    rtn = calibrate_tiny(wbits=4, abits=4, target="trt")
    index = next(i for i, w in enumerate(plan.weights) if w.fqn.endswith("layers.0.fc2"))
    weights = list(plan.weights)
    weights[index] = rtn.weights[index]
    broken = dataclasses.replace(plan, weights=tuple(weights))
    first = first_difference(drift_in_flow_order(tiny_loaded, plan, eval_ids, broken))
    assert not is_tie_flip(first), first


@pytest.mark.parametrize("label", ["W4A8", "W4A4", "W4A4KV"])
def test_rtn_calibrated_for_tensorrt_is_the_requantized_export(label, calibrate_tiny, tiny_loaded):
    """Folded-domain RTN in calibration computes exactly the codes the export re-quantizes
    with one scale per output row (`trt_weight_groups=1`, the form such a plan holds).

    The TensorRT plan's layer-1 activation ranges differ from an ONNX Runtime plan's (layer 0's
    output pass runs the variant's weights), so the old path gets this plan's activations with
    the ONNX Runtime plan's RTN codes (which depend on W only): it must write the same graph.
    """
    fields = {"W4A8": {"abits": 8}, "W4A4": {"abits": 4}}.get(
        label, {"abits": 4, "only_quant_kv": True}
    )
    ort_plan = calibrate_tiny(wbits=4, **fields)
    trt_plan = calibrate_tiny(wbits=4, target="trt", **fields)
    old_path = dataclasses.replace(
        trt_plan,
        recipe=dataclasses.replace(trt_plan.recipe, target="ort"),
        weights=ort_plan.weights,
    )
    old = quantized_graph(tiny_loaded, old_path, target="trt", trt_weight_groups=1)
    new = quantized_graph(tiny_loaded, trt_plan, target="trt")
    assert old.graph.SerializeToString() == new.graph.SerializeToString()
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(7))
    want = TrtReferenceModel(tiny_loaded, old_path, weight_groups=1)(ids)
    assert torch.equal(TrtReferenceModel(tiny_loaded, trt_plan)(ids), want)


def test_negative_control_rtn_codes_for_one_gptq_weight_fail(
    trt_plan, calibrate_tiny, tiny_loaded, eval_ids
):
    """Layer 0 fc2 exported with folded RTN codes (layer 0's activation scales are the same in
    both plans, so the plan is consistent): parity with the GPTQ reference must fail."""
    plan = trt_plan("gptq-W4A4")
    rtn = calibrate_tiny(wbits=4, abits=4, target="trt", act_order=False)
    index = next(i for i, w in enumerate(plan.weights) if w.fqn.endswith("layers.0.fc2"))
    weights = list(plan.weights)
    weights[index] = rtn.weights[index]
    broken = dataclasses.replace(plan, weights=tuple(weights))
    result = compare(TrtReferenceModel(tiny_loaded, plan)(eval_ids),
                     ort_logits(tiny_loaded, broken)(eval_ids))  # fmt: skip
    assert result.sqnr_db < LOGITS_MIN_SQNR_DB, result.describe()


def test_negative_control_dropped_lorc_branches_fail(trt_plan, tiny_loaded, eval_ids):
    plan = trt_plan("rtn+lorc-W4A4")
    weights = tuple(dataclasses.replace(w, lorc=None) for w in plan.weights)
    broken = dataclasses.replace(plan, weights=weights)
    result = compare(TrtReferenceModel(tiny_loaded, plan)(eval_ids),
                     ort_logits(tiny_loaded, broken)(eval_ids))  # fmt: skip
    assert result.sqnr_db < LOGITS_MIN_SQNR_DB, result.describe()


def test_a_weight_calibrated_with_other_activation_scales_is_refused(
    trt_plan, calibrate_tiny, tiny_loaded
):
    """Layer 1's activation scales depend on layer 0's weights, so a layer 1 weight of the RTN
    plan was folded with other scales than the GPTQ plan's: export and reference refuse it."""
    plan = trt_plan("gptq-W4A4")
    rtn = calibrate_tiny(wbits=4, abits=4, target="trt", act_order=False)
    index = next(i for i, w in enumerate(plan.weights) if w.fqn.endswith("layers.1.fc1"))
    weights = list(plan.weights)
    weights[index] = rtn.weights[index]
    broken = dataclasses.replace(plan, weights=tuple(weights))
    with pytest.raises(PlanError, match="recalibrate with --target tensorrt"):
        quantized_graph(tiny_loaded, broken, target="trt")
    with pytest.raises(PlanError, match="other activation scales"):
        TrtReferenceModel(tiny_loaded, broken)(torch.zeros(1, 4, dtype=torch.long))
