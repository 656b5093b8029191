"""Which kernels ONNX Runtime's CPU provider really runs for an rptq graph.

A quantized weight is only worth its bits at run time if ORT turns its DequantizeLinear into an
integer kernel (MatMulNBits, or an integer GEMM); a weight DequantizeLinear that survives the
session's graph optimisations dequantizes the whole weight to float on every call, which is
slower than the FP model and holds float weights in memory. ORT does these rewrites silently and
only when its selectors' patterns match (docs/graph.md, "ONNX Runtime kernels"), so the only
reliable check is the optimized graph itself, written by the session
(`SessionOptions.optimized_model_filepath`) with the options every rptq session uses.
"""

from __future__ import annotations

import math
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort

from rptq.runtime.ort import session_options

# ORT's optimized model holds hardware-specific nodes (NCHWc, prepacked weights); it is read
# here only to count kernels, never saved for reuse.
_QUIET = 3  # ORT log severity ERROR: the "hardware specific" warning is expected here


@dataclass(frozen=True)
class KernelReport:
    """Op counts of the optimized graph and the DequantizeLinear nodes left on initializers."""

    op_counts: dict[str, int]
    float_weight_dequantize: tuple[str, ...]  # DQ nodes whose codes are an initializer
    # Q/DQ nodes on an activation with a scale per channel: ORT's CPU provider runs these
    # element by element, 30-50x slower than per tensor (rptq.passes.elementwise_quant)
    per_axis_activation_qdq: tuple[str, ...] = ()

    @property
    def integer_matmuls(self) -> int:
        """MatMuls that run on integer weights (MatMulNBits, integer GEMMs)."""
        kernels = ("MatMulNBits", "MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul")
        return sum(self.op_counts.get(op, 0) for op in kernels)


def optimized_model(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    """The graph ORT's CPU provider runs after its optimisations (ORT_ENABLE_ALL)."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    with tempfile.TemporaryDirectory(prefix="rptq-ort-") as tmp:
        path = Path(tmp) / "optimized.onnx"
        options = session_options(optimize=True)
        options.optimized_model_filepath = str(path)
        options.log_severity_level = _QUIET
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        return onnx.load(str(path))


def kernel_report(model: onnx.ModelProto | str | Path) -> KernelReport:
    """Count the optimized graph's ops and name every weight DQ ORT left in float."""
    optimized = optimized_model(model)
    graph = optimized.graph
    initializers = {init.name for init in graph.initializer}
    left = tuple(
        node.name
        for node in graph.node
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers
    )
    sizes = {init.name: math.prod(init.dims) for init in graph.initializer}
    per_axis = tuple(
        node.name
        for node in graph.node
        if node.op_type in ("QuantizeLinear", "DequantizeLinear")
        and node.input[0] not in initializers
        and sizes.get(node.input[1], 1) > 1
    )
    return KernelReport(dict(Counter(node.op_type for node in graph.node)), left, per_axis)
