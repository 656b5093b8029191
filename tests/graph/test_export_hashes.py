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
    "GPTQ": ("225b90a70e22b838", "7cdf6f05c66920b7", "f9522309104557ff"),
    "GPTQT": ("861ce2742d0e9690", "ea002d4756921eba", "40015e9a0e3758c9"),
    "GPTQT-LoRC8": ("fc519a6397d88967", "a431835ca5a4f6ef", "3b99711d12c65ad8"),
    "LoRC": ("6875913f3d5b4e44", "783b9f37a8f7bc9a", "5b76604d0931a6de"),
    "W3A3KV": ("5ef6b48a9b3f3e0e", "5d71749a9f959bd1", "d0c191c4d14fd004"),
    "W4A16": ("a0bf949797bd0fb3", "8e0f8dad4cfb9d69", "357d62671a671bc9"),
    "W4A4": ("225b90a70e22b838", "7cdf6f05c66920b7", "f9522309104557ff"),
    "W4A4-fp16": ("b7c559c3349a9320", "ce994d5f96d4be3e", "142d860a14693d3a"),
    "W4A4-groups": ("e1a641a4cc74f9bf", "b780efe42ed3eb83", "d1ef61f4d4a85dac"),
    "W4A4KV": ("397e261c457981c4", "f166c114a9286f19", "4c65c31c5595a20c"),
    "W4A8": ("d42cf5bf2f870686", "bccdde2e233fbd4f", "d0c0dec16ffb19c8"),
    "trt-W3A3KV-fp32": ("2fe5eeef36a4f1c9", "e57e2616bc2e209b", "f88053a396bc8ed1"),
    "trt-W4A16-int4": ("cb33d9258aa5d625", "108fe48eb4e2b390", "ce2fdc21f682bf3d"),
    "trt-W4A4-fp16": ("b55ded67e7186b22", "1f3988a39265349d", "71d52260918f1b1f"),
    "trt-W4A4-fp32": ("e6671aa230961f85", "b75d5bb0fbd017be", "2674f13010883ea8"),
    "trt-W4A4-int4": ("c7894c1ead036274", "cd7fc6b73b71e4b4", "da0abcdd9c7165e5"),
    "trt-W4A4KV-fp16": ("b71b3dbaf9966843", "2b03ccce7d3483e3", "e59b6a282aa2d167"),
    "trt-W4A8-fp16": ("1a7f5a6ab0e430a9", "1f3988a39265349d", "45f0515717d54e94"),
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


def export_digests(loaded, plan, target, dtype, block, directory: Path) -> tuple[str, str, str]:
    """Digests of the streamed export (model, external data) and of the whole graph, inline."""
    streamed = directory / "streamed.onnx"
    options = ExportOptions(dtype, target=target, int4_block_size=block, external_data=True)
    files = export_streamed(loaded, plan, streamed, options).files
    assert sorted(p.name for p in files) == ["streamed.onnx", "streamed.onnx.data"]
    whole = quantized_graph(loaded, plan, dtype=dtype, target=target, int4_block_size=block)
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
