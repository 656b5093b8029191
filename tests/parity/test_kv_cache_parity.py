"""Quantized decoder-with-past graphs in ONNX Runtime: incremental decoding against the
prefill graph and against the PyTorch reference's incremental path, and the integer cache.

Calibrated plans on the tiny random OPT; batch 2 with the second row left-padded. Greedy
tokens are compared where they are decidable: at step t the graph's and the reference's logits
(same prefix) differ by at most d_t, so their argmax must agree whenever the reference's top-2
gap exceeds 2 d_t; a smaller gap is a tie, after which the runs may legitimately part.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from onnx import numpy_helper

from rptq import names
from rptq.errors import ConfigError
from rptq.points import Act
from rptq.quant.qparams import grid_bounds
from rptq.runtime.decode import DecoderSession, greedy
from rptq.runtime.ort import make_session
from rptq.runtime.parity import sqnr_db, steps_apart
from rptq.runtime.reference import ReferenceModel, cache_in_graph_order, reference_greedy
from rptq.runtime.trt_reference import TrtReferenceModel
from rptq.workflow import quantized_graph
from tests.graph.test_kv_graph import incremental_logits
from tests.tolerances import (
    INCREMENTAL_FP32_ATOL,
    INCREMENTAL_FP32_RTOL,
    INCREMENTAL_QDQ_MIN_SQNR_DB,
    LOGITS_MIN_SQNR_DB,
    QDQ_DRIFT_MAX_STEPS,
    QDQ_MAX_FLIPPED_FRACTION,
)

RECIPES = {
    "W4A8": {"wbits": 4, "abits": 8},
    "W4A4": {"wbits": 4, "abits": 4},
    "W4A4KV": {"wbits": 4, "abits": 4, "only_quant_kv": True},
    # the other weight methods: GPTQT planes with LoRC branches, GPTQ with int8 LoRC factors
    "GPTQT-LoRC": {"wbits": 3, "abits": 4, "weight_method": "gptqt", "lorc_rank": 4},
    "GPTQ-LoRC8": {"wbits": 4, "abits": 4, "weight_method": "gptq", "lorc_rank": 4, "lorc_bits": 8},
}
# (recipe, target): the default target's recipes and the TensorRT variant
CASES = [(label, "ort") for label in RECIPES] + [("W4A4", "trt"), ("W4A4KV", "trt")]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(5).integers(0, 512, (2, 14), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    return ids, mask


def graphs(loaded, plan, target: str, **options):
    """(prefill graph, with-past graph) of one plan and target."""
    prefill = quantized_graph(loaded, plan, target=target)
    return prefill, quantized_graph(loaded, plan, target=target, past=True, **options)


def position_sqnrs(want: np.ndarray, got: np.ndarray, mask: np.ndarray) -> list[float]:
    """Logit SQNR of every real (unpadded) position."""
    return [
        sqnr_db(want[b, t], got[b, t]) for b, t in zip(*np.nonzero(mask.astype(bool)), strict=True)
    ]


@pytest.mark.parametrize("optimize", [False, True], ids=["ORT_DISABLE_ALL", "ORT_ENABLE_ALL"])
@pytest.mark.parametrize(("label", "target"), CASES)
def test_incremental_equals_prefill(label, target, optimize, tiny_loaded, calibrate_tiny, batch):
    ids, mask = batch
    prefill, with_past = graphs(tiny_loaded, calibrate_tiny(**RECIPES[label]), target)
    full = make_session(prefill, optimize=optimize).run(
        None, {names.GRAPH_INPUT_IDS: ids, names.GRAPH_ATTENTION_MASK: mask}
    )[0]
    decoder = DecoderSession(make_session(with_past, optimize=optimize))
    for prefix in (0, 6):  # token by token; a 6-token prompt, then token by token
        got = incremental_logits(decoder, ids, mask, prefix)
        worst = min(position_sqnrs(full, got, mask))
        assert worst >= INCREMENTAL_QDQ_MIN_SQNR_DB, f"{label} {target}: {worst:.1f} dB"


@pytest.mark.parametrize(("label", "target"), [("W4A4", "ort"), ("W4A4", "trt")])
def test_position_ids_off_by_one_fails(label, target, tiny_loaded, calibrate_tiny, batch):
    """Negative control: the quantized incremental comparison notices shifted positions."""
    ids, mask = batch
    prefill, with_past = graphs(tiny_loaded, calibrate_tiny(**RECIPES[label]), target)
    full = make_session(prefill).run(
        None, {names.GRAPH_INPUT_IDS: ids, names.GRAPH_ATTENTION_MASK: mask}
    )[0]
    shifted = incremental_logits(DecoderSession(make_session(with_past)), ids, mask, shift=1)
    assert min(position_sqnrs(full, shifted, mask)) < INCREMENTAL_QDQ_MIN_SQNR_DB


@pytest.mark.parametrize(("label", "target"), CASES)
def test_greedy_tokens_equal_the_reference(label, target, tiny_loaded, calibrate_tiny, batch):
    ids, mask = batch
    plan = calibrate_tiny(**RECIPES[label])
    _, with_past = graphs(tiny_loaded, plan, target)
    reference = (TrtReferenceModel if target == "trt" else ReferenceModel)(tiny_loaded, plan)
    ref_tokens, ref_logits = reference_greedy(
        reference, torch.from_numpy(ids), torch.from_numpy(mask), NEW_TOKENS
    )
    ref_tokens_np, ref_logits_np = ref_tokens.numpy(), ref_logits.numpy()
    decoder = DecoderSession(make_session(with_past))
    # the graph on the reference's own tokens: per-step logits with the same prefix
    sequence = np.concatenate([ids, ref_tokens_np], axis=1)
    sequence_mask = np.concatenate([mask, np.ones_like(ref_tokens_np)], axis=1)
    forced = incremental_logits(decoder, sequence, sequence_mask, prefix=ids.shape[1])
    forced = forced[:, ids.shape[1] - 1 : -1]  # the logits that chose each new token
    for b in range(ids.shape[0]):
        for t in range(NEW_TOKENS):
            sqnr = sqnr_db(ref_logits_np[b, t], forced[b, t])
            assert sqnr >= LOGITS_MIN_SQNR_DB, f"row {b} step {t}: {sqnr:.1f} dB"
    tokens = greedy(decoder, ids, mask, NEW_TOKENS)
    top2 = np.sort(ref_logits_np, axis=-1)[..., -2:]
    gaps = top2[..., 1] - top2[..., 0]
    bounds = np.abs(forced - ref_logits_np).max(axis=-1)
    compared = 0
    for b in range(ids.shape[0]):
        for t in range(NEW_TOKENS):
            if gaps[b, t] <= 2 * bounds[b, t]:
                break  # a tie within the graph's error: later prefixes may differ
            assert tokens[b, t] == ref_tokens_np[b, t], f"row {b} step {t}"
            compared += 1
    assert compared > 0


# --- the integer cache ----------------------------------------------------------------------

CACHE_TYPES = {"int8": np.int8, "uint8": np.uint8}


def cache_params(model, layer: int, role: str) -> tuple[np.ndarray, np.ndarray]:
    """The [H, 1, hd] scale and zero point a client reads to dequantize a cache."""
    act = names.act_tensor(layer, Act.K if role == "key" else Act.V)
    wanted = names.kv_cache(act)
    found = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return found[wanted["scale"]], found[wanted["zero_point"]]


@pytest.mark.parametrize("kind", sorted(CACHE_TYPES))
@pytest.mark.parametrize("label", ["W4A8", "W4A4KV"])
def test_integer_cache_holds_the_plans_codes(label, kind, tiny_loaded, calibrate_tiny, batch):
    ids, mask = batch
    plan = calibrate_tiny(**RECIPES[label])
    float_graph = quantized_graph(tiny_loaded, plan, past=True)
    int_graph = quantized_graph(tiny_loaded, plan, past=True, kv_cache_dtype=kind)
    meta = {p.key: p.value for p in int_graph.metadata_props}
    assert meta["rptq.kv_cache_dtype"] == kind
    floats = DecoderSession(make_session(float_graph))
    ints = DecoderSession(make_session(int_graph))
    assert ints.cache_dtype == np.dtype(CACHE_TYPES[kind])
    assert ints.cache_bytes_per_token * 4 == floats.cache_bytes_per_token
    float_logits, float_cache = floats.step(ids, mask, floats.empty_cache(2))
    int_logits, int_cache = ints.step(ids, mask, ints.empty_cache(2))
    # the same function as the float cache: dequantized codes are its values exactly
    np.testing.assert_allclose(
        int_logits, float_logits, atol=INCREMENTAL_FP32_ATOL, rtol=INCREMENTAL_FP32_RTOL
    )
    _, ref_cache = ReferenceModel(tiny_loaded, plan).step(
        torch.from_numpy(ids), torch.from_numpy(mask)
    )
    real = mask.astype(bool)
    for layer in range(tiny_loaded.shape.num_layers):
        for slot, role in enumerate(("key", "value")):
            codes = int_cache[layer][slot]
            assert codes.dtype == CACHE_TYPES[kind]
            act = plan.act(layer, Act.K if role == "key" else Act.V)
            shift = 128 if kind == "uint8" else 0
            qmin, qmax = grid_bounds(act.bits)
            assert codes.min() >= qmin + shift
            assert codes.max() <= qmax + shift
            scale, zero = cache_params(int_graph, layer, role)
            values = (codes.astype(np.float32) - zero) * scale
            np.testing.assert_array_equal(values, float_cache[layer][slot])
            want = cache_in_graph_order(ref_cache[layer][slot].numpy(), plan, layer, role)
            # compare real tokens only ([B, H, T, hd] -> [tokens, H, hd])
            got_real = values.transpose(0, 2, 1, 3)[real]
            want_real = want.transpose(0, 2, 1, 3)[real]
            steps, flipped = steps_apart(
                torch.from_numpy(want_real),
                torch.from_numpy(got_real),
                torch.from_numpy(np.broadcast_to(scale.transpose(1, 0, 2), got_real.shape).copy()),
            )
            assert steps <= QDQ_DRIFT_MAX_STEPS, (layer, role, steps)
            assert flipped <= QDQ_MAX_FLIPPED_FRACTION, (layer, role, flipped)


def test_integer_cache_decodes_like_the_float_cache(tiny_loaded, calibrate_tiny, batch):
    ids, mask = batch
    plan = calibrate_tiny(**RECIPES["W4A4"])
    float_graph = quantized_graph(tiny_loaded, plan, past=True)
    int_graph = quantized_graph(tiny_loaded, plan, past=True, kv_cache_dtype="int8")
    want = incremental_logits(DecoderSession(make_session(float_graph)), ids, mask, prefix=5)
    got = incremental_logits(DecoderSession(make_session(int_graph)), ids, mask, prefix=5)
    real = mask.astype(bool)
    np.testing.assert_allclose(
        got[real], want[real], atol=INCREMENTAL_FP32_ATOL, rtol=INCREMENTAL_FP32_RTOL
    )


def test_shifted_cluster_codes_change_the_next_logits(tiny_loaded, calibrate_tiny, batch):
    """Negative control: one cluster's cached key codes moved by one step must show."""
    ids, mask = batch
    plan = calibrate_tiny(**RECIPES["W4A4KV"])
    decoder = DecoderSession(
        make_session(quantized_graph(tiny_loaded, plan, past=True, kv_cache_dtype="int8"))
    )
    _, cache = decoder.step(ids[:, :-1], mask[:, :-1], decoder.empty_cache(2))
    want, _ = decoder.step(ids[:, -1:], mask, cache)
    site = plan.site(0, "R2")
    first_cluster = int(site.sizes[0])  # channels 0..size-1 of head 0 in the folded order
    key, value = cache[0]
    shifted_key = key.copy()
    qmin, qmax = grid_bounds(plan.act(0, Act.K).bits)
    shifted_key[:, 0, :, :first_cluster] = np.clip(
        shifted_key[:, 0, :, :first_cluster].astype(np.int16) + 1, qmin, qmax
    ).astype(np.int8)
    assert (shifted_key != key).any()
    got, _ = decoder.step(ids[:, -1:], mask, [(shifted_key, value), *cache[1:]])
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(
            got, want, atol=INCREMENTAL_FP32_ATOL, rtol=INCREMENTAL_FP32_RTOL
        )


