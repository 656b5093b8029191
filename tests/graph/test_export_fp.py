"""The FP prefill graph: structure per docs/graph.md, names per names.py, parity, saving."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from rptq import names
from rptq.errors import ConfigError, MissingDependencyError, OutputError
from rptq.exporter import build_fp_graph, save_onnx
from rptq.exporter import save as save_module
from rptq.model.forward import read_layer
from rptq.points import LINEARS, Act
from rptq.runtime.ort import OrtLogits, make_session

# Measured 1.9e-6 max abs (ORT 1.32 CPU, optimisations off and on; |logits| up to 4.4) against
# both the functional forward and HF OPTForCausalLM.
FP32_ATOL = 5e-6
# Measured 3.7e-3 max abs between the fp16 and fp32 graphs on unpadded positions (fp16 weights,
# fp16 softmax; ORT CPU).
FP16_ATOL = 1e-2

LAYER_SUBMODULES = (
    *LINEARS,
    "self_attn",
    "self_attn_layer_norm",
    "final_layer_norm",
    "activation_fn",
)


def _nodes_by_op(model: onnx.ModelProto) -> Counter[str]:
    return Counter(node.op_type for node in model.graph.node)


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _producers(model: onnx.ModelProto) -> Counter[str]:
    return Counter(out for node in model.graph.node for out in node.output)


def _known_modules(num_layers: int) -> set[str]:
    modules = {
        names.DECODER,
        names.EMBED_TOKENS,
        names.EMBED_POSITIONS,
        names.MASK_MODULE,
        names.FINAL_LAYER_NORM,
        names.LM_HEAD,
    }
    for i in range(num_layers):
        modules.add(names.layer(i))
        modules.update(names.module(i, sub) for sub in LAYER_SUBMODULES)
    return modules


def _batches() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    plain = torch.randint(0, 512, (1, 9), generator=generator)
    padded = torch.randint(0, 512, (3, 33), generator=generator)
    padded_mask = torch.ones_like(padded)
    padded_mask[1, :5] = 0
    padded_mask[2, :32] = 0  # a single real token
    return {"no_padding": (plain, torch.ones_like(plain)), "left_padding": (padded, padded_mask)}


# --- structure ---------------------------------------------------------------------------


@pytest.mark.parametrize("graph", ["fp32_graph", "fp16_graph"])
def test_checker_full_check(graph, request):
    onnx.checker.check_model(request.getfixturevalue(graph), full_check=True)


def test_op_counts_follow_config(fp32_graph, tiny_loaded):
    layers = tiny_loaded.shape.num_layers
    per_layer = {
        "LayerNormalization": 2,
        "MatMul": len(LINEARS) + 2,  # six linears, QK^T, P.V
        "Add": len(LINEARS) + 1 + 2,  # biases, mask, two residuals
        "Mul": 1,  # q * head_dim**-0.5
        "Reshape": 4,
        "Transpose": 4,
        "Softmax": 1,
        "Relu": 1,
    }
    outside = {  # embeddings, positions, mask, final LayerNorm, lm_head
        "Gather": 2, "Cast": 3, "CumSum": 1, "Mul": 1, "Sub": 1, "Add": 2, "Shape": 1,
        "Concat": 1, "ConstantOfShape": 1, "Trilu": 1, "Unsqueeze": 1, "And": 1, "Where": 1,
        "LayerNormalization": 1, "Transpose": 1, "MatMul": 1,
    }  # fmt: skip
    want = Counter({op: n * layers for op, n in per_layer.items()}) + Counter(outside)
    assert _nodes_by_op(fp32_graph) == want


def test_linears_are_matmul_add_on_transposed_weights(fp32_graph, tiny_loaded):
    consts = _initializers(fp32_graph)
    nodes = {node.name: node for node in fp32_graph.graph.node}
    for i in range(tiny_loaded.shape.num_layers):
        weights = read_layer(tiny_loaded.weights, i)
        for linear in LINEARS:
            path = names.module(i, linear)
            w, b = weights[f"{linear}.weight"].numpy(), weights[f"{linear}.bias"].numpy()
            np.testing.assert_array_equal(consts[names.weight(path)], w.T)  # [in, out]
            np.testing.assert_array_equal(consts[names.bias(path)], b)
            matmul, add = nodes[names.node(path, "MatMul")], nodes[names.node(path, "Add")]
            assert list(matmul.input)[1] == names.weight(path)
            assert list(add.input) == [matmul.output[0], names.bias(path)]
    linear_matmuls = [n for n in fp32_graph.graph.node if n.op_type == "MatMul"
                      and n.input[1] in consts]  # fmt: skip
    assert len(linear_matmuls) == len(LINEARS) * tiny_loaded.shape.num_layers


def test_every_name_follows_the_scheme(fp32_graph, tiny_loaded):
    modules = _known_modules(tiny_loaded.shape.num_layers)

    def scoped(name: str) -> bool:
        module_path, _, role = name.partition("/")
        return module_path in modules and bool(role) and "/" not in role

    for node in fp32_graph.graph.node:
        assert scoped(node.name), node.name
        for out in node.output:
            assert out == names.GRAPH_LOGITS or scoped(out), out
    for name in _initializers(fp32_graph):
        parameter = any(name in (names.weight(m), names.bias(m)) for m in modules)
        assert parameter or scoped(name), name
    assert len({n.name for n in fp32_graph.graph.node}) == len(fp32_graph.graph.node)


def test_activation_tensors_have_one_producer(fp32_graph, tiny_loaded):
    producers = _producers(fp32_graph)
    consumers = Counter(i for node in fp32_graph.graph.node for i in node.input)
    for i in range(tiny_loaded.shape.num_layers):
        for act in Act:
            name = names.act_tensor(i, act)
            assert producers[name] == 1, name
            assert consumers[name] >= 1, name
        assert producers[names.tensor(names.layer(i), "output")] == 1
    assert producers[names.GRAPH_LOGITS] == 1
    assert all(count == 1 for count in producers.values())


def test_layer_norms_have_one_output(fp32_graph, tiny_loaded):
    lns = [n for n in fp32_graph.graph.node if n.op_type == "LayerNormalization"]
    assert len(lns) == 2 * tiny_loaded.shape.num_layers + 1
    for node in lns:
        assert len(node.output) == 1, node.name
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["axis"] == -1
        assert attrs["stash_type"] == 1
        assert attrs["epsilon"] == pytest.approx(1e-5)


def test_tied_embedding_stored_once(fp32_graph, tiny_loaded):
    consts = _initializers(fp32_graph)
    table = names.weight(names.EMBED_TOKENS)
    assert names.weight(names.LM_HEAD) not in consts
    (transpose,) = [
        n for n in fp32_graph.graph.node if n.name == names.node(names.LM_HEAD, "Transpose")
    ]
    assert list(transpose.input) == [table]
    assert consts[table].shape == (tiny_loaded.shape.vocab_size, tiny_loaded.shape.hidden_size)


def test_inputs_outputs_and_metadata(fp32_graph, tiny_loaded):
    graph = fp32_graph.graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]}  # fmt: skip
    assert dims == {
        names.GRAPH_INPUT_IDS: ["batch", "sequence"],
        names.GRAPH_ATTENTION_MASK: ["batch", "sequence"],
        names.GRAPH_LOGITS: ["batch", "sequence", tiny_loaded.shape.vocab_size],
    }
    meta = {p.key: p.value for p in fp32_graph.metadata_props}
    assert meta["rptq.dtype"] == "float32"
    assert int(meta["rptq.num_layers"]) == tiny_loaded.shape.num_layers
    assert json.loads(meta["rptq.shape"])["hidden_size"] == tiny_loaded.shape.hidden_size
    assert [(o.domain, o.version) for o in fp32_graph.opset_import] == [("", 21)]


@pytest.mark.parametrize(("dtype", "opset"), [("bfloat16", 21), ("float32", 20), ("float32", 26)])
def test_bad_dtype_or_opset_is_a_config_error(tiny_loaded, dtype, opset):
    with pytest.raises(ConfigError):
        build_fp_graph(tiny_loaded, dtype, opset)


def test_opset_25_builds(tiny_loaded):
    onnx.checker.check_model(build_fp_graph(tiny_loaded, opset=25), full_check=True)


# --- parity ------------------------------------------------------------------------------


@pytest.mark.parametrize("optimize", [False, True], ids=["ORT_DISABLE_ALL", "ORT_ENABLE_ALL"])
@pytest.mark.parametrize("case", ["no_padding", "left_padding"])
def test_fp32_logits_match_torch(
    fp32_graph, tiny_model, tiny_loaded, functional_logits, optimize, case
):
    ids, mask = _batches()[case]
    got = OrtLogits(make_session(fp32_graph, optimize=optimize))(ids, mask)
    want = functional_logits(tiny_loaded, ids, mask)
    torch.testing.assert_close(got, want, rtol=0, atol=FP32_ATOL)  # every position
    with torch.no_grad():
        hf = tiny_model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()  # HF's logits at padded positions are not defined the same way
    torch.testing.assert_close(got[valid], hf[valid], rtol=0, atol=FP32_ATOL)


def test_fp16_graph_is_fp16_and_close_to_fp32(fp16_graph, fp32_graph, tiny_batch):
    floats = [t for t in fp16_graph.graph.initializer
              if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]  # fmt: skip
    assert floats
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in floats)
    ids, mask = tiny_batch
    want = OrtLogits(make_session(fp32_graph))(ids, mask)
    for optimize in (False, True):
        got = OrtLogits(make_session(fp16_graph, optimize=optimize))(ids, mask)
        assert torch.isfinite(got).all()
        valid = mask.bool()
        torch.testing.assert_close(got[valid], want[valid], rtol=0, atol=FP16_ATOL)


def test_default_mask_is_all_ones(fp32_graph, tiny_batch):
    ids, _ = tiny_batch
    run = OrtLogits(make_session(fp32_graph))
    torch.testing.assert_close(run(ids), run(ids, torch.ones_like(ids)), rtol=0, atol=0)


def test_missing_cuda_provider_names_the_package(fp32_graph):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the missing-provider error cannot be shown")
    with pytest.raises(MissingDependencyError, match="pip install onnxruntime-gpu"):
        make_session(fp32_graph, providers=["cuda"])
    with pytest.raises(ConfigError):
        make_session(fp32_graph, providers=["abacus"])


# --- saving ------------------------------------------------------------------------------


def test_external_data_round_trip(fp32_graph, tmp_path, tiny_batch):
    before = fp32_graph.SerializeToString()
    path = tmp_path / "tiny.onnx"
    written = save_onnx(fp32_graph, path, external_data=True)
    assert written == [tmp_path / "tiny.onnx.data", path]
    assert sorted(tmp_path.iterdir()) == sorted(written)  # no temporary directory left
    assert fp32_graph.SerializeToString() == before  # the caller's model is untouched
    assert path.stat().st_size < 100_000 < written[0].stat().st_size

    reloaded = onnx.load(path)
    onnx.checker.check_model(str(path), full_check=True)
    locations = {e.value for t in onnx.load(path, load_external_data=False).graph.initializer
                 for e in t.external_data if e.key == "location"}  # fmt: skip
    assert locations == {"tiny.onnx.data"}
    want, got = _initializers(fp32_graph), _initializers(reloaded)
    assert want.keys() == got.keys()
    for name, array in want.items():
        np.testing.assert_array_equal(got[name], array)

    ids, mask = tiny_batch
    in_memory = OrtLogits(make_session(fp32_graph))(ids, mask)
    from_disk = OrtLogits(make_session(path))(ids, mask)
    torch.testing.assert_close(from_disk, in_memory, rtol=0, atol=0)


def test_automatic_external_data(fp32_graph, tmp_path, monkeypatch):
    assert save_onnx(fp32_graph, tmp_path / "small.onnx") == [tmp_path / "small.onnx"]
    monkeypatch.setattr(save_module, "PROTOBUF_LIMIT_BYTES", 1000)
    written = save_onnx(fp32_graph, tmp_path / "big.onnx")
    assert written == [tmp_path / "big.onnx.data", tmp_path / "big.onnx"]


def test_refuses_to_overwrite_without_force(fp32_graph, tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="--force"):
        save_onnx(fp32_graph, path)
    assert path.read_bytes() == b"keep me"
    save_onnx(fp32_graph, path, force=True)
    onnx.checker.check_model(str(path))
    (tmp_path / "other.onnx.data").write_bytes(b"keep me")  # a data file alone blocks too
    with pytest.raises(OutputError, match="other.onnx.data"):
        save_onnx(fp32_graph, tmp_path / "other.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "other.onnx.data"]


def _interrupt_mid_data(tensor, handle, location):
    handle.write(b"\0" * 100)
    raise KeyboardInterrupt


def _interrupt_model_write(model, path, inline_from=None):
    raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["data", "model", "rename"])
def test_interrupted_save_leaves_nothing(fp32_graph, tmp_path, monkeypatch, where):
    if where == "data":
        monkeypatch.setattr(save_module, "_externalize", _interrupt_mid_data)
    elif where == "model":
        monkeypatch.setattr(save_module, "_write_model", _interrupt_model_write)
    else:  # the data file is already in place when the model rename is interrupted
        real_replace, calls = save_module.os.replace, []

        def replace(source, target):
            calls.append(target)
            if len(calls) == 2:
                raise KeyboardInterrupt
            real_replace(source, target)

        monkeypatch.setattr(save_module.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_onnx(fp32_graph, tmp_path / "m.onnx", external_data=True)
    assert list(tmp_path.iterdir()) == []


def test_write_failure_is_an_output_error(fp32_graph, tmp_path, monkeypatch):
    def fail(tensor, handle, location):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(save_module, "_externalize", fail)
    with pytest.raises(OutputError, match="No space left"):
        save_onnx(fp32_graph, tmp_path / "m.onnx", external_data=True)
    assert list(tmp_path.iterdir()) == []


def test_naming_doc_matches_the_export(fp32_graph):
    """Every row of docs/naming.md's node table exists in the export, op and output included."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "naming.md").read_text()
    rows = re.findall(r"^\| `([^`]+)` \| (\w+) \| `([^`]+)` \|", text, flags=re.MULTILINE)
    assert len(rows) > 40
    nodes = {node.name: node for node in fp32_graph.graph.node}
    for name, op_type, output in rows:
        assert name in nodes, name
        assert (nodes[name].op_type, nodes[name].output[0]) == (op_type, output), name
    acts = re.findall(r"^\| `(\w+)` \| `([^`]+)` \|$", text, flags=re.MULTILINE)
    assert {act: name for act, name in acts} == {a.value: names.act_tensor(3, a) for a in Act}
