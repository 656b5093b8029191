"""Every export of a fixed tiny model and recipe set hashes to the value written here.

A refactor that must not change the exported bytes (moving passes, renaming helpers, options
objects) is checked by this test: it pins the SHA-256 of the ONNX file and of its external
data for each recipe, the ONNX Runtime and TensorRT variants, fp32/fp16/INT4-block weights,
the streamed export and the whole graph built in memory.

Independent of the machine by construction:
- The plans are built with numpy only (tests/plans.py, `stand_in_plans`: seeded random
  permutations, clusters and activation scales; RTN codes of the real weights), not
  calibrated: calibration runs BLAS matmuls whose last-bit rounding depends on the CPU and the
  thread count. GPTQ, GPTQT, LoRC, weight groups and TensorRT-calibrated weights are stand-ins
  built elementwise from RTN codes (same entry layout and export path as the real methods').
- The tiny model comes from a seeded `make_tiny_opt` (torch's CPU generator, no BLAS).
- The graph's name embeds the model's name (`rptq-<name>-prefill`, which depends on where and
  how the model was loaded), so only that one field is normalised before hashing: the file is
  parsed, checked to re-serialise to exactly its own bytes (so nothing else is normalised
  away), its `graph.name` set to a constant, and the result hashed. External data is hashed
  as written.

If a change is meant to alter the exported bytes, rerun with RPTQ_PRINT_HASHES=1 to print the
new table, and say why in the commit.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx
import pytest

from rptq.exporter.options import ExportOptions
from rptq.exporter.save import save_onnx
from rptq.exporter.stream import export_streamed
from rptq.workflow import quantized_graph
from tests.plans import stand_in_plans

GRAPH_NAME = "rptq-model-prefill"


# (plan, target, dtype, int4 block)
CASES = {
    "FP": ("FP", "ort", "float32", 0),
    "FP-fp16": ("FP", "ort", "float16", 0),
    "W4A8": ("W4A8", "ort", "float32", 0),
    "W4A4": ("W4A4", "ort", "float32", 0),
    "W4A4-fp16": ("W4A4", "ort", "float16", 0),
    "W4A4KV": ("W4A4KV", "ort", "float32", 0),
    "W3A3KV": ("W3A3KV", "ort", "float32", 0),
    "W4A16": ("W4A16", "ort", "float32", 0),
    "GPTQ": ("GPTQ", "ort", "float32", 0),
    "GPTQT": ("GPTQT", "ort", "float32", 0),
    "LoRC": ("LoRC", "ort", "float32", 0),
    "GPTQT-LoRC8": ("GPTQT-LoRC8", "ort", "float32", 0),
    "W4A4-groups": ("W4A4-groups", "ort", "float32", 0),
    "trt-W4A4-fp32": ("W4A4", "trt", "float32", 0),
    "trt-W4A4-fp16": ("W4A4", "trt", "float16", 0),
    "trt-W4A4-int4": ("W4A4", "trt", "float16", 64),
    "trt-W4A8-fp16": ("W4A8", "trt", "float16", 0),
    "trt-W4A4KV-fp16": ("W4A4KV", "trt", "float16", 0),
    "trt-W3A3KV-fp32": ("W3A3KV", "trt", "float32", 0),
    "trt-W4A16-int4": ("W4A16", "trt", "float32", 64),
    "trt-calibrated-fp16": ("W4A4-trt-calibrated", "trt", "float16", 0),
    "trt-calibrated-int4": ("W4A4-trt-calibrated", "trt", "float16", 64),
}

# case -> (streamed export with external data: model, data; whole graph written inline)
EXPECTED: dict[str, tuple[str, str, str]] = {
    "FP": ("4fe9e212ef133478", "620a5194ec7fe0a3", "9e425b023e408643"),
    "FP-fp16": ("b65470a11430a78f", "1a6cc5b0a0fadf76", "115745c0fab7b1e7"),
    "GPTQ": ("f18276da6ca6ae34", "1e59680b8b10a1eb", "3ed434488b86281b"),
    "GPTQT": ("a4e851bcda179b7c", "05995b583908b2ba", "61dd9100ac32d451"),
    "GPTQT-LoRC8": ("8302b4a52dae8107", "2da2b49a6e071737", "d468239313a0dbce"),
    "LoRC": ("1af25fea3e23b32d", "e66a20aa14238a78", "8657f3302fcb6a4d"),
    "W3A3KV": ("31286cc837e223f8", "5d71749a9f959bd1", "c450aafb3396148f"),
    "W4A16": ("a0bf949797bd0fb3", "8e0f8dad4cfb9d69", "357d62671a671bc9"),
    "W4A4": ("f18276da6ca6ae34", "1e59680b8b10a1eb", "3ed434488b86281b"),
    "W4A4-fp16": ("51bac3d26879d407", "ce994d5f96d4be3e", "13499d595250c0c6"),
    "W4A4-groups": ("040a8fb74eddb31d", "6bd040ae0fe10183", "bc4cdd09c13ee243"),
    "W4A4KV": ("cd140f3c533a514b", "f166c114a9286f19", "ccc0704f89d04f2f"),
    "W4A8": ("34c294e3ff967f6e", "e4b634013c421422", "333f4b02daff74c4"),
    "trt-W3A3KV-fp32": ("2fe5eeef36a4f1c9", "e57e2616bc2e209b", "f88053a396bc8ed1"),
    "trt-W4A16-int4": ("cb33d9258aa5d625", "108fe48eb4e2b390", "ce2fdc21f682bf3d"),
    "trt-W4A4-fp16": ("3171054357a7d483", "0a2690ec83496b81", "e5763af55c39ec47"),
    "trt-W4A4-fp32": ("d64e7f3ac628d05e", "720f466b19b9fd7a", "c79fad5bae04d41f"),
    "trt-W4A4-int4": ("49a846b62fec9b3a", "0b638ec02a9ae0e3", "b448a44585c06569"),
    "trt-W4A4KV-fp16": ("b71b3dbaf9966843", "2b03ccce7d3483e3", "e59b6a282aa2d167"),
    "trt-W4A8-fp16": ("9d894817dbdf0d6b", "0a2690ec83496b81", "b6058f7ced0f6826"),
    "trt-calibrated-fp16": ("4bee6a35b425433e", "a83adf4ce843d5b1", "b7f45e70a0fd6820"),
    "trt-calibrated-int4": ("5953c62422edfa24", "2bf1cd0ce56817b0", "67e777dd0c0fb255"),
}


def model_digest(raw: bytes) -> str:
    """SHA-256 (16 hex digits) of a serialised ModelProto with its graph name normalised."""
    model = onnx.ModelProto.FromString(raw)
    assert model.SerializeToString() == raw, "the writer no longer writes canonical protobuf"
    model.graph.name = GRAPH_NAME
    return hashlib.sha256(model.SerializeToString()).hexdigest()[:16]


def data_digest(path: Path) -> str:
    """SHA-256 (16 hex digits) of an external data file as written."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@pytest.fixture(scope="module")