def test_integer_cache_needs_quantized_kv(tiny_loaded, calibrate_tiny):
    w4a16 = calibrate_tiny(wbits=4, abits=16)
    with pytest.raises(ConfigError, match="--kv-cache-dtype int8 stores the plan's K/V codes"):
        quantized_graph(tiny_loaded, w4a16, past=True, kv_cache_dtype="int8")
    with pytest.raises(ConfigError, match="use --kv-cache-dtype float"):
        quantized_graph(tiny_loaded, None, past=True, kv_cache_dtype="uint8")
    plan = calibrate_tiny(**RECIPES["W4A4"])
    no_v = dataclasses.replace(plan, acts=tuple(a for a in plan.acts if a.act is not Act.V))
    with pytest.raises(ConfigError, match=r"layer 0's .*v"):
        quantized_graph(tiny_loaded, no_v, past=True, kv_cache_dtype="int8")


# --- the reference's incremental path -----------------------------------------------------------


@pytest.mark.parametrize("label", ["FP", "W4A4"])
def test_reference_step_equals_the_full_reference(label, tiny_loaded, calibrate_tiny, batch):
    ids, mask = (torch.from_numpy(a) for a in batch)
    plan = None if label == "FP" else calibrate_tiny(**RECIPES[label])
    reference = ReferenceModel(tiny_loaded, plan)
    full = reference(ids, mask).numpy()
    cache = None
    steps = []
    for t in range(ids.shape[1]):
        logits, cache = reference.step(ids[:, t : t + 1], mask[:, : t + 1], cache)
        steps.append(logits)
    got = torch.cat(steps, dim=1).numpy()
    real = batch[1].astype(bool)
    if plan is None:
        np.testing.assert_allclose(
            got[real], full[real], atol=INCREMENTAL_FP32_ATOL, rtol=INCREMENTAL_FP32_RTOL
        )
    else:
        assert min(position_sqnrs(full, got, batch[1])) >= INCREMENTAL_QDQ_MIN_SQNR_DB
    assert [tuple(k.shape) for k, _ in cache] == [(2, 4, ids.shape[1], 16)] * 2


