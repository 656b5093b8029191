"""Each weight method's ONNX graph against its PyTorch reference (RTN, GPTQ, GPTQT, ± LoRC).

Same bounds as the export parity (tests/tolerances.py): logits SQNR and perplexity. GPTQT
weights are additionally bit-equal between the graph and the reference (planes summed in the
same order), and the graph's structure and sizes are checked per method.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from rptq import names
from rptq.errors import ConfigError, GraphPatternError
from rptq.exporter.opt import build_fp_graph
from rptq.passes.binary_weights import graph_order
from rptq.passes.context import PassContext
from rptq.passes.pipeline import run_passes
from rptq.plan import QuantPlan
from rptq.plan_weights import BinaryCode
from rptq.points import LINEARS
from rptq.runtime.ort import OrtLogits, make_session
from rptq.runtime.parity import compare
from rptq.runtime.perplexity import perplexity
from rptq.runtime.reference import ReferenceModel
from rptq.workflow import quantized_graph
from tests.tolerances import LOGITS_MIN_SQNR_DB, PPL_MAX_REL_DIFF

SETTINGS = {"W4A16": {"wbits": 4}, "W4A4": {"wbits": 4, "abits": 4}}
METHODS = {
    "rtn": {},
    "gptq": {"weight_method": "gptq"},
    "gptqt": {"weight_method": "gptqt"},
    "rtn+lorc": {"lorc_rank": 4},
    "gptq+lorc8": {"weight_method": "gptq", "lorc_rank": 4, "lorc_bits": 8},
    "gptqt+lorc": {"weight_method": "gptqt", "lorc_rank": 4},
    "gptq+groups": {"weight_method": "gptq", "weight_group_size": 16, "act_order": True},
}


@pytest.fixture(scope="module")
def eval_ids():
    return torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(42))


def check_parity(loaded, plan: QuantPlan, graph: onnx.ModelProto, ids: torch.Tensor) -> None:
    reference = ReferenceModel(loaded, plan)
    ort = OrtLogits(make_session(graph, optimize=False))
    result = compare(reference(ids), ort(ids))
    assert result.sqnr_db >= LOGITS_MIN_SQNR_DB, result.describe()
    ppl_ref, ppl_ort = perplexity(reference, ids).ppl, perplexity(ort, ids).ppl
    assert abs(ppl_ort - ppl_ref) / ppl_ref <= PPL_MAX_REL_DIFF, (ppl_ref, ppl_ort)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_ort_matches_reference(method, setting, tiny_loaded, calibrate_tiny, eval_ids):
    plan = calibrate_tiny(**SETTINGS[setting], **METHODS[method])
    check_parity(tiny_loaded, plan, quantized_graph(tiny_loaded, plan), eval_ids)


@pytest.mark.parametrize("method", ["gptq+lorc8", "gptqt"])
def test_kv_only_plans_fold_only_their_sites(method, tiny_loaded, calibrate_tiny, eval_ids):
    """W3A3KV reorders only R2/R3: out_proj's columns follow R3, the other linears' inputs
    keep their order (absent sites are the identity for the sweep and for the export)."""
    plan = calibrate_tiny(wbits=3, abits=3, only_quant_kv=True, **METHODS[method])
    assert {s.point.value for s in plan.sites} == {"R2", "R3"}
    check_parity(tiny_loaded, plan, quantized_graph(tiny_loaded, plan), eval_ids)


@pytest.mark.parametrize("optimize", [False, True], ids=["ORT_DISABLE_ALL", "ORT_ENABLE_ALL"])
def test_grouped_weights_are_blocked_dequantize_linear(
    optimize, tiny_loaded, calibrate_tiny, eval_ids
):
    plan = calibrate_tiny(wbits=4, abits=4, weight_method="gptq", weight_group_size=16)
    graph = quantized_graph(tiny_loaded, plan)
    nodes = {node.name: node for node in graph.graph.node}
    for quant in plan.weights:
        node = nodes[names.quantized_weight(quant.fqn)["node"]]
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs == {"axis": 0, "block_size": 16}
    reference = ReferenceModel(tiny_loaded, plan)
    ort = OrtLogits(make_session(graph, optimize=optimize))
    result = compare(reference(eval_ids), ort(eval_ids))
    assert result.sqnr_db >= LOGITS_MIN_SQNR_DB, result.describe()


def graph_tensors(graph: onnx.ModelProto, wanted: list[str], ids: torch.Tensor) -> list:
    """Intermediate tensors of the graph as ORT computes them (no optimisation)."""
    model = onnx.ModelProto()
    model.CopyFrom(graph)
    for name in wanted:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = make_session(model, optimize=False)
    feeds = {
        names.GRAPH_INPUT_IDS: ids.numpy(),
        names.GRAPH_ATTENTION_MASK: np.ones_like(ids.numpy()),
    }
    return session.run(wanted, feeds)


def graph_plane_weight(graph: onnx.ModelProto, fqn: str, bits: int, ids: torch.Tensor):
    """A GPTQT linear's weight from the graph's own plane DequantizeLinear outputs and β,
    summed in the reference's order (planes in index order, β last) in float32."""
    n = names.binary_weight(fqn, bits)
    planes = graph_tensors(graph, [n[f"plane{i}_dequantized"] for i in range(bits)], ids)
    beta = next(
        onnx.numpy_helper.to_array(init)
        for init in graph.graph.initializer
        if init.name == n["offset"]
    )
    total = planes[0]
    for plane in planes[1:]:
        total = total + plane
    return total + beta


