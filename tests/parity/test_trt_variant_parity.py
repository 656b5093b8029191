"""The TensorRT variant (`--target tensorrt`) in ONNX Runtime vs its PyTorch reference.

Same bounds as the default target (tests/tolerances.py): per quantized activation, ORT's codes
against the reference's, in quantization steps, plus the exact grid of each Q/DQ; logit SQNR
and perplexity with and without ORT's graph optimisations. The folds alone must compute the FP
model, 16-bit activations and weights must give the FP graph, and perturbing one cluster scale
in the graph only must fail (negative control).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch

from rptq import names
from rptq.exporter import build_fp_graph
from rptq.passes import PassContext, run_passes
from rptq.passes.tensorrt.acts import quantized_input_name
from rptq.plan import QuantPlan
from rptq.points import SITE_OF
from rptq.quant.clusters import expand_to_positions
from rptq.quant.qparams import grid_bounds
from rptq.runtime.ort import OrtLogits, make_session
from rptq.runtime.parity import compare, steps_apart
from rptq.runtime.perplexity import perplexity
from rptq.runtime.reference import ReferenceModel
from rptq.runtime.trt_reference import TrtReferenceModel
from rptq.workflow import quantized_graph
from tests.graph.test_trt_variant import RECIPES  # the variant's recipes, shared
from tests.parity.activations import record_activations
from tests.tolerances import (
    FOLD_ATOL,
    LOGITS_MIN_SQNR_DB,
    PPL_MAX_REL_DIFF,
    QDQ_DRIFT_MAX_STEPS,
    QDQ_MAX_FLIPPED_FRACTION,
    TRT_VARIANT_FP16_MIN_SQNR_DB,
)

QUANTIZED_ACTS = ("W4A8", "W4A4", "W4A4KV", "W3A3KV")


@pytest.fixture(scope="module")
def eval_ids():
    return torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(42))


def trt_graph(loaded, plan: QuantPlan | None, **options) -> onnx.ModelProto:
    return quantized_graph(loaded, plan, target="trt", **options)


def reference_activations(loaded, plan: QuantPlan, ids: torch.Tensor) -> dict:
    """Every quantized activation X̂ as the variant's reference computes it, by (layer, act)."""
    return record_activations(TrtReferenceModel(loaded, plan), loaded, plan, ids)


def ort_qdq(graph: onnx.ModelProto, plan: QuantPlan, ids: torch.Tensor) -> dict:
    """(input of Q = U, output of DQ) of every quantized activation, from ORT."""
    model = onnx.ModelProto()
    model.CopyFrom(graph)
    wanted = {}
    for quant in plan.acts:
        act_name = names.act_tensor(quant.layer, quant.act)
        pair = (quantized_input_name(quant.layer, quant.act), names.qdq(act_name)["dequantized"])
        wanted[(quant.layer, quant.act)] = pair
        for name in pair:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = make_session(model, optimize=False)
    feeds = {names.GRAPH_INPUT_IDS: ids.numpy(), names.GRAPH_ATTENTION_MASK: np.ones_like(ids)}
    flat = [name for pair in wanted.values() for name in pair]
    values = dict(zip(flat, session.run(flat, feeds), strict=True))
    return {key: (values[u], values[c]) for key, (u, c) in wanted.items()}


def positions_params(plan: QuantPlan, layer: int, act) -> tuple[np.ndarray, np.ndarray]:
    """Scale/zero of `act` per channel in the graph's (folded) order."""
    quant = plan.act(layer, act)
    if act not in SITE_OF:
        return quant.scale.astype(np.float32), quant.zero.astype(np.float32)
    sizes = plan.site(layer, SITE_OF[act]).sizes
    return (
        expand_to_positions(quant.scale.astype(np.float32), sizes),
        expand_to_positions(quant.zero.astype(np.float32), sizes),
    )


