"""The streamed (layer-by-layer) export writes exactly what the whole-graph export writes."""

from __future__ import annotations

import random

import numpy as np
import onnx
import pytest

from rptq import names
from rptq.exporter.opt import head_fragment, layer_fragment, prologue_fragment
from rptq.exporter.options import ExportOptions
from rptq.exporter.parts import part_key, split_parts, topological_nodes
from rptq.exporter.save import save_onnx
from rptq.exporter.stream import export_streamed
from rptq.workflow import quantized_graph
from tests.conftest import TINY_CLUSTERS

RECIPE = {"clusters": TINY_CLUSTERS}


@pytest.fixture(scope="module")
def w4a4_plan(calibrate_tiny):
    return calibrate_tiny(wbits=4, abits=4, **RECIPE)


def _files(paths):
    return [path.read_bytes() for path in paths]


CASES = [
    ("fp", "ort", "float32"),
    ("fp-past", "ort", "float32"),
    ("fp-past", "ort", "float16"),
    ("w4a4-past", "ort", "float32"),
    ("w4a4-past-int8", "ort", "float16"),
    ("w4a4kv-past-uint8", "ort", "float32"),
    ("w4a4-past", "trt", "float16"),
    ("w4a4", "ort", "float32"),
    ("w4a4", "ort", "float16"),
    ("w4a4", "trt", "float32"),
    ("w4a4kv", "ort", "float32"),
]


@pytest.mark.parametrize("external", [True, False], ids=["external", "inline"])
@pytest.mark.parametrize(("recipe", "target", "dtype"), CASES)
def test_streamed_export_is_byte_identical(
    tiny_loaded, calibrate_tiny, tmp_path, recipe, target, dtype, external
):
    recipe, *cache = recipe.split("-")
    past = bool(cache)
    kv_cache_dtype = cache[1] if len(cache) > 1 else "float"
    plan = {
        "fp": None,
        "w4a4": calibrate_tiny(wbits=4, abits=4, **RECIPE),
        "w4a4kv": calibrate_tiny(wbits=4, abits=4, only_quant_kv=True, **RECIPE),
    }[recipe]
    (tmp_path / "whole").mkdir()
    (tmp_path / "streamed").mkdir()
    whole = quantized_graph(
        tiny_loaded, plan, dtype=dtype, target=target, past=past, kv_cache_dtype=kv_cache_dtype
    )
    expected = save_onnx(whole, tmp_path / "whole" / "m.onnx", external_data=external)
    got = export_streamed(
        tiny_loaded,
        plan,
        tmp_path / "streamed" / "m.onnx",
        ExportOptions(
            dtype, target=target, external_data=external, past=past, kv_cache_dtype=kv_cache_dtype
        ),
    ).files
    assert [p.name for p in got] == [p.name for p in expected]
    assert len(got) == (2 if external else 1)
    for want, have in zip(_files(expected), _files(got), strict=True):
        assert want == have


def test_streamed_export_writes_the_data_file_layer_by_layer(tiny_loaded, w4a4_plan, tmp_path):
    seen: list[tuple[int, int, int]] = []
    result = export_streamed(
        tiny_loaded,
        w4a4_plan,
        tmp_path / "m.onnx",
        ExportOptions(external_data=True),
        progress=lambda done, total, written: seen.append((done, total, written)),
    )
    parts = tiny_loaded.shape.num_layers + 2
    assert [(done, total) for done, total, _ in seen] == [(i, parts) for i in range(1, parts + 1)]
    written = [w for _, _, w in seen]
    # the prologue and every layer add their weights' bytes before the next part is built (the
    # tied head's only own tensors, the final LayerNorm's, are small enough to stay inline)
    layer_bytes = written[: parts - 1]
    assert all(b > a > 0 for a, b in zip(layer_bytes, layer_bytes[1:], strict=False))
    assert written[-1] == result.files[0].stat().st_size
    assert result.op_counts["QuantizeLinear"] > 0


def test_interrupted_streamed_export_leaves_nothing(tiny_loaded, w4a4_plan, tmp_path):
    def stop(done, total, written):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_streamed(tiny_loaded, w4a4_plan, tmp_path / "m.onnx", progress=stop)
    assert list(tmp_path.iterdir()) == []


