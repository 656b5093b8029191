"""TensorRT-calibrated plans (`calibrate --target tensorrt`) in the TensorRT variant's graph:
rule checker, GPTQT as one GEMM per plane, LoRC branches on the INT8 activation, and plans
calibrated for one target exported for the other.

Numerical parity is in tests/parity/test_trt_weight_methods.py.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from rptq import names
from rptq.check.rules import check_model, errors
from rptq.errors import ConfigError
from rptq.points import LINEARS
from rptq.runtime.trt_reference import TrtReferenceModel
from rptq.workflow import quantized_graph

SETTINGS = {
    "gptq-W4A4": {"wbits": 4, "abits": 4, "weight_method": "gptq"},
    "gptqt-W3A4": {"wbits": 3, "abits": 4, "weight_method": "gptqt"},
    "rtn+lorc8-W4A8": {"wbits": 4, "abits": 8, "lorc_rank": 4, "lorc_bits": 8},
    "gptq+lorc-W4A4": {"wbits": 4, "abits": 4, "weight_method": "gptq", "lorc_rank": 4},
    "gptqt+lorc8-W4A4KV": {"wbits": 4, "abits": 4, "only_quant_kv": True,
                           "weight_method": "gptqt", "lorc_rank": 4, "lorc_bits": 8},
}  # fmt: skip


def trt_plan(calibrate_tiny, label: str):
    return calibrate_tiny(target="trt", **SETTINGS[label])


def producers(graph: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.graph.node for out in node.output}


@pytest.mark.parametrize(
    ("dtype", "block"),
    [("float32", 0), ("float16", 0), ("float32", 64)],
    ids=["fp32", "fp16", "int4"],
)
@pytest.mark.parametrize("label", sorted(SETTINGS))
def test_every_calibrated_variant_passes_the_tensorrt_checker(
    label, dtype, block, tiny_loaded, calibrate_tiny
):
    plan = trt_plan(calibrate_tiny, label)
    graph = quantized_graph(tiny_loaded, plan, dtype=dtype, target="trt", int4_block_size=block)
    violations = check_model(graph, "trt")
    assert errors(violations) == [], [v.line() for v in violations]
    assert [v.rule_id for v in violations] == (["TRT-FP16"] if dtype == "float32" else [])


@pytest.mark.parametrize("label", ["gptqt-W3A4", "gptqt+lorc8-W4A4KV"])
def test_gptqt_planes_each_feed_their_own_matmul(label, tiny_loaded, calibrate_tiny):
    """TensorRT fuses a weight DQ only into the MatMul it feeds: no DQ outputs are added."""
    plan = trt_plan(calibrate_tiny, label)
    graph = quantized_graph(tiny_loaded, plan, target="trt")
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    made = producers(graph)
    inits = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    bits = plan.recipe.wbits
    for layer in range(tiny_loaded.shape.num_layers):
        for linear in LINEARS:
            module = names.module(layer, linear)
            n = names.binary_weight(module, bits)
            matmuls = [consumers[n[f"plane{i}_dequantized"]] for i in range(bits)]
            assert matmuls[0][0].name == names.node(module, "MatMul")
            assert all(len(c) == 1 and c[0].op_type == "MatMul" for c in matmuls)
            inputs = {c[0].input[0] for c in matmuls}
            assert len(inputs) == 1  # every plane multiplies the same activation
            for i in range(bits):
                codes = inits[n[f"plane{i}"]]
                assert codes.dtype == np.int8
                assert set(np.unique(codes)) <= {-1, 0, 1}
                assert (inits[n[f"plane{i}_scale"]] > 0).all()
                assert not inits[n[f"plane{i}_zero_point"]].any()
            # β: the input's channel sum, on the same activation
            zero = names.weight_zero_correction(module)
            assert made[zero["reduced"]].input[0] in inputs
    counts = Counter(node.op_type for node in graph.graph.node)
    assert counts["MatMul"] >= 6 * tiny_loaded.shape.num_layers * bits


def test_lorc_branch_reads_the_int8_activation(tiny_loaded, calibrate_tiny):
    plan = trt_plan(calibrate_tiny, "rtn+lorc8-W4A8")
    graph = quantized_graph(tiny_loaded, plan, target="trt")
    made = producers(graph)
    inits = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    for layer in range(tiny_loaded.shape.num_layers):
        for linear in LINEARS:
            module = names.module(layer, linear)
            n = names.lorc(module)
            down = made[n["v_output"]]
            main_matmul = made[made[n["output"]].input[0]]
            if main_matmul.op_type == "Sum":  # scale groups: MatMul -> Split -> Sum
                assert main_matmul.name == names.weight_groups(module, 1)["sum_node"]
                main_matmul = made[made[main_matmul.input[0]].input[0]]
            assert main_matmul.name == names.node(module, "MatMul")
            assert down.input[0] == main_matmul.input[0]
            assert made[down.input[0]].op_type == "DequantizeLinear"  # the activation's Q/DQ
            for factor in ("u", "v"):
                assert inits[n[f"{factor}_quantized"]].dtype == np.int8
                assert not inits[n[f"{factor}_zero_point"]].any()  # TensorRT: zero points 0


def test_plans_exported_for_the_other_target_are_one_line_errors(tiny_loaded, calibrate_tiny):
    trt = trt_plan(calibrate_tiny, "gptq-W4A4")
    with pytest.raises(ConfigError, match="recalibrate with --target ort"):
        quantized_graph(tiny_loaded, trt, target="ort")
    for fields in ({"weight_method": "gptq"}, {"lorc_rank": 4}):
        ort = calibrate_tiny(wbits=4, abits=4, **fields)
        with pytest.raises(ConfigError, match="recalibrate with --target tensorrt") as info:
            quantized_graph(tiny_loaded, ort, target="trt")
        assert "\n" not in str(info.value)
        with pytest.raises(ConfigError, match="recalibrate with --target tensorrt"):
            TrtReferenceModel(tiny_loaded, ort)
    # an RTN plan for ONNX Runtime is still re-quantized (docs/tensorrt-rules.md)
    quantized_graph(tiny_loaded, calibrate_tiny(wbits=4, abits=4), target="trt")


def test_reference_uses_the_calibrated_codes(tiny_loaded, calibrate_tiny):
    """The TensorRT reference of a calibrated plan is the plan's own weights (values())."""
    plan = trt_plan(calibrate_tiny, "gptq+lorc-W4A4")
    reference = TrtReferenceModel(tiny_loaded, plan)
    weights, _ = reference.layer(0)
    for linear in LINEARS:
        quant = plan.weight(names.module(0, linear))
        assert torch.equal(weights[f"{linear}.weight"], torch.from_numpy(quant.values()))