def code_mismatches(loaded, plan_ref: QuantPlan, plan_graph: QuantPlan, ids) -> list[str]:
    """Activations where the variant's graph departs from the reference, as failure lines.

    Grid: ORT's DQ output must be exactly clamp(round(U)) (scale 1) or, per tensor,
    s·clamp(round(U/s)): the encoding itself. Drift: the codes, turned back into X̂ with the
    reference plan's s and z, may differ from the reference's X̂ only where float rounding
    pushed a value across a rounding boundary (few codes, few steps).
    """
    graph = trt_graph(loaded, plan_graph)
    ref = reference_activations(loaded, plan_ref, ids)
    failures = []
    for (layer, act), (u, dq) in ort_qdq(graph, plan_graph, ids).items():
        qmin, qmax = grid_bounds(plan_graph.act(layer, act).bits)
        if act in SITE_OF:
            grid, codes = np.clip(np.round(u), qmin, qmax), dq
        else:
            step = plan_graph.act(layer, act).scale.astype(np.float32)[0]
            grid = (np.clip(np.round(u / step), qmin, qmax) * step).astype(np.float32)
            codes = np.round(dq / step)
        if not np.array_equal(grid, dq):
            failures.append(f"layer {layer} {act}: DQ output off the integer grid")
        scale, zero = positions_params(plan_ref, layer, act)
        got = torch.from_numpy(((codes - zero) * scale).astype(np.float32))
        want = ref[(layer, act)]
        if act in SITE_OF:  # the graph holds channels in folded (cluster-contiguous) order
            want = want[..., torch.from_numpy(plan_ref.site(layer, SITE_OF[act]).perm)]
        steps, flipped = steps_apart(want, got, torch.from_numpy(scale))
        if steps > QDQ_DRIFT_MAX_STEPS or flipped > QDQ_MAX_FLIPPED_FRACTION:
            failures.append(
                f"layer {layer} {act}: {steps:.2f} steps max, {flipped:.2%} codes differ"
            )
    return failures


@pytest.mark.parametrize("label", QUANTIZED_ACTS)
def test_codes_match_the_reference(label, tiny_loaded, calibrate_tiny, eval_ids):
    plan = calibrate_tiny(**RECIPES[label])
    assert code_mismatches(tiny_loaded, plan, plan, eval_ids) == []


@pytest.mark.parametrize("optimize", [False, True], ids=["ORT_DISABLE_ALL", "ORT_ENABLE_ALL"])
@pytest.mark.parametrize("label", sorted(RECIPES))
def test_logits_and_perplexity(label, optimize, tiny_loaded, calibrate_tiny, eval_ids):
    plan = calibrate_tiny(**RECIPES[label])
    reference = TrtReferenceModel(tiny_loaded, plan)
    ort = OrtLogits(make_session(trt_graph(tiny_loaded, plan), optimize=optimize))
    result = compare(reference(eval_ids), ort(eval_ids))
    assert result.sqnr_db >= LOGITS_MIN_SQNR_DB, f"{label}: {result.describe()}"
    ppl_ref = perplexity(reference, eval_ids).ppl
    ppl_ort = perplexity(ort, eval_ids).ppl
    assert abs(ppl_ort - ppl_ref) / ppl_ref <= PPL_MAX_REL_DIFF, (ppl_ref, ppl_ort)


def test_int4_blocked_weights_compute_the_same_model(tiny_loaded, calibrate_tiny, eval_ids):
    """INT4 blocks repeat the per-channel scales; kept plan codes subtract their zero points."""
    for label in ("W4A4", "W4A16"):
        plan = calibrate_tiny(**RECIPES[label])
        int8 = OrtLogits(make_session(trt_graph(tiny_loaded, plan), optimize=False))
        int4 = OrtLogits(
            make_session(trt_graph(tiny_loaded, plan, int4_block_size=64), optimize=False)
        )
        result = compare(int8(eval_ids), int4(eval_ids))
        assert result.max_abs <= FOLD_ATOL, f"{label}: {result.describe()}"


def perturb_one_cluster(plan: QuantPlan, layer: int, act, cluster: int, factor: float) -> QuantPlan:
    acts = []
    for quant in plan.acts:
        if quant.layer == layer and quant.act == act:
            scale = quant.scale.copy()
            scale[cluster] *= factor
            quant = dataclasses.replace(quant, scale=scale)
        acts.append(quant)
    return dataclasses.replace(plan, acts=tuple(acts))


