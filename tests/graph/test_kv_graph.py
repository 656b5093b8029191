"""The decoder-with-past graph (docs/graph.md, "Decoder with past"): interface, incremental
decoding in ONNX Runtime against the prefill graph, greedy tokens against transformers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from rptq import names
from rptq.errors import ConfigError
from rptq.exporter import build_fp_graph
from rptq.exporter.opt import META_KV_CACHE_DTYPE, META_PAST
from rptq.exporter.options import ExportOptions
from rptq.runtime.decode import DecoderSession, greedy, is_with_past, position_ids
from rptq.runtime.ort import OrtLogits, make_session
from tests.tolerances import INCREMENTAL_FP16_ATOL, INCREMENTAL_FP32_ATOL, INCREMENTAL_FP32_RTOL


@pytest.fixture(scope="module")
def past_graph(tiny_loaded):
    return build_fp_graph(tiny_loaded, "float32", past=True)


@pytest.fixture(scope="module")
def padded_batch() -> tuple[np.ndarray, np.ndarray]:
    """Two sequences of 14 tokens, the second left-padded by 4."""
    ids = np.random.default_rng(5).integers(0, 512, (2, 14), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    return ids, mask


def incremental_logits(
    decoder: DecoderSession, ids: np.ndarray, mask: np.ndarray, prefix: int = 0, shift: int = 0
) -> np.ndarray:
    """Logits [B, T, V]: the first `prefix` tokens in one step, then one token per step.

    `shift` adds to every position_id (a negative control: the graph must use them).
    """
    cache = decoder.empty_cache(ids.shape[0])
    steps = [(0, prefix)] if prefix else []
    steps += [(t, t + 1) for t in range(prefix, ids.shape[1])]
    out = []
    for start, end in steps:
        positions = position_ids(mask[:, :end], end - start) + shift
        logits, cache = decoder.step(ids[:, start:end], mask[:, :end], cache, positions)
        out.append(logits)
    return np.concatenate(out, axis=1)


def assert_close_on_tokens(got: np.ndarray, want: np.ndarray, mask: np.ndarray) -> None:
    """Compare logits on real tokens only: padded rows attend to nothing real in either."""
    real = mask.astype(bool)
    np.testing.assert_allclose(
        got[real], want[real], atol=INCREMENTAL_FP32_ATOL, rtol=INCREMENTAL_FP32_RTOL
    )


def test_interface(past_graph, tiny_loaded):
    onnx.checker.check_model(past_graph, full_check=True)
    shape = tiny_loaded.shape
    graph = past_graph.graph

    def dims(info):
        return [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim]

    inputs = {i.name: i for i in graph.input}
    outputs = {o.name: o for o in graph.output}
    expected_inputs = [names.GRAPH_INPUT_IDS, names.GRAPH_ATTENTION_MASK, names.GRAPH_POSITION_IDS]
    expected_outputs = [names.GRAPH_LOGITS]
    for i in range(shape.num_layers):
        expected_inputs += [names.past_key(i), names.past_value(i)]
        expected_outputs += [names.present_key(i), names.present_value(i)]
    assert list(inputs) == expected_inputs
    assert list(outputs) == expected_outputs
    assert dims(inputs["input_ids"]) == ["batch_size", "sequence_length"]
    assert dims(inputs["attention_mask"]) == ["batch_size", "total_sequence_length"]
    assert dims(inputs["position_ids"]) == ["batch_size", "sequence_length"]
    heads, head_dim = shape.num_heads, shape.head_dim
    assert dims(inputs[names.past_key(1)]) == [
        "batch_size",
        heads,
        "past_sequence_length",
        head_dim,
    ]
    assert dims(outputs[names.present_value(0)]) == [
        "batch_size",
        heads,
        "total_sequence_length",
        head_dim,
    ]
    assert dims(outputs["logits"]) == ["batch_size", "sequence_length", shape.vocab_size]
    meta = {p.key: p.value for p in past_graph.metadata_props}
    assert (meta[META_PAST], meta[META_KV_CACHE_DTYPE]) == ("1", "float")
    assert is_with_past(past_graph)
    assert not is_with_past(build_fp_graph(tiny_loaded))
    # every node name still comes from names.py's module paths
    assert all(
        n.name.split("/")[0].startswith("model.decoder") or n.name.startswith("lm_head")
        for n in graph.node
    )


def test_prefill_graph_has_no_cache_metadata(fp32_graph):
    meta = {p.key for p in fp32_graph.metadata_props}
    assert META_PAST not in meta
    assert META_KV_CACHE_DTYPE not in meta


@pytest.mark.parametrize("optimize", [False, True], ids=["no-opt", "opt"])
@pytest.mark.parametrize("prefix", [0, 5], ids=["token-by-token", "prompt-then-tokens"])
def test_incremental_equals_prefill_fp32(past_graph, fp32_graph, padded_batch, optimize, prefix):
    ids, mask = padded_batch
    decoder = DecoderSession(make_session(past_graph, optimize=optimize))
    full = make_session(fp32_graph, optimize=optimize).run(
        None, {names.GRAPH_INPUT_IDS: ids, names.GRAPH_ATTENTION_MASK: mask}
    )[0]
    got = incremental_logits(decoder, ids, mask, prefix)
    assert got.shape == full.shape
    assert_close_on_tokens(got, full, mask)


def test_incremental_equals_prefill_fp16(tiny_loaded, fp16_graph, padded_batch):
    ids, mask = padded_batch
    decoder = DecoderSession(make_session(build_fp_graph(tiny_loaded, "float16", past=True)))
    assert decoder.cache_dtype == np.float16
    full = make_session(fp16_graph).run(
        None, {names.GRAPH_INPUT_IDS: ids, names.GRAPH_ATTENTION_MASK: mask}
    )[0]
    got = incremental_logits(decoder, ids, mask, prefix=3)
    real = mask.astype(bool)
    diff = np.abs(got[real].astype(np.float32) - full[real].astype(np.float32)).max()
    assert diff <= INCREMENTAL_FP16_ATOL, diff


def test_position_ids_off_by_one_fails(past_graph, fp32_graph, padded_batch):
    """Negative control: the incremental comparison notices positions shifted by one."""
    ids, mask = padded_batch
    decoder = DecoderSession(make_session(past_graph))
    full = make_session(fp32_graph).run(
        None, {names.GRAPH_INPUT_IDS: ids, names.GRAPH_ATTENTION_MASK: mask}
    )[0]
    shifted = incremental_logits(decoder, ids, mask, shift=1)
    with pytest.raises(AssertionError):
        assert_close_on_tokens(shifted, full, mask)


def test_cache_grows_by_the_new_tokens(past_graph, tiny_loaded, padded_batch):
    ids, mask = padded_batch
    decoder = DecoderSession(make_session(past_graph))
    shape = tiny_loaded.shape
    assert (decoder.num_layers, decoder.num_heads, decoder.head_dim) == (
        shape.num_layers,
        shape.num_heads,
        shape.head_dim,
    )
    assert decoder.cache_dtype == np.float32
    assert decoder.cache_bytes_per_token == 2 * shape.num_layers * shape.hidden_size * 4
    _, cache = decoder.step(ids[:, :6], mask[:, :6], decoder.empty_cache(2))
    _, cache = decoder.step(ids[:, 6:7], mask[:, :7], cache)
    assert [k.shape for k, _ in cache] == [(2, shape.num_heads, 7, shape.head_dim)] * 2
    with pytest.raises(ValueError, match="attention_mask"):
        decoder.step(ids[:, 7:8], mask[:, :7], cache)


def test_ort_logits_runs_both_graph_kinds(past_graph, fp32_graph, tiny_batch):
    ids, mask = tiny_batch
    with_past = OrtLogits(make_session(past_graph))(ids, mask)
    prefill = OrtLogits(make_session(fp32_graph))(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(
        with_past[real], prefill[real], atol=INCREMENTAL_FP32_ATOL, rtol=INCREMENTAL_FP32_RTOL
    )


def test_decoder_session_refuses_a_prefill_graph(fp32_graph):
    with pytest.raises(ConfigError, match="no KV cache"):
        DecoderSession(make_session(fp32_graph))


def test_greedy_matches_transformers_generate(past_graph, tiny_model):
    """32 greedy tokens of the graph equal `generate()` of the same HF model.

    Where decidable: given the same prefix, the graph's logits are within the incremental
    bound of HF's (checked), so the argmax must agree wherever HF's top-2 gap exceeds twice
    the step's measured difference; a smaller gap is a tie and ends the comparison.
    """
    ids = np.random.default_rng(7).integers(3, 512, (2, 9), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    new = 32
    decoder = DecoderSession(make_session(past_graph))
    tokens = greedy(decoder, ids, mask, new)
    with torch.no_grad():
        out = tiny_model.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=tiny_model.config.pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
    hf_tokens = out.sequences[:, ids.shape[1] :].numpy()
    hf_logits = torch.stack(out.logits, dim=1).float().numpy()  # [B, new, V], raw
    sequence = np.concatenate([ids, hf_tokens], axis=1)
    sequence_mask = np.concatenate([mask, np.ones_like(hf_tokens)], axis=1)
    forced = incremental_logits(decoder, sequence, sequence_mask, prefix=ids.shape[1])
    forced = forced[:, ids.shape[1] - 1 : -1]
    np.testing.assert_allclose(
        forced, hf_logits, atol=INCREMENTAL_FP32_ATOL, rtol=INCREMENTAL_FP32_RTOL
    )
    top2 = np.sort(hf_logits, axis=-1)[..., -2:]
    gaps = top2[..., 1] - top2[..., 0]
    bounds = np.abs(forced - hf_logits).max(axis=-1)
    compared = 0
    for b in range(ids.shape[0]):
        for t in range(new):
            if gaps[b, t] <= 2 * bounds[b, t]:
                break
            assert tokens[b, t] == hf_tokens[b, t], f"row {b} step {t}"
            compared += 1
    assert compared > 0


def test_kv_cache_dtype_needs_the_cache_graph():
    with pytest.raises(ConfigError, match="--no-cache"):
        ExportOptions(kv_cache_dtype="int8")
    with pytest.raises(ConfigError, match="tensorrt"):
        ExportOptions(past=True, kv_cache_dtype="int8", target="trt")
    with pytest.raises(ConfigError, match="float, int8 or uint8"):
        ExportOptions(past=True, kv_cache_dtype="int4")  # type: ignore[arg-type]


# --- every weight method and the TensorRT variant on the with-past graph ----------------------

METHOD_CASES = [
    ("GPTQ", "ort"),
    ("GPTQT", "ort"),
    ("LoRC", "ort"),
    ("GPTQT-LoRC8", "ort"),
    ("W4A4-groups", "ort"),
    ("W3A3KV", "ort"),
    ("W4A16", "ort"),
    ("W4A4", "trt"),
    ("W4A4-trt-calibrated", "trt"),
]


@pytest.fixture(scope="module")
def method_plans(tiny_loaded):
    from tests.plans import stand_in_plans

    return stand_in_plans(tiny_loaded)


@pytest.mark.parametrize(("label", "target"), METHOD_CASES)
def test_every_method_decodes_like_its_prefill_graph(
    label, target, tiny_loaded, method_plans, padded_batch
):
    from rptq.runtime.parity import sqnr_db
    from rptq.workflow import quantized_graph
    from tests.tolerances import INCREMENTAL_QDQ_MIN_SQNR_DB

    ids, mask = padded_batch
    plan = method_plans[label]
    prefill = quantized_graph(tiny_loaded, plan, target=target)
    with_past = quantized_graph(tiny_loaded, plan, target=target, past=True)
    onnx.checker.check_model(with_past, full_check=True)
    full = make_session(prefill).run(
        None, {names.GRAPH_INPUT_IDS: ids, names.GRAPH_ATTENTION_MASK: mask}
    )[0]
    got = incremental_logits(DecoderSession(make_session(with_past)), ids, mask, prefix=4)
    real = np.nonzero(mask.astype(bool))
    worst = min(sqnr_db(full[b, t], got[b, t]) for b, t in zip(*real, strict=True))
    assert worst >= INCREMENTAL_QDQ_MIN_SQNR_DB, f"{label} {target}: {worst:.1f} dB"
    if target == "trt":
        from rptq.check.rules import check_model, errors

        assert errors(check_model(with_past, "trt")) == []
