"""ONNX Runtime CPU cost of activation QuantizeLinear -> DequantizeLinear, per tensor vs per axis.

Issue 12 follow-up: with every weight fused into MatMulNBits, the W4A8/W4A4 prefill is still
2-4x the FP32 one (bench/RESULTS.md, ort_speed). This times the activation Q/DQ alone on a
[1, 512, C] tensor, as rptq writes it per cluster (per axis, axis 2) and as a per-tensor pair,
with and without the Max/Min grid clamp that follows it, in uint8 and int8.

    python bench/ort_qdq_kernels.py
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import ModelProto, TensorProto, helper, numpy_helper

TOKENS = 512
_NUMPY = {TensorProto.UINT8: np.uint8, TensorProto.INT8: np.int8}


def qdq_model(channels: int, per_axis: bool, qtype: int, clamp: bool) -> ModelProto:
    """x -> QuantizeLinear -> DequantizeLinear [-> Max -> Min] -> y on [1, TOKENS, channels]."""
    shape = [1, TOKENS, channels]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    if per_axis:
        scale, zero = np.full(channels, 0.05, np.float32), np.zeros(channels, _NUMPY[qtype])
    else:
        scale, zero = np.array(0.05, np.float32), np.array(0, _NUMPY[qtype])
    inits = [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero, "z")]
    attrs = {"axis": 2} if per_axis else {}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d" if clamp else "y"], **attrs),
    ]
    if clamp:
        inits += [
            numpy_helper.from_array(np.array(-1.0, np.float32), "lo"),
            numpy_helper.from_array(np.array(1.0, np.float32), "hi"),
        ]
        nodes += [
            helper.make_node("Max", ["d", "lo"], ["m"]),
            helper.make_node("Min", ["m", "hi"], ["y"]),
        ]
    graph = helper.make_graph(nodes, "qdq", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def median_ms(model: ModelProto, channels: int, threads: int = 2, runs: int = 20) -> float:
    """Median wall time of one session.run, after 3 warm-up runs."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(0).standard_normal((1, TOKENS, channels)).astype(np.float32)
    for _ in range(3):
        session.run(None, {"x": x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    """Print one line per form: milliseconds and nanoseconds per element."""
    print("| C | scales | type | clamp | ms | ns / element |")
    print("| ---: | --- | --- | --- | ---: | ---: |")
    for channels in (768, 3072):
        for per_axis in (False, True):
            for qtype in (TensorProto.UINT8, TensorProto.INT8):
                for clamp in (False, True):
                    ms = median_ms(qdq_model(channels, per_axis, qtype, clamp), channels)
                    kind = "per axis" if per_axis else "per tensor"
                    name = "uint8" if qtype == TensorProto.UINT8 else "int8"
                    ns = 1e6 * ms / (TOKENS * channels)
                    cells = [str(channels), kind, name, str(clamp), f"{ms:.2f}", f"{ns:.1f}"]
                    print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