def test_negative_control_one_perturbed_cluster_scale_fails(tiny_loaded, calibrate_tiny, eval_ids):
    """One cluster scale of layer 1 fc2_in ×1.25 in the graph's plan only.

    The variant folds the scale on both sides (fc1's columns, fc2's rows), so the perturbed
    graph is a self-consistent but coarser quantizer: it shows as codes that differ from the
    reference's, not as an off-grid DQ. The largest cluster is perturbed because a cluster of
    dead ReLU channels (all codes at the zero point) would change nothing.
    """
    plan = calibrate_tiny(**RECIPES["W4A4"])
    target = next(a for a in plan.acts if a.layer == 1 and a.act.value == "fc2_in")
    cluster = int(np.argmax(plan.site(1, SITE_OF[target.act]).sizes))
    broken = perturb_one_cluster(plan, target.layer, target.act, cluster, 1.25)
    failures = code_mismatches(tiny_loaded, plan, broken, eval_ids)
    assert any(f.startswith("layer 1 fc2_in:") and "steps max" in f for f in failures), failures
    ort = OrtLogits(make_session(trt_graph(tiny_loaded, broken), optimize=False))
    result = compare(TrtReferenceModel(tiny_loaded, plan)(eval_ids), ort(eval_ids))
    assert result.sqnr_db < LOGITS_MIN_SQNR_DB, result.describe()


def test_folds_alone_compute_the_fp_model(tiny_loaded, calibrate_tiny, eval_ids):
    """Scales and zero points folded (A4 parameters), float weights, no Q/DQ: the FP model."""
    plan = calibrate_tiny(wbits=16, abits=4)
    fp = build_fp_graph(tiny_loaded, "float32")
    folded, _ = run_passes(fp, PassContext(plan=plan, target="trt"), stop_after="trt_fold")
    assert not any(n.op_type == "QuantizeLinear" for n in folded.graph.node)
    got = OrtLogits(make_session(folded, optimize=False))(eval_ids)
    want = OrtLogits(make_session(fp, optimize=False))(eval_ids)
    diff = (got - want).abs().max().item()
    assert diff <= FOLD_ATOL, f"max |diff| {diff:.3g}"


def test_sixteen_bit_variant_is_the_fp_graph(tiny_loaded, calibrate_tiny, eval_ids):
    plan = calibrate_tiny(**RECIPES["W16A16"])
    graph = trt_graph(tiny_loaded, plan)
    assert not any("Quantize" in n.op_type for n in graph.graph.node)
    got = OrtLogits(make_session(graph, optimize=False))(eval_ids)
    want = OrtLogits(make_session(trt_graph(tiny_loaded, None), optimize=False))(eval_ids)
    diff = (got - want).abs().max().item()
    assert diff <= FOLD_ATOL, f"max |diff| {diff:.3g}"


@pytest.mark.parametrize("label", ["W4A16", "W4A4KV", "W3A3KV", "W16A16"])
def test_reference_is_the_default_one_where_nothing_folds_into_a_linear(
    label, tiny_loaded, calibrate_tiny, eval_ids
):
    """No quantized linear input: the plan's own codes are kept (C − z as INT8), bit for bit."""
    plan = calibrate_tiny(**RECIPES[label])
    default = ReferenceModel(tiny_loaded, plan)(eval_ids)
    assert torch.equal(TrtReferenceModel(tiny_loaded, plan)(eval_ids), default)


@pytest.mark.parametrize("label", ["W4A8", "W4A4", "W4A16"])
def test_float16_export_runs_close_to_the_reference(label, tiny_loaded, calibrate_tiny, eval_ids):
    plan = calibrate_tiny(**RECIPES[label])
    graph = trt_graph(tiny_loaded, plan, dtype="float16")
    result = compare(
        TrtReferenceModel(tiny_loaded, plan)(eval_ids),
        OrtLogits(make_session(graph, optimize=False))(eval_ids),
    )
    assert result.sqnr_db >= TRT_VARIANT_FP16_MIN_SQNR_DB, f"{label}: {result.describe()}"