def hash_plans(tiny_loaded):
    return stand_in_plans(tiny_loaded)


def export_digests(
    loaded,
    plan,
    target,
    dtype,
    block,
    directory: Path,
    past: bool = False,
    cache: str = "float",
    form: str = "auto",
) -> tuple[str, str, str]:
    """Digests of the streamed export (model, external data) and of the whole graph, inline."""
    streamed = directory / "streamed.onnx"
    options = ExportOptions(
        dtype,
        target=target,
        int4_block_size=block,
        external_data=True,
        past=past,
        kv_cache_dtype=cache,
        act_quant_form=form,
    )
    files = export_streamed(loaded, plan, streamed, options).files
    assert sorted(p.name for p in files) == ["streamed.onnx", "streamed.onnx.data"]
    whole = quantized_graph(
        loaded,
        plan,
        dtype=dtype,
        target=target,
        int4_block_size=block,
        past=past,
        kv_cache_dtype=cache,
        act_quant_form=form,
    )
    inline = save_onnx(whole, directory / "whole.onnx", external_data=False)
    assert len(inline) == 1
    return (
        model_digest(streamed.read_bytes()),
        data_digest(directory / "streamed.onnx.data"),
        model_digest(inline[0].read_bytes()),
    )


def test_every_case_is_pinned():
    if os.environ.get("RPTQ_PRINT_HASHES"):
        pytest.skip("printing the hash table instead (RPTQ_PRINT_HASHES)")
    assert sorted(EXPECTED) == sorted(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_bytes_are_pinned(case, tiny_loaded, hash_plans, tmp_path):
    plan_label, target, dtype, block = CASES[case]
    got = export_digests(tiny_loaded, hash_plans[plan_label], target, dtype, block, tmp_path)
    if os.environ.get("RPTQ_PRINT_HASHES"):
        print(f'\n    "{case}": {got!r},')
        return
    assert got == EXPECTED[case], f"{case}: export bytes changed: {got}"


# The decoder-with-past graph (docs/graph.md, "Decoder with past"): (plan, target, dtype, cache)
PAST_CASES = {
    "past-FP": ("FP", "ort", "float32", "float"),
    "past-W4A4KV": ("W4A4KV", "ort", "float32", "float"),
    "past-W4A4KV-int8": ("W4A4KV", "ort", "float32", "int8"),
    "past-trt-W4A4-fp16": ("W4A4", "trt", "float16", "float"),
}
# the external data equals the prefill export's of the same plan: the same weights, in order
PAST_EXPECTED: dict[str, tuple[str, str, str]] = {
    "past-FP": ("0f01d0724e5302ee", "620a5194ec7fe0a3", "2bfe956d9dacb8b5"),
    "past-W4A4KV": ("dc344f9c4f498a46", "f166c114a9286f19", "e4c13f626ce1267e"),
    "past-W4A4KV-int8": ("e3f08a0f8c1f08f2", "f166c114a9286f19", "04e52d10efa244b2"),
    "past-trt-W4A4-fp16": ("f0ecdd981b53deb3", "0a2690ec83496b81", "a96ed82f948e8a09"),
}


def test_every_past_case_is_pinned():
    if os.environ.get("RPTQ_PRINT_HASHES"):
        pytest.skip("printing the hash table instead (RPTQ_PRINT_HASHES)")
    assert sorted(PAST_EXPECTED) == sorted(PAST_CASES)


@pytest.mark.parametrize("case", sorted(PAST_CASES))
def test_past_export_bytes_are_pinned(case, tiny_loaded, hash_plans, tmp_path):
    plan_label, target, dtype, cache = PAST_CASES[case]
    got = export_digests(
        tiny_loaded, hash_plans[plan_label], target, dtype, 0, tmp_path, past=True, cache=cache
    )
    if os.environ.get("RPTQ_PRINT_HASHES"):
        print(f'\n    "{case}": {got!r},')
        return
    assert got == PAST_EXPECTED[case], f"{case}: export bytes changed: {got}"


# The per-axis Q/DQ form of the ONNX Runtime target (`act_quant_form="qdq"`, the default before
# the elementwise quantizer): (plan, dtype, past, cache). Pinned to the bytes these exports had
# when Q/DQ was the only form, so the portable form is exactly what it was.
QDQ_CASES = {
    "qdq-W4A8": ("W4A8", "float32", False, "float"),
    "qdq-W4A4-fp16": ("W4A4", "float16", False, "float"),
    "qdq-W3A3KV": ("W3A3KV", "float32", False, "float"),
    "qdq-GPTQT-LoRC8": ("GPTQT-LoRC8", "float32", False, "float"),
    "qdq-past-W4A4KV-int8": ("W4A4KV", "float32", True, "int8"),
}
QDQ_EXPECTED: dict[str, tuple[str, str, str]] = {
    "qdq-W4A8": ("8fa6d3e515a3a14a", "63f59003867190e8", "d3f185053a3c200b"),
    "qdq-W4A4-fp16": ("51bac3d26879d407", "ce994d5f96d4be3e", "13499d595250c0c6"),
    "qdq-W3A3KV": ("f76b68a5bf43ccfc", "5d71749a9f959bd1", "1d8c7eba465e7337"),
    "qdq-GPTQT-LoRC8": ("f4cf400205d0f9c9", "6b0273fc4de2b53f", "ef727eca237c40f0"),
    "qdq-past-W4A4KV-int8": ("5c4bed6191687283", "f166c114a9286f19", "a24c8e098e9c7390"),
}


@pytest.mark.parametrize("case", sorted(QDQ_CASES))
def test_qdq_form_bytes_are_pinned(case, tiny_loaded, hash_plans, tmp_path):
    plan_label, dtype, past, cache = QDQ_CASES[case]
    got = export_digests(
        tiny_loaded, hash_plans[plan_label], "ort", dtype, 0, tmp_path, past, cache, form="qdq"
    )
    assert got == QDQ_EXPECTED[case], f"{case}: export bytes changed: {got}"