def reference_weight(plan: QuantPlan, fqn: str) -> np.ndarray:
    """The reference's weight without its LoRC term, in the graph layout [in, out]."""
    quant = dataclasses.replace(plan.weight(fqn), lorc=None)
    rows, cols = graph_order(
        plan, quant.layer, quant.linear, quant.codes.shape[1], quant.codes.shape[0]
    )
    return quant.values().T[np.ix_(rows, cols)]


@pytest.mark.parametrize("opset", [21, 25])
def test_gptqt_graph_planes_equal_the_reference_bit_for_bit(
    opset, tiny_loaded, calibrate_tiny, eval_ids
):
    """The graph multiplies each plane on its own (so ORT fuses every plane's DQ into an
    integer MatMul); its planes and β, summed as the reference sums them, are the reference's
    weight bit for bit, and the reassociated products keep the parity bounds."""
    plan = calibrate_tiny(wbits=3, abits=4, weight_method="gptqt")
    graph = quantized_graph(tiny_loaded, plan, opset=opset)
    for linear in LINEARS:
        fqn = names.module(1, linear)
        np.testing.assert_array_equal(
            graph_plane_weight(graph, fqn, 3, eval_ids[:1]), reference_weight(plan, fqn)
        )
    check_parity(tiny_loaded, plan, graph, eval_ids)


def initializer_types(graph: onnx.ModelProto) -> dict[str, int]:
    return {init.name: init.data_type for init in graph.graph.initializer}


def test_gptqt_structure_and_plane_storage(tiny_loaded, calibrate_tiny):
    plan = calibrate_tiny(wbits=3, weight_method="gptqt")
    layers, n = tiny_loaded.shape.num_layers, 3
    int4 = quantized_graph(tiny_loaded, plan, opset=21)
    int2 = quantized_graph(tiny_loaded, plan, opset=25)
    ops = Counter(node.op_type for node in int4.graph.node)
    assert ops["DequantizeLinear"] == 6 * layers * n  # one per plane, no activation Q/DQ
    types4, types2 = initializer_types(int4), initializer_types(int2)
    plane = names.binary_weight(names.module(0, "fc1"), n)["plane0"]
    assert types4[plane] == onnx.TensorProto.INT4
    assert types2[plane] == onnx.TensorProto.INT2
    assert names.weight(names.module(0, "fc1")) not in types4  # the float weight is gone
    # planes: n·2 bits per weight at opset 25 vs n·4 at opset 21
    weights = 6 * layers
    saved = int4.ByteSize() - int2.ByteSize()
    planes = [init for init in int4.graph.initializer if init.data_type == onnx.TensorProto.INT4]
    elements = sum(int(np.prod(init.dims)) for init in planes if init.name.endswith(
        tuple(f".weight_plane{i}" for i in range(n))))  # fmt: skip
    assert saved == pytest.approx(elements / 4, rel=0.02)
    assert weights * n == sum(1 for name in types4 if name.endswith("_scale") and "plane" in name)


