"""The elementwise activation quantizer computes what the per-axis Q/DQ pair computes (issue 12).

rptq's ONNX Runtime target writes each per-cluster activation quantizer as
Div -> Round -> Max -> Min -> Mul (rptq.passes.elementwise_quant) because ORT's CPU provider runs
per-axis QuantizeLinear/DequantizeLinear element by element. The change must not move a single
value: clip(round(x/s) + z, qmin, qmax) - z = clip(round(x/s), qmin - z, qmax - z) for an
integer z, both forms divide by s and round half to even, and code * s is one rounding in both.
So the tolerance here is zero, on every machine: the two graphs run the same kernels on the same
values everywhere else. (Round keeps the sign of a zero that DequantizeLinear drops; -0.0 ==
0.0, and no sum downstream can tell them apart, so values are compared, not bits.)
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from rptq import names
from rptq.passes.elementwise_quant import insert_elementwise
from rptq.quant.qparams import fake_quant, grid_bounds
from rptq.runtime.decode import DecoderSession
from rptq.runtime.ort import make_session
from rptq.runtime.parity import sqnr_db
from rptq.workflow import quantized_graph
from tests.tolerances import FLOAT16_ACT_QUANT_MIN_SQNR_DB, FLOAT16_FORMS_MAX_GAP_DB

RECIPES = {
    "W4A8": {"wbits": 4, "abits": 8},
    "W4A4": {"wbits": 4, "abits": 4},
    "W8A8": {"wbits": 8, "abits": 8},
    "W3A3KV": {"wbits": 3, "abits": 3, "only_quant_kv": True},
    "GPTQT-LoRC": {"wbits": 3, "abits": 4, "weight_method": "gptqt", "lorc_rank": 4},
}
# (recipe, graph options), float32 graphs (float16: see the tests after this one)
CASES = [
    *((label, {}) for label in RECIPES),
    ("W4A8", {"past": True}),
    ("W4A4", {"past": True, "kv_cache_dtype": "int8"}),
    ("W3A3KV", {"past": True, "kv_cache_dtype": "uint8"}),
]


def _ids(case: tuple) -> str:
    label, options = case
    return "-".join([label, *(str(v) for v in options.values())])


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_elementwise_graph_equals_the_qdq_graph(case, tiny_loaded, calibrate_tiny):
    label, options = case
    plan = calibrate_tiny(**RECIPES[label])
    ids = np.random.default_rng(3).integers(0, 512, (2, 24), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    outputs = {}
    for form in ("elementwise", "qdq"):
        graph = quantized_graph(tiny_loaded, plan, act_quant_form=form, **options)
        ops = {node.op_type for node in graph.graph.node}
        assert ("Round" in ops) == (form == "elementwise"), (form, sorted(ops))
        session = make_session(graph)
        if options.get("past"):
            decoder = DecoderSession(session)
            logits, cache = decoder.step(ids[:, :20], mask[:, :20], decoder.empty_cache(2))
            step_logits, present = decoder.step(ids[:, 20:], mask, cache)
            outputs[form] = [logits, step_logits, *(t for layer in present for t in layer)]
        else:
            feeds = {names.GRAPH_INPUT_IDS: ids, names.GRAPH_ATTENTION_MASK: mask}
            outputs[form] = session.run(None, feeds)
    for got, want in zip(outputs["elementwise"], outputs["qdq"], strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def _logits(loaded, plan, dtype: str, form: str, ids: np.ndarray) -> np.ndarray:
    graph = quantized_graph(loaded, plan, dtype=dtype, act_quant_form=form)
    feeds = {names.GRAPH_INPUT_IDS: ids, names.GRAPH_ATTENTION_MASK: np.ones_like(ids)}
    return make_session(graph).run(None, feeds)[0].astype(np.float32)


def test_float16_exports_keep_the_qdq_pair_by_default(tiny_loaded, calibrate_tiny):
    """ "auto" writes the elementwise form in float32 and the Q/DQ pair in float16 (ONNX
    Runtime's CPU provider would feed the elementwise form unrounded float32 values)."""
    plan = calibrate_tiny(**RECIPES["W4A4"])
    for dtype, elementwise in (("float32", True), ("float16", False)):
        ops = {n.op_type for n in quantized_graph(tiny_loaded, plan, dtype=dtype).graph.node}
        assert ("Round" in ops) == elementwise, (dtype, sorted(ops))
        assert "QuantizeLinear" in ops  # attn_probs (per tensor) keeps its pair in both forms


def test_float16_elementwise_form_is_as_close_as_the_qdq_form(tiny_loaded, calibrate_tiny):
    """An explicit elementwise float16 export: both forms are float16 roundings away from the
    float32 export of the same plan, equally far (tests/tolerances.py)."""
    plan = calibrate_tiny(**RECIPES["W4A4"])
    ids = np.random.default_rng(4).integers(0, 512, (2, 32), dtype=np.int64)
    want = _logits(tiny_loaded, plan, "float32", "elementwise", ids)
    sqnr = {
        form: sqnr_db(want, _logits(tiny_loaded, plan, "float16", form, ids))
        for form in ("qdq", "elementwise")
    }
    assert min(sqnr.values()) >= FLOAT16_ACT_QUANT_MIN_SQNR_DB, sqnr
    assert abs(sqnr["elementwise"] - sqnr["qdq"]) <= FLOAT16_FORMS_MAX_GAP_DB, sqnr


def _quantizer_model(channels: int, form: str, dtype: np.dtype, scale, zero, bits) -> bytes:
    """One activation quantizer on [1, T, channels], in either form."""
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    if form == "qdq":
        qmin, qmax = grid_bounds(bits)
        s32, z32 = scale.astype(np.float32), zero.astype(np.float32)
        inits = [
            numpy_helper.from_array(scale, "s"),
            numpy_helper.from_array(zero, "z"),
            numpy_helper.from_array(((qmin - z32) * s32).astype(dtype), "lo"),
            numpy_helper.from_array(((qmax - z32) * s32).astype(dtype), "hi"),
        ]
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=2),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], axis=2),
            helper.make_node("Max", ["d", "lo"], ["m"]),
            helper.make_node("Min", ["m", "hi"], ["y"]),
        ]
        x = helper.make_tensor_value_info("x", elem, [1, None, channels])
        y = helper.make_tensor_value_info("y", elem, [1, None, channels])
        graph = helper.make_graph(nodes, "qdq", [x], [y], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    x = gs.Variable("x", dtype=dtype, shape=[1, "T", channels])
    act = gs.Variable("act", dtype=dtype, shape=[1, "T", channels])
    y = gs.Variable("y", dtype=dtype, shape=[1, "T", channels])
    graph = gs.Graph(
        nodes=[
            gs.Node("Identity", "produce", inputs=[x], outputs=[act]),
            gs.Node("Identity", "consume", inputs=[act], outputs=[y]),
        ],
        inputs=[x],
        outputs=[y],
        opset=21,
    )
    insert_elementwise(graph, act, scale, zero, bits, np.dtype(dtype))
    return gs.export_onnx(graph.cleanup().toposort())


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_quantizer_on_ties_and_extremes(bits, dtype):
    """Values at and one ulp around every rounding tie, past both ends of the grid, zeros,
    and huge values: the elementwise form equals the Q/DQ pair and numpy's fake_quant."""
    rng = np.random.default_rng(bits)
    clusters, size = 6, 8
    channels = clusters * size
    scale = np.repeat(rng.uniform(0.01, 0.3, clusters), size).astype(np.float32).astype(dtype)
    qmin, qmax = grid_bounds(bits)
    zero = np.repeat(rng.integers(qmin, qmax + 1, clusters), size).astype(np.int8)
    s32 = scale.astype(np.float32)
    ties = (rng.integers(qmin - 3, qmax + 4, (64, channels)) + 0.5) * s32
    rows = [ties]
    for direction in (-np.inf, np.inf):
        rows.append(np.nextafter(ties.astype(dtype), dtype(direction)).astype(np.float32))
    rows.append(np.zeros((1, channels), np.float32))
    rows.append(np.full((1, channels), 6.0e4 if dtype == np.float16 else 1e9, np.float32))
    rows.append(-rows[-1])
    x = np.concatenate(rows).astype(dtype)[None]
    got = {}
    for form in ("elementwise", "qdq"):
        model = _quantizer_model(channels, form, np.dtype(dtype), scale, zero, bits)
        got[form] = make_session(model).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got["elementwise"], got["qdq"])
    want = fake_quant(x.astype(np.float32), s32, zero.astype(np.int32), bits).astype(dtype)
    np.testing.assert_array_equal(got["elementwise"], want)
