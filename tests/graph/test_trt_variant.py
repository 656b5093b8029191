"""The TensorRT variant's graph (`--target tensorrt`): structure, TensorRT rules, preconditions.

docs/tensorrt-rules.md ("Implementation") is the specification; numerical parity is in
tests/parity/test_trt_variant_parity.py.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, numpy_helper

from rptq import names
from rptq.check.rules import check_model, errors
from rptq.cli import main
from rptq.errors import ConfigError, GraphPatternError
from rptq.passes import PassContext, run_passes
from rptq.passes.tensorrt.fold import trt_fold
from rptq.passes.tensorrt.qdq import trt_insert_qdq
from rptq.plan import WeightMethod
from rptq.points import LAYERNORM_SITE, LINEARS, Act
from rptq.quant.trt_weights import DEFAULT_WEIGHT_GROUPS, scale_groups
from rptq.workflow import quantized_graph

RECIPES = {
    "W4A8": {"wbits": 4, "abits": 8},
    "W4A4": {"wbits": 4, "abits": 4},
    "W4A4KV": {"wbits": 4, "abits": 4, "only_quant_kv": True},
    "W3A3KV": {"wbits": 3, "abits": 3, "only_quant_kv": True},
    "W4A16": {"wbits": 4, "abits": 16},
    "W16A16": {"wbits": 16, "abits": 16},
}
# Nodes each quantized activation adds to a layer (the spec's table): every one gets a
# QuantizeLinear/DequantizeLinear pair; q, k, v are restored by Sub z, Mul s (q loses its
# head_dim^-½ Mul into q_proj); attn_probs gets Sub c / Add c; out_proj_in Div s, Add z;
# fc2_in Add z after the ReLU; LayerNorm outputs fold completely.
NODES_PER_ACT: dict[Act, Counter] = {
    Act.ATTN_LN_OUT: Counter(),
    Act.Q: Counter({"Sub": 1}),
    Act.K: Counter({"Sub": 1, "Mul": 1}),
    Act.V: Counter({"Sub": 1, "Mul": 1}),
    Act.ATTN_PROBS: Counter({"Sub": 1, "Add": 1}),
    Act.OUT_PROJ_IN: Counter({"Div": 1, "Add": 1}),
    Act.FFN_LN_OUT: Counter(),
    Act.FC2_IN: Counter({"Add": 1}),
}


def trt_graph(loaded, plan, **options) -> onnx.ModelProto:
    return quantized_graph(loaded, plan, target="trt", **options)


def weight_parts(plan, layer: int, linear: str) -> int:
    """GEMMs of a quantized linear: one per scale group of its folded input scale (spec,
    "Weights in the folded domain"), one when nothing folds into its input."""
    in_scale = plan.folded_input_scale(layer, linear)
    if in_scale is None:
        return 1
    return int(scale_groups(in_scale, DEFAULT_WEIGHT_GROUPS).max()) + 1


def all_weight_parts(plan, num_layers: int) -> list[int]:
    return [weight_parts(plan, layer, lin) for layer in range(num_layers) for lin in LINEARS]


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("label", sorted(RECIPES))
def test_every_variant_passes_the_tensorrt_checker(label, dtype, tiny_loaded, calibrate_tiny):
    plan = calibrate_tiny(**RECIPES[label])
    violations = check_model(trt_graph(tiny_loaded, plan, dtype=dtype), "trt")
    assert errors(violations) == [], [v.line() for v in violations]
    # an fp32 graph runs in FP32 under strong typing (a warning); fp16 is clean
    expected = ["TRT-FP16"] if dtype == "float32" else []
    assert [v.rule_id for v in violations] == expected


def test_int4_blocked_variant_passes_the_checker(tiny_loaded, calibrate_tiny):
    for label in ("W4A4", "W4A16"):
        plan = calibrate_tiny(**RECIPES[label])
        graph = trt_graph(tiny_loaded, plan, int4_block_size=64)
        weights = [n for n in graph.graph.node if n.name.endswith("/weight/DequantizeLinear")]
        assert len(weights) == 6 * tiny_loaded.shape.num_layers
        assert all({a.name: a.i for a in n.attribute}["block_size"] == 64 for n in weights)
        assert errors(check_model(graph, "trt")) == []


@pytest.mark.parametrize("label", sorted(RECIPES))
def test_op_counts_follow_the_spec_table(label, tiny_loaded, calibrate_tiny):
    plan = calibrate_tiny(**RECIPES[label])
    added = op_counts(trt_graph(tiny_loaded, plan)) - op_counts(trt_graph(tiny_loaded, None))
    expected: Counter = Counter()
    for quant in plan.acts:
        expected += NODES_PER_ACT[quant.act] + Counter(QuantizeLinear=1, DequantizeLinear=1)
        expected += Counter(Clip=1) if quant.bits < 8 else Counter()
    if plan.recipe.wbits < 16:
        for parts in all_weight_parts(plan, tiny_loaded.shape.num_layers):
            expected += Counter(DequantizeLinear=1) + Counter(Split=parts > 1, Sum=parts > 1)
    # fold_reorder gathers each reordered LayerNorm's input (R1, R4)
    expected += Counter(Gather=sum(s.point in LAYERNORM_SITE.values() for s in plan.sites))
    assert added == expected


@pytest.mark.parametrize("label", ["W4A4", "W4A4KV"])
def test_qdq_are_per_tensor_int8_with_zero_points_zero(label, tiny_loaded, calibrate_tiny):
    graph = trt_graph(tiny_loaded, calibrate_tiny(**RECIPES[label]))
    inits = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    qdq = [n for n in graph.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for node in qdq:
        zero = inits[node.input[2]]
        assert zero.dtype == np.int8, node.name
        assert not zero.any(), node.name
        if not node.name.endswith("/weight/DequantizeLinear"):
            assert inits[node.input[1]].shape == (), node.name  # per-tensor activation scale
    assert not {"Max", "Min"} & set(op_counts(graph))  # no per-channel clamps left


def test_q_scale_mul_is_folded_into_q_proj(tiny_loaded, calibrate_tiny):
    graph = trt_graph(tiny_loaded, calibrate_tiny(**RECIPES["W4A4"]))
    producers = {out: node for node in graph.graph.node for out in node.output}
    q = names.act_tensor(0, Act.Q)
    assert producers[q].name == names.node(names.module(0, "self_attn.q_proj"), "Add")
    assert names.node(names.module(0, "self_attn"), "q_scale") not in {
        n.name for n in graph.graph.node
    }


def test_every_added_name_comes_from_names(tiny_loaded, calibrate_tiny):
    plan = calibrate_tiny(**RECIPES["W4A4"])
    fp = trt_graph(tiny_loaded, None)
    graph = trt_graph(tiny_loaded, plan, int4_block_size=64)
    known: set[str] = set()
    for layer in range(tiny_loaded.shape.num_layers):
        for act in Act:
            act_name = names.act_tensor(layer, act)
            known |= {act_name, *names.qdq(act_name).values(), *names.trt_act(act_name).values()}
        for ln, point in LAYERNORM_SITE.items():
            known |= set(names.reorder_gather(names.module(layer, ln), point).values())
        for linear in LINEARS:
            module = names.module(layer, linear)
            known |= set(names.quantized_weight(module).values())
            known |= set(names.weight_zero_correction(module).values())
            known |= set(names.weight_groups(module, weight_parts(plan, layer, linear)).values())
    before = {n.name for n in fp.graph.node} | {t.name for t in fp.graph.initializer}
    before |= {out for n in fp.graph.node for out in n.output}
    after = {n.name for n in graph.graph.node} | {t.name for t in graph.graph.initializer}
    after |= {out for n in graph.graph.node for out in n.output}
    assert after - before <= known, sorted(after - before - known)


def test_trt_fold_needs_the_folded_permutations(fp32_graph, tiny_loaded, calibrate_tiny):
    ctx = PassContext(plan=calibrate_tiny(**RECIPES["W4A4"]), target="trt")
    with pytest.raises(GraphPatternError, match="not folded"):
        trt_fold(gs.import_onnx(fp32_graph), ctx)


def test_trt_insert_qdq_needs_trt_fold(fp32_graph, tiny_loaded, calibrate_tiny):
    ctx = PassContext(plan=calibrate_tiny(**RECIPES["W4A4"]), target="trt")
    folded, _ = run_passes(fp32_graph, ctx, stop_after="fold_reorder")
    with pytest.raises(GraphPatternError, match="run trt_fold before"):
        trt_insert_qdq(gs.import_onnx(folded), ctx)


def test_trt_fold_runs_once(fp32_graph, tiny_loaded, calibrate_tiny):
    ctx = PassContext(plan=calibrate_tiny(**RECIPES["W4A4"]), target="trt")
    folded, _ = run_passes(fp32_graph, ctx, stop_after="trt_fold")
    graph = gs.import_onnx(folded)
    with pytest.raises(GraphPatternError, match="already folded"):
        trt_fold(graph, ctx)


def test_a_refused_plan_leaves_the_graph_unchanged(fp32_graph, tiny_loaded, calibrate_tiny):
    plan = calibrate_tiny(**RECIPES["W4A4"])
    recipe = dataclasses.replace(plan.recipe, weight_method=WeightMethod.GPTQT)
    graph = gs.import_onnx(fp32_graph)
    before = gs.export_onnx(graph).SerializeToString()
    with pytest.raises(ConfigError, match="gptqt weights.*recalibrate with --target tensorrt"):
        trt_fold(graph, PassContext(plan=dataclasses.replace(plan, recipe=recipe), target="trt"))
    assert gs.export_onnx(graph).SerializeToString() == before


def test_int4_blocks_need_the_tensorrt_target(tiny_loaded, calibrate_tiny):
    plan = calibrate_tiny(**RECIPES["W4A16"])
    with pytest.raises(ConfigError, match="--int4-block"):
        PassContext(plan=plan, target="ort", int4_block_size=64)
    with pytest.raises(ConfigError, match="--int4-block"):
        PassContext(plan=plan, target="trt", int4_block_size=32)


def test_int4_weights_need_four_bits(tiny_loaded, calibrate_tiny):
    with pytest.raises(ConfigError, match="wbits 4 or less"):
        trt_graph(tiny_loaded, calibrate_tiny(wbits=8, abits=16), int4_block_size=64)


def test_weight_dequantize_feeds_the_matmul(tiny_loaded, calibrate_tiny):
    """DequantizeLinear(weight) -> MatMul, the pattern TensorRT fuses into its GEMMs: one
    per linear, its scale groups side by side, then Split into the groups' products and Sum."""
    plan = calibrate_tiny(**RECIPES["W4A4"])
    graph = trt_graph(tiny_loaded, plan)
    consumers = {inp: node for node in graph.graph.node for inp in node.input}
    producers = {o: n for n in graph.graph.node for o in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    for layer in range(tiny_loaded.shape.num_layers):
        for linear in LINEARS:
            module = names.module(layer, linear)
            out = names.quantized_weight(module)["output"]
            matmul = consumers[out]
            assert matmul.op_type == "MatMul"
            assert producers[matmul.input[0]].op_type == "DequantizeLinear"  # INT8 activation
            parts = weight_parts(plan, layer, linear)
            assert parts == DEFAULT_WEIGHT_GROUPS  # every input has clusters of >= 3 scales
            split = consumers[matmul.output[0]]
            assert split.name == names.weight_groups(module, parts)["split_node"]
            assert consumers[split.output[0]].op_type == "Sum"
            codes = inits[names.quantized_weight(module)["codes"]]
            nonzero = (codes.reshape(codes.shape[0], parts, -1) != 0).any(axis=2)
            assert np.all(nonzero.sum(axis=1) <= 1)  # each input channel is in one group
    types = {t.name: t.data_type for t in graph.graph.initializer}
    assert types[names.quantized_weight(names.module(0, "fc1"))["codes"]] == TensorProto.INT8


def test_one_weight_group_is_the_single_scale_form(tiny_loaded, calibrate_tiny):
    """`trt_weight_groups=1` is the first variant: one scale per output row, no Split."""
    graph = trt_graph(tiny_loaded, calibrate_tiny(**RECIPES["W4A4"]), trt_weight_groups=1)
    assert "Split" not in op_counts(graph)
    assert errors(check_model(graph, "trt")) == []


@pytest.fixture(scope="module")
def saved_model_and_plan(tiny_model, calibrate_tiny, tmp_path_factory):
    """The tiny model as a Hugging Face directory and its W4A4 plan on disk."""
    root = tmp_path_factory.mktemp("trt")
    tiny_model.save_pretrained(root / "model")
    calibrate_tiny(**RECIPES["W4A4"]).save(root / "plan")
    return root


@pytest.mark.parametrize(("command", "dtype"), [("export", "float32"), ("run", "float16")])
def test_cli_export_target_tensorrt_passes_check(capsys, saved_model_and_plan, command, dtype):
    root = saved_model_and_plan
    out = root / f"w4a4-trt-{dtype}.onnx"
    model, plan = str(root / "model"), str(root / "plan")
    args = [command, model, "--plan", plan, "--target", "tensorrt", "--dtype", dtype]
    assert main([*args, "-o", str(out), "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["target"] == "tensorrt"
    assert main(["check", str(out), "--target", "tensorrt", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["errors"] == 0
    assert summary["warnings"] == (1 if dtype == "float32" else 0)


def test_cli_refuses_int4_blocks_without_the_tensorrt_target(capsys, saved_model_and_plan):
    root = saved_model_and_plan
    code = main(
        [
            "export",
            str(root / "model"),
            "--plan",
            str(root / "plan"),
            "--int4-block",
            "64",
            "-o",
            str(root / "x.onnx"),
        ]
    )
    assert code == 1
    assert "--int4-block applies to --target tensorrt" in capsys.readouterr().err
    assert not (root / "x.onnx").exists()


def test_cli_eval_target_tensorrt_needs_a_plan(capsys, saved_model_and_plan):
    assert main(["eval", str(saved_model_and_plan / "model"), "--target", "tensorrt"]) == 1
    assert "--target tensorrt evaluates" in capsys.readouterr().err


def test_cli_eval_target_tensorrt_runs_the_variant_reference(capsys, data_dir, tmp_path):
    """OPT's vocabulary, so the shared tokenizer's ids fit; a plan from random windows."""
    import torch

    from rptq.calib.runner import calibrate
    from rptq.model.load import from_module
    from rptq.plan import Recipe
    from rptq.tiny import make_tiny_opt

    model = make_tiny_opt(vocab_size=50272, max_positions=256)
    model.save_pretrained(tmp_path / "model")
    windows = torch.randint(0, 50272, (4, 64), generator=torch.Generator().manual_seed(0))
    recipe = Recipe(wbits=4, abits=4, nsamples=4, seq_len=64, calib_dataset="random")
    calibrate(from_module(model, name="tiny-opt"), windows, recipe).save(tmp_path / "plan")
    flags = ["--datasets", "wikitext2", "--seq-len", "64", "--limit", "2", "--json", "-q"]
    base = ["eval", str(tmp_path / "model"), "--plan", str(tmp_path / "plan"), *flags]
    assert main([*base, "--data-dir", str(data_dir), "--target", "tensorrt"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["backend"] == "pytorch-reference-tensorrt"
    assert summary["perplexity"]["wikitext2"] > 1


@pytest.mark.parametrize(("groups", "splits"), [(None, 12), ("1", 0), ("2", 12)])
def test_cli_trt_weight_groups(saved_model_and_plan, groups, splits):
    """Default 3 scale groups (a Split per folded linear), 1 the single-scale form."""
    root = saved_model_and_plan
    out = root / f"groups-{groups}.onnx"
    args = ["export", str(root / "model"), "--plan", str(root / "plan"), "--target", "tensorrt"]
    extra = [] if groups is None else ["--trt-weight-groups", groups]
    assert main([*args, *extra, "-o", str(out), "-q"]) == 0
    assert op_counts(onnx.load(out))["Split"] == splits