def test_lorc_branch_structure(tiny_loaded, calibrate_tiny):
    plan = calibrate_tiny(wbits=4, abits=4, weight_method="gptq", lorc_rank=4, lorc_bits=8)
    graph = quantized_graph(tiny_loaded, plan)
    nodes = {node.name: node for node in graph.graph.node}
    for layer in range(tiny_loaded.shape.num_layers):
        for linear in LINEARS:
            fqn = names.module(layer, linear)
            n = names.lorc(fqn)
            down, up, add = nodes[n["v_matmul"]], nodes[n["u_matmul"]], nodes[n["add_node"]]
            main = nodes[names.node(fqn, "MatMul")]
            assert down.input[0] == main.input[0]  # the branch reads what the main path reads
            assert list(up.input) == [down.output[0], n["u_dequantized"]]
            assert list(add.input) == [main.output[0], up.output[0]]
            assert nodes[names.node(fqn, "Add")].input[0] == add.output[0]  # before the bias
    types = initializer_types(graph)
    assert types[names.lorc(names.module(0, "fc2"))["v_quantized"]] in (
        onnx.TensorProto.INT8,
        onnx.TensorProto.INT16,
    )


def test_binary_planes_refuse_a_weight_they_do_not_stand_for(tiny_loaded, calibrate_tiny):
    plan = calibrate_tiny(wbits=3, weight_method="gptqt")
    first = plan.weights[0]
    shuffled = first.codes[:, np.random.default_rng(0).permutation(first.codes.shape[1])]
    broken = dataclasses.replace(plan, weights=(dataclasses.replace(first, codes=shuffled),
                                                *plan.weights[1:]))  # fmt: skip
    with pytest.raises(GraphPatternError, match="relative Frobenius"):
        quantized_graph(tiny_loaded, broken)


def test_negative_control_perturbed_planes_fail_parity(tiny_loaded, calibrate_tiny, eval_ids):
    """A graph built from other α than the reference's must fail the logits bound."""
    plan = calibrate_tiny(wbits=4, abits=4, weight_method="gptqt")
    weights = []
    for quant in plan.weights:
        if quant.fqn.endswith("fc2"):
            alpha = quant.binary.alpha.copy()
            alpha[:, 0] *= 1.25
            quant = dataclasses.replace(quant, binary=BinaryCode(alpha, quant.binary.beta))
        weights.append(quant)
    graph = quantized_graph(tiny_loaded, dataclasses.replace(plan, weights=tuple(weights)))
    result = compare(
        ReferenceModel(tiny_loaded, plan)(eval_ids),
        OrtLogits(make_session(graph, optimize=False))(eval_ids),
    )
    assert result.sqnr_db < LOGITS_MIN_SQNR_DB, result.describe()


def test_tensorrt_target_refuses_binary_plans_calibrated_for_ort(tiny_loaded, calibrate_tiny):
    """GPTQT planes of W would lose their optimisation in the variant's folded domain."""
    plan = calibrate_tiny(wbits=3, weight_method="gptqt")
    graph = build_fp_graph(tiny_loaded)
    with pytest.raises(ConfigError, match="recalibrate with --target tensorrt"):
        run_passes(graph, PassContext(plan=plan, target="trt"))