def test_fragments_are_valid_models(tiny_loaded):
    fragments = [prologue_fragment(tiny_loaded)]
    fragments += [layer_fragment(tiny_loaded, i) for i in range(tiny_loaded.shape.num_layers)]
    fragments.append(head_fragment(tiny_loaded))
    for fragment in fragments:
        onnx.checker.check_model(fragment, full_check=True)
    # the cut points chain: each fragment's outputs are the next one's inputs
    for before, after in zip(fragments[1:-1], fragments[2:], strict=True):
        assert before.graph.output[0].name == after.graph.input[0].name


def test_parts_follow_the_node_names(tiny_loaded, w4a4_plan):
    graph = quantized_graph(tiny_loaded, w4a4_plan).graph
    layers = tiny_loaded.shape.num_layers
    parts = split_parts(graph, layers)
    assert sum(len(p.nodes) for p in parts) == len(graph.node)
    assert [n.name for p in parts for n in p.nodes] == [n.name for n in graph.node]
    for key, part in enumerate(parts):
        for node in part.nodes:
            assert part_key(node.name, layers) == key
    assert all(
        n.name.startswith(names.layer(1) + ".") or n.name.startswith(names.layer(1) + "/")
        for n in parts[2].nodes
    )
    assert {n.name.split("/")[0] for n in parts[-1].nodes} == {
        names.FINAL_LAYER_NORM,
        names.LM_HEAD,
    }
    # the tied head's table is stored once, with the prologue that reads it first
    table = names.weight(names.EMBED_TOKENS)
    assert [i.name for i in parts[0].initializers].count(table) == 1
    assert table not in {i.name for i in parts[-1].initializers}


def test_topological_order_ignores_the_input_order(tiny_loaded, w4a4_plan):
    graph = quantized_graph(tiny_loaded, w4a4_plan).graph
    for part in split_parts(graph, tiny_loaded.shape.num_layers):
        shuffled = part.nodes[:]
        random.Random(0).shuffle(shuffled)
        assert [n.name for n in topological_nodes(shuffled)] == [n.name for n in part.nodes]


def test_plan_for_layer_keeps_only_that_layer(w4a4_plan):
    one = w4a4_plan.for_layer(1)
    assert {s.layer for s in one.sites} == {1}
    assert {a.layer for a in one.acts} == {1}
    assert all(w.fqn.startswith(names.layer(1) + ".") for w in one.weights)
    assert len(one.weights) == 6
    none = w4a4_plan.for_layer(None)
    assert not none.sites
    assert not none.acts
    assert not none.weights


def test_streamed_export_runs_in_ort_like_the_reference(tiny_loaded, w4a4_plan, tmp_path):
    """The file itself computes the whole graph's logits (not only its bytes)."""
    from rptq.runtime.ort import make_session

    files = export_streamed(
        tiny_loaded, w4a4_plan, tmp_path / "m.onnx", ExportOptions(external_data=True)
    ).files
    ids = np.random.default_rng(0).integers(0, 512, (2, 16), dtype=np.int64)
    feeds = {names.GRAPH_INPUT_IDS: ids, names.GRAPH_ATTENTION_MASK: np.ones_like(ids)}
    streamed = make_session(str(files[-1])).run(None, feeds)[0]
    whole = make_session(quantized_graph(tiny_loaded, w4a4_plan)).run(None, feeds)[0]
    np.testing.assert_array_equal(streamed, whole)


def test_weight_entries_know_their_layer_and_linear(w4a4_plan):
    import dataclasses

    from rptq.errors import PlanError
    from rptq.plan import validate_plan

    fc2 = w4a4_plan.weight(names.module(1, "fc2"))
    q_proj = w4a4_plan.weight(names.module(0, "self_attn.q_proj"))
    assert (fc2.layer, fc2.linear) == (1, "fc2")
    assert (q_proj.layer, q_proj.linear) == (0, "self_attn.q_proj")
    for fqn in ("model.decoder.layers.01.fc2", "lm_head", "fc1"):
        with pytest.raises(PlanError, match="six linears"):
            dataclasses.replace(fc2, fqn=fqn)
    beyond = dataclasses.replace(fc2, fqn="model.decoder.layers.2.fc2")
    with pytest.raises(PlanError, match="six linears"):
        validate_plan(dataclasses.replace(w4a4_plan, weights=(beyond,)), "test")
