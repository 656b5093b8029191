"""The TensorRT rule checker: one hand-built violating graph and a passing twin per rule.

Each case builds two minimal graphs with onnx.helper that differ only in what the rule is
about; the violating one must raise that rule, the twin must be clean (no error of any rule),
so a rule that fires on everything or on nothing fails here. The tiny model's default (ORT)
export must be flagged, and its FP16 FP export must pass.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rptq.check.rules import RULES, check_file, check_model, errors
from rptq.cli import main
from rptq.workflow import quantized_graph
from tests.plans import random_plan

F16, F32 = TensorProto.FLOAT16, TensorProto.FLOAT
DOCS = Path(__file__).resolve().parents[2] / "docs" / "tensorrt-rules.md"


def model(
    nodes: list[onnx.NodeProto],
    initializers: list[onnx.TensorProto] = (),
    *,
    x_type: int = F16,
    y_type: int | None = None,
    y_shape: list = ("b", "n"),
    opset: int = 21,
    extra_inputs: list[onnx.ValueInfoProto] = (),
    extra_outputs: list[onnx.ValueInfoProto] = (),
    domains: tuple[str, ...] = (),
) -> onnx.ModelProto:
    """X [2, 64] -> nodes -> Y; initializers and extra I/O as given."""
    graph = helper.make_graph(
        nodes,
        "case",
        [helper.make_tensor_value_info("X", x_type, [2, 64]), *extra_inputs],
        [
            helper.make_tensor_value_info("Y", x_type if y_type is None else y_type, y_shape),
            *extra_outputs,
        ],
        list(initializers),
    )
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    return helper.make_model(graph, opset_imports=opsets)


def const(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


SCALE16 = np.float16(0.05)
ZERO8 = np.int8(0)


def act_qdq(
    *,
    scale=SCALE16,
    zero=ZERO8,
    x_type: int = F16,
    opset: int = 21,
    **attrs,
) -> onnx.ModelProto:
    """X -> QuantizeLinear -> DequantizeLinear -> Y: an activation Q/DQ pair."""
    inits = [const("s", scale)]
    inputs = ["X", "s"]
    if zero is not None:
        inits.append(const("z", zero))
        inputs.append("z")
    nodes = [
        helper.make_node("QuantizeLinear", inputs, ["Xq"], name="q", **attrs),
        helper.make_node("DequantizeLinear", ["Xq", *inputs[1:]], ["Y"], name="dq", **attrs),
    ]
    return model(nodes, inits, x_type=x_type, y_type=scale_type(scale), opset=opset)


def scale_type(scale) -> int:
    return helper.np_dtype_to_tensor_dtype(np.asarray(scale).dtype)


def weight_dq(codes, scale, zero=None, **attrs) -> onnx.ModelProto:
    """Y = X @ DequantizeLinear(W codes [64, 8]): a quantized weight."""
    inits = [const("w", codes), const("ws", scale)]
    inputs = ["w", "ws"]
    if zero is not None:
        inits.append(const("wz", zero))
        inputs.append("wz")
    nodes = [
        helper.make_node("DequantizeLinear", inputs, ["W"], name="wdq", **attrs),
        helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm"),
    ]
    return model(nodes, inits)


def int4(values) -> np.ndarray:
    import ml_dtypes

    return np.asarray(values).astype(ml_dtypes.int4)


CODES4 = int4(np.arange(64 * 8).reshape(64, 8) % 15 - 7)
CODES8 = (np.arange(64 * 8).reshape(64, 8) % 255 - 127).astype(np.int8)
BLOCK_SCALE = np.full((1, 8), 0.01, np.float16)  # block 64 along axis 0 of [64, 8]


def layer_norm(outputs: int) -> onnx.ModelProto:
    inits = [const("g", np.ones(64, np.float16)), const("b", np.zeros(64, np.float16))]
    names = ["Y", "mean", "inv_std"][:outputs]
    extra = [helper.make_tensor_value_info(n, F32, [2, 1]) for n in names[1:]]
    node = helper.make_node(
        "LayerNormalization", ["X", "g", "b"], names, name="ln", axis=-1, stash_type=1
    )
    return model([node], inits, extra_outputs=extra)


def cumsum(data_type: int, constant_axis: bool = True) -> onnx.ModelProto:
    nodes = [helper.make_node("Cast", ["X"], ["Xc"], name="cast", to=data_type)]
    inits = []
    if constant_axis:
        inits.append(const("axis", np.int64(1)))
        axis = "axis"
    else:
        nodes.append(helper.make_node("Shape", ["X"], ["shape"], name="shape", start=0, end=1))
        nodes.append(helper.make_node("Squeeze", ["shape"], ["axis_dyn"], name="squeeze"))
        nodes.append(helper.make_node("Sub", ["axis_dyn", "one"], ["axis_rt"], name="sub"))
        inits.append(const("one", np.int64(1)))
        axis = "axis_rt"
    nodes.append(helper.make_node("CumSum", ["Xc", axis], ["S"], name="cumsum"))
    nodes.append(helper.make_node("Cast", ["S"], ["Y"], name="back", to=F16))
    return model(nodes, inits)


def attention(with_cache: bool) -> onnx.ModelProto:
    def info(name, length=4):
        return helper.make_tensor_value_info(name, F16, [1, 2, length, 8])

    inputs = ["Q", "K", "V"] + (["", "PK", "PV"] if with_cache else [])
    outputs = ["A", "PKo", "PVo"] if with_cache else ["A"]
    cache_in = [info("PK", 3), info("PV", 3)] if with_cache else []
    cache_out = [info("PKo", 7), info("PVo", 7)] if with_cache else []
    nodes = [
        helper.make_node("Attention", inputs, outputs, name="attention"),
        helper.make_node("Shape", ["X"], ["Y"], name="shape"),
    ]
    return model(
        nodes,
        opset=23,
        y_type=TensorProto.INT64,
        y_shape=[2],
        extra_inputs=[info("Q"), info("K"), info("V"), *cache_in],
        extra_outputs=[info("A"), *cache_out],
    )


def runtime_scale() -> onnx.ModelProto:
    """Scale = max|X| / 127 computed in the graph (dynamic quantization in disguise)."""
    nodes = [
        helper.make_node("Abs", ["X"], ["a"], name="abs"),
        helper.make_node("ReduceMax", ["a"], ["m"], name="max", keepdims=0),
        helper.make_node("Div", ["m", "d"], ["s_rt"], name="div"),
        helper.make_node("QuantizeLinear", ["X", "s_rt", "z"], ["Xq"], name="q"),
        helper.make_node("DequantizeLinear", ["Xq", "s_rt", "z"], ["Y"], name="dq"),
    ]
    return model(nodes, [const("d", np.float16(127)), const("z", np.int8(0))])


def constant_cast_scale() -> onnx.ModelProto:
    """Constant -> Cast -> scale: a build-time constant TensorRT folds."""
    nodes = [
        helper.make_node("Constant", [], ["s32"], name="c", value=const("v", np.float32(0.05))),
        helper.make_node("Cast", ["s32"], ["s_c"], name="cast", to=F16),
        helper.make_node("QuantizeLinear", ["X", "s_c", "z"], ["Xq"], name="q"),
        helper.make_node("DequantizeLinear", ["Xq", "s_c", "z"], ["Y"], name="dq"),
    ]
    return model(nodes, [const("z", np.int8(0))])


def dynamic_quantize() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Cast", ["X"], ["x32"], name="cast", to=F32),
        helper.make_node("DynamicQuantizeLinear", ["x32"], ["Xq", "s", "z"], name="dql"),
        helper.make_node("DequantizeLinear", ["Xq", "s", "z"], ["y32"], name="dq"),
        helper.make_node("Cast", ["y32"], ["Y"], name="back", to=F16),
    ]
    return model(nodes)


def nbits() -> onnx.ModelProto:
    node = helper.make_node(
        "MatMulNBits", ["X", "w"], ["Y"], name="mmnb", domain="com.microsoft", K=64, N=8
    )
    return model([node], [const("w", np.zeros((8, 1, 32), np.uint8))], domains=("com.microsoft",))


def plain_matmul() -> onnx.ModelProto:
    node = helper.make_node("MatMul", ["X", "w"], ["Y"], name="mm")
    return model([node], [const("w", np.zeros((64, 8), np.float16))])


# rule -> (violating graph, passing twin); the twin changes only what the rule is about
CASES: dict[str, tuple[Callable[[], onnx.ModelProto], Callable[[], onnx.ModelProto]]] = {
    "ONNX-CHECKER": (lambda: act_qdq(scale=np.float32(0.05)), act_qdq),  # x f16, scale f32 @21
    "TRT-OPSET": (lambda: act_qdq(opset=19), act_qdq),
    "TRT-DOMAIN": (nbits, plain_matmul),
    "TRT-UNSUPPORTED-OP": (dynamic_quantize, act_qdq),
    "TRT-QDQ-TYPE": (lambda: act_qdq(zero=np.uint8(0)), act_qdq),
    "TRT-WEIGHT-ONLY-TYPE": (lambda: act_qdq(zero=int4(0)), act_qdq),
    "TRT-ACT-PER-TENSOR": (
        lambda: act_qdq(scale=np.full(64, 0.05, np.float16), zero=np.zeros(64, np.int8), axis=1),
        lambda: weight_dq(CODES8, np.full(8, 0.01, np.float16), np.zeros(8, np.int8), axis=1),
    ),
    "TRT-INT4-BLOCK": (
        lambda: weight_dq(CODES4, np.full(8, 0.01, np.float16), axis=1),
        lambda: weight_dq(CODES4, BLOCK_SCALE, axis=0, block_size=64),
    ),
    "TRT-BLOCK": (
        lambda: weight_dq(CODES8, BLOCK_SCALE, axis=0, block_size=64),
        lambda: weight_dq(CODES4, BLOCK_SCALE, axis=0, block_size=64),
    ),
    "TRT-QPARAM-CONST": (runtime_scale, constant_cast_scale),
    "TRT-ZERO-POINT": (lambda: act_qdq(zero=np.int8(3)), act_qdq),
    "TRT-SCALE-VALUE": (lambda: act_qdq(scale=np.float16(-0.05)), act_qdq),
    "TRT-SCALE-DTYPE": (
        lambda: act_qdq(x_type=F32, scale=np.float16(0.05), opset=23),
        lambda: act_qdq(x_type=F16, scale=np.float16(0.05), opset=23),
    ),
    "TRT-LAYERNORM-OUTPUTS": (lambda: layer_norm(3), lambda: layer_norm(1)),
    "TRT-CUMSUM": (lambda: cumsum(TensorProto.INT64), lambda: cumsum(F32)),
    "TRT-ATTENTION-KV": (lambda: attention(True), lambda: attention(False)),
    "TRT-FP16": (lambda: act_qdq(x_type=F32, scale=np.float32(0.05)), act_qdq),
}


def rule_ids(violations) -> set[str]:
    return {v.rule_id for v in violations}


def test_every_rule_has_a_case():
    assert {r.rule_id for r in RULES} - {"TRT-TENSOR-SIZE"} <= set(CASES)
    assert len({r.rule_id for r in RULES}) == len(RULES)


@pytest.mark.parametrize("rule", sorted(CASES))
def test_violating_graph_raises_the_rule(rule):
    violating, _ = CASES[rule]
    found = rule_ids(check_model(violating()))
    assert rule in found, found


@pytest.mark.parametrize("rule", sorted(CASES))
def test_passing_twin_is_clean(rule):
    _, twin = CASES[rule]
    assert [v.line() for v in check_model(twin())] == []


def test_cumsum_runtime_axis_is_flagged():
    found = [v for v in check_model(cumsum(F32, constant_axis=False)) if v.rule_id == "TRT-CUMSUM"]
    assert found
    assert "axis" in found[0].message


def test_int4_block_size_32_is_flagged():
    scale = np.full((2, 8), 0.01, np.float16)
    found = check_model(weight_dq(CODES4, scale, axis=0, block_size=32))
    assert "TRT-INT4-BLOCK" in rule_ids(found)


def test_nonzero_weight_zero_point_is_flagged():
    zero = int4(np.ones((1, 8)))
    found = check_model(weight_dq(CODES4, BLOCK_SCALE, zero, axis=0, block_size=64))
    assert "TRT-ZERO-POINT" in rule_ids(found)


def test_tensor_size_limit(tmp_path):
    """A [2^16, 2^16] external initializer (data never read) breaks the 2^31 element limit."""

    def gather(rows: int) -> onnx.ModelProto:
        table = TensorProto(name="table", data_type=F16, dims=[rows, 2**16])
        table.data_location = TensorProto.EXTERNAL
        entry = table.external_data.add()
        entry.key, entry.value = "location", "table.bin"
        node = helper.make_node("Gather", ["table", "ids"], ["Y"], name="gather", axis=0)
        ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [3])
        graph = helper.make_graph(
            [node], "g", [ids], [helper.make_tensor_value_info("Y", F16, [3, 2**16])], [table]
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])

    (tmp_path / "table.bin").touch()
    for rows, expect in ((2**16, True), (2**14, False)):
        path = tmp_path / f"gather{rows}.onnx"
        onnx.save(gather(rows), str(path))
        assert ("TRT-TENSOR-SIZE" in rule_ids(check_file(path))) is expect


def test_violation_lines_are_one_line():
    for rule, (violating, _) in CASES.items():
        for violation in check_model(violating()):
            assert "\n" not in violation.line(), rule


def test_docs_list_every_rule_with_a_source():
    text = DOCS.read_text()
    for rule in RULES:
        row = next((line for line in text.splitlines() if f"`{rule.rule_id}`" in line), None)
        assert row is not None, f"{rule.rule_id} missing from {DOCS.name}"
        assert re.search(r"https?://|NVIDIA/TensorRT|onnx-tensorrt", row), row


@pytest.fixture(scope="module")
def default_export(tiny_loaded, tiny_model) -> onnx.ModelProto:
    weights = {k: v.detach().numpy() for k, v in tiny_model.state_dict().items()}
    plan = random_plan(tiny_loaded.shape, weights)
    return quantized_graph(tiny_loaded, plan, act_quant_form="qdq")


def test_default_ort_export_is_flagged(default_export):
    """Per-cluster asymmetric activations and per-row INT4 weights are exactly what TRT rejects
    (the ORT target's portable Q/DQ form; the float32 default's elementwise quantizers are plain
    float ops to TensorRT, and its INT4 weights are flagged all the same)."""
    found = rule_ids(errors(check_model(default_export)))
    assert {"TRT-ZERO-POINT", "TRT-ACT-PER-TENSOR", "TRT-INT4-BLOCK"} <= found
    assert "ONNX-CHECKER" not in found
    assert check_model(default_export, target="ort") == []


def test_elementwise_default_export_is_flagged_for_its_weights(tiny_loaded, tiny_model):
    weights = {k: v.detach().numpy() for k, v in tiny_model.state_dict().items()}
    model = quantized_graph(tiny_loaded, random_plan(tiny_loaded.shape, weights))
    assert "Round" in {node.op_type for node in model.graph.node}
    assert "TRT-INT4-BLOCK" in rule_ids(errors(check_model(model)))
    assert check_model(model, target="ort") == []


def test_fp16_fp_export_passes(fp16_graph):
    assert check_model(fp16_graph) == []


def test_fp32_fp_export_only_warns(fp32_graph):
    found = check_model(fp32_graph)
    assert [v.rule_id for v in found] == ["TRT-FP16"]
    assert errors(found) == []


def test_external_data_values_are_read(default_export, tmp_path, monkeypatch):
    """Zero points stored in the external data file are still checked.

    The threshold moves the 64-byte activation zero points out of the model file but keeps the
    32-byte shape tensors inline (ONNX shape inference cannot read external shape tensors).
    """
    from rptq.exporter import save

    monkeypatch.setattr(save, "EXTERNAL_MIN_BYTES", 33)
    path = tmp_path / "model.onnx"
    save.save_onnx(default_export, path, external_data=True)
    stored = onnx.load(str(path), load_external_data=False)
    external = {t.name for t in stored.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    assert any(name.endswith("/zero_point") for name in external)
    on_disk = sorted(v.line() for v in check_file(path))
    in_memory = sorted(v.line() for v in check_model(default_export))
    assert on_disk == in_memory


def test_cli_check(capsys, tmp_path, default_export, fp16_graph):
    bad, good = tmp_path / "bad.onnx", tmp_path / "good.onnx"
    onnx.save(default_export, str(bad))
    onnx.save(fp16_graph, str(good))
    assert main(["check", str(good), "--target", "tensorrt"]) == 0
    assert "status: pass" in capsys.readouterr().out
    assert main(["check", str(bad), "--target", "tensorrt"]) == 1
    out = capsys.readouterr().out
    assert "status: fail" in out
    assert any(line.strip().startswith("TRT-ZERO-POINT (error)") for line in out.splitlines())
    assert main(["check", str(bad), "--target", "ort", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["violations"] == []
    assert main(["check", str(bad), "--target", "tensorrt", "--json"]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["errors"] > 0
    assert {"rule", "severity", "node", "message"} <= set(summary["violations"][0])


def test_cli_check_missing_file(capsys, tmp_path):
    assert main(["check", str(tmp_path / "nope.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1
    assert "does not exist" in err


def test_cli_check_not_onnx(capsys, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a protobuf\xff" * 10)
    assert main(["check", str(junk)]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1
    assert "not a readable ONNX model" in err
