"""Golden signatures of the names rptq gives nodes and initializers (rptq/names.py).

Every node and initializer name in an exported graph is made by `rptq.names` (docs/naming.md):
users and tools (TensorRT layer names, profiles, `--stop-after` dumps) find a layer's pieces by
them, so a change must be deliberate. Each golden file lists one graph of the tiny model, in
graph order: `node <op_type> <name>` per node, then `initializer <name>`, then the graph's
inputs and outputs. The graphs cover the FP export, the default (ONNX Runtime) export with
every activation quantized (elementwise quantizers, and the per-axis Q/DQ form), GPTQT planes
with int8 LoRC branches, and the TensorRT variant with
INT4 blocked weights. Names do not depend on values, so the numpy-built plans of tests/plans.py
(`stand_in_plans`) serve.

Regenerate after an intended change with
`RPTQ_UPDATE_GOLDEN=1 pytest tests/graph/test_names_golden.py` and review the diff of
tests/golden/.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest

from rptq.workflow import quantized_graph
from tests.plans import stand_in_plans

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
# golden file stem -> (plan, target, dtype, int4 block, activation quantizer form)
GRAPHS = {
    "names_fp": ("FP", "ort", "float32", 0, "elementwise"),
    "names_w4a4_ort": ("W4A4", "ort", "float32", 0, "elementwise"),
    "names_w4a4_ort_qdq": ("W4A4", "ort", "float32", 0, "qdq"),
    "names_gptqt_lorc8_ort": ("GPTQT-LoRC8", "ort", "float32", 0, "elementwise"),
    "names_w4a4_trt_int4": ("W4A4", "trt", "float16", 64, "elementwise"),
}


def signature(model: onnx.ModelProto) -> str:
    """The graph's names as text: nodes (op type and name), initializers, inputs, outputs."""
    graph = model.graph
    lines = [f"node {node.op_type} {node.name}" for node in graph.node]
    lines += [f"initializer {tensor.name}" for tensor in graph.initializer]
    lines += [f"input {value.name}" for value in graph.input]
    lines += [f"output {value.name}" for value in graph.output]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def plans(tiny_loaded):
    return stand_in_plans(tiny_loaded)


@pytest.mark.parametrize("stem", sorted(GRAPHS))
def test_graph_names_match_the_golden_file(stem, tiny_loaded, plans):
    label, target, dtype, block, form = GRAPHS[stem]
    model = quantized_graph(tiny_loaded, plans[label], dtype=dtype, target=target,
                            int4_block_size=block, act_quant_form=form)  # fmt: skip
    got = signature(model)
    path = GOLDEN / f"{stem}.txt"
    if os.environ.get("RPTQ_UPDATE_GOLDEN"):
        path.write_text(got)
    assert path.exists(), f"{path} is missing; run with RPTQ_UPDATE_GOLDEN=1 to write it"
    assert got == path.read_text(), f"names in {stem} changed (diff against {path})"