def test_reference_cache_in_graph_order(tiny_loaded, calibrate_tiny, batch):
    """With a fold-only plan (R2/R3 permute the cache channels, nothing is quantized) the
    graph's float cache is the reference's, permuted by cache_in_graph_order."""
    from tests.tolerances import FOLD_ATOL

    ids, mask = batch
    plan = calibrate_tiny(**RECIPES["W4A4"])
    fold_only = dataclasses.replace(plan, acts=(), weights=())
    decoder = DecoderSession(make_session(quantized_graph(tiny_loaded, fold_only, past=True)))
    _, graph_cache = decoder.step(ids, mask, decoder.empty_cache(2))
    _, ref_cache = ReferenceModel(tiny_loaded, fold_only).step(
        torch.from_numpy(ids), torch.from_numpy(mask)
    )
    for layer in range(tiny_loaded.shape.num_layers):
        for slot, role in enumerate(("key", "value")):
            original = ref_cache[layer][slot].numpy()
            mapped = cache_in_graph_order(original, fold_only, layer, role)
            np.testing.assert_allclose(graph_cache[layer][slot], mapped, atol=FOLD_ATOL)
            # the permutation matters: the unmapped cache is another tensor
            assert np.abs(graph_cache[layer][slot] - original).max() > 100 * FOLD_ATOL
