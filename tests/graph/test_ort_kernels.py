"""Every quantized weight reaches an integer kernel in ONNX Runtime (issue 12).

ORT rewrites a weight DequantizeLinear + MatMul into MatMulNBits only when its selector's
pattern matches; otherwise the weight is dequantized to float on every call, which is slower
than the FP model. These tests read the graph ORT really runs (its optimized model, with the
session options rptq uses) for each recipe on the tiny model, so a change to the graph form
cannot silently fall back to float weights.
"""

from __future__ import annotations

import onnx
import pytest

from rptq import names
from rptq.points import LINEARS
from rptq.runtime.ort_kernels import kernel_report
from rptq.workflow import quantized_graph

RECIPES = {
    "W4A16": {"wbits": 4},
    "W4A8": {"wbits": 4, "abits": 8},
    "W4A4": {"wbits": 4, "abits": 4},
    "W8A8": {"wbits": 8, "abits": 8},
    "W4A4KV": {"wbits": 4, "abits": 4, "only_quant_kv": True},
    "W3A3KV": {"wbits": 3, "abits": 3, "only_quant_kv": True},
    "GPTQ": {"wbits": 4, "abits": 4, "weight_method": "gptq"},
    "GPTQT": {"wbits": 3, "abits": 4, "weight_method": "gptqt"},
    "LoRC": {"wbits": 4, "abits": 4, "lorc_rank": 4},
    "LoRC8": {"wbits": 4, "abits": 4, "lorc_rank": 4, "lorc_bits": 8},
    "groups": {"wbits": 4, "abits": 4, "weight_method": "gptq", "weight_group_size": 16},
}


def kept_on_purpose(plan) -> set[str]:
    """Weight DQs that stay in float by design, each with its reason.

    LoRC's int8 factors: V̂ [in, R] is scaled per *input* channel (axis 0), which no integer
    MatMul kernel applies after the product, and Ûᵀ [R, out] has a reduction dim of R (4..16)
    below MatMulNBits' smallest block; together they are R·(in + out) values: at R = 8, 2.1 % of
    an OPT-125m 768x768 projection's weights, 0.8 % of an OPT-1.3B 2048x2048 one.
    """
    kept = set()
    for quant in plan.weights:
        if quant.lorc is not None and quant.lorc.v.scale is not None:
            lorc = names.lorc(quant.fqn)
            kept |= {lorc["v_dq_node"], lorc["u_dq_node"]}
    return kept


# the prefill graph, the decoder with past and (where K/V are quantized) its integer cache
GRAPHS = {
    "prefill": {},
    "past": {"past": True},
    "past-int8": {"past": True, "kv_cache_dtype": "int8"},
}
KERNEL_CASES = [
    (label, graph)
    for label in sorted(RECIPES)
    for graph in GRAPHS
    if graph != "past-int8" or RECIPES[label].get("abits", 16) <= 8
]


# the portable per-axis Q/DQ form (--act-quant-form qdq) must fuse its weights too
QDQ_FORM_CASES = [("W4A8", "prefill"), ("W3A3KV", "past"), ("W4A4KV", "past-int8")]


@pytest.mark.parametrize(
    ("label", "graph", "form"),
    [(*case, "elementwise") for case in KERNEL_CASES] + [(*c, "qdq") for c in QDQ_FORM_CASES],
)
def test_every_weight_runs_as_an_integer_matmul(label, graph, form, tiny_loaded, calibrate_tiny):
    plan = calibrate_tiny(**RECIPES[label])
    options = GRAPHS[graph]
    model = quantized_graph(tiny_loaded, plan, act_quant_form=form, **options)
    report = kernel_report(model)
    left = set(report.float_weight_dequantize) - kept_on_purpose(plan)
    assert not left, f"{label}: ORT dequantizes these weights to float on every call: {left}"
    if form == "elementwise":
        # no activation quantizer falls back to ORT's element-by-element per-axis Q/DQ kernels
        assert not report.per_axis_activation_qdq, report.per_axis_activation_qdq
    else:  # negative control: the report sees the per-axis pairs the qdq form writes
        assert report.per_axis_activation_qdq
    layers = tiny_loaded.shape.num_layers
    planes = max((q.binary.alpha.shape[1] for q in plan.weights if q.binary), default=1)
    # one integer MatMul per weight (per binary plane for GPTQT)
    assert report.integer_matmuls == len(LINEARS) * layers * planes, report.op_counts


def test_the_kernel_report_sees_a_float_weight(tiny_loaded, calibrate_tiny):
    """Negative control: a weight DQ read by another node besides its MatMul cannot fuse, and
    the report must name it."""
    plan = calibrate_tiny(**RECIPES["W4A4"])
    model = quantized_graph(tiny_loaded, plan)
    weight = names.quantized_weight(names.module(0, "fc1"))
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(weight["output"]))
    report = kernel_report(model)
    # ORT keeps the DQ for the graph output and may give the MatMul its own copy
    # ("<node>/duplicated", EnsureUniqueDQForNodeUnit); neither fuses
    left = report.float_weight_dequantize
    assert weight["node"] in left, left
    assert all(name.startswith(weight["node"]) for name in left), left
