"""ONNX Runtime CPU cost of activation QuantizeLinear -> DequantizeLinear, per tensor vs per axis.

Issue 12 follow-up: with every weight fused into MatMulNBits, the W4A8/W4A4 prefill is still
2-4x the FP32 one (bench/RESULTS.md, ort_speed). This times the activation Q/DQ alone on a
[1, 512, C] tensor, as rptq wrote it per cluster (per axis, axis 2) and as a per-tensor pair,
with and without the Max/Min grid clamp that follows it, in uint8 and int8, and the elementwise
form rptq now writes for the ONNX Runtime target (rptq.passes.elementwise_quant: Div, Round,
Max, Min, Mul with per-channel vectors, built by rptq's own pass function), whose output it
checks equal to the per-axis pair's.

    python bench/ort_qdq_kernels.py
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import ModelProto, TensorProto, helper, numpy_helper

from rptq.passes.elementwise_quant import insert_elementwise

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


def cluster_params(channels: int, bits: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel scale and int8 zero point of 16 contiguous clusters (RPTQ's layout)."""
    rng = np.random.default_rng(1)
    sizes = np.full(16, channels // 16)
    scale = np.repeat(rng.uniform(0.01, 0.2, 16), sizes).astype(np.float32)
    half = 2 ** (bits - 1)
    zero = np.repeat(rng.integers(-half, half, 16), sizes).astype(np.int8)
    return scale, zero


def cluster_qdq_model(channels: int, bits: int = 4) -> ModelProto:
    """rptq's per-axis form: Q/DQ per channel, then the clamp to the bits-wide grid."""
    scale, zero = cluster_params(channels, bits)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    low = ((qmin - zero.astype(np.float32)) * scale).astype(np.float32)
    high = ((qmax - zero.astype(np.float32)) * scale).astype(np.float32)
    shape = [1, TOKENS, channels]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((scale, "s"), (zero, "z"), (low, "lo"), (high, "hi"))]  # fmt: skip
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=2),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], axis=2),
        helper.make_node("Max", ["d", "lo"], ["m"]),
        helper.make_node("Min", ["m", "hi"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "qdq", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def elementwise_model(channels: int, bits: int = 4) -> ModelProto:
    """The same quantizer as rptq's ONNX Runtime target writes it (its own pass function)."""
    scale, zero = cluster_params(channels, bits)
    x = gs.Variable("x", dtype=np.float32, shape=[1, TOKENS, channels])
    y = gs.Variable("y", dtype=np.float32, shape=[1, TOKENS, channels])
    graph = gs.Graph(nodes=[gs.Node("Identity", "source", inputs=[x], outputs=[y])])
    graph.inputs, graph.outputs = [x], [y]
    source = gs.Variable("act", dtype=np.float32, shape=x.shape)
    graph.nodes[0].outputs = [source]
    graph.nodes.append(gs.Node("Identity", "sink", inputs=[source], outputs=[y]))
    insert_elementwise(graph, source, scale, zero, bits, np.dtype(np.float32))
    graph.cleanup().toposort()
    return gs.export_onnx(graph)


def session(model: ModelProto, threads: int = 2) -> ort.InferenceSession:
    """A CPU session with `threads` intra-op threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def test_input(channels: int) -> np.ndarray:
    """Activations with per-channel spread, so every cluster clips some values."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, TOKENS, channels)) * rng.uniform(0.1, 3.0, channels)
    return x.astype(np.float32)


def median_ms(model: ModelProto, channels: int, threads: int = 2, runs: int = 20) -> float:
    """Median wall time of one session.run, after 3 warm-up runs."""
    run = session(model, threads)
    x = test_input(channels)
    for _ in range(3):
        run.run(None, {"x": x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run.run(None, {"x": x})
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
        per_axis, elementwise = cluster_qdq_model(channels), elementwise_model(channels)
        x = test_input(channels)
        same = np.array_equal(session(per_axis).run(None, {"x": x})[0],
                              session(elementwise).run(None, {"x": x})[0])  # fmt: skip
        if not same:
            raise SystemExit(f"C={channels}: the elementwise form differs from the per-axis Q/DQ")
        for label, model in (("per axis, 16 clusters", per_axis),
                             ("elementwise (rptq), 16 clusters", elementwise)):  # fmt: skip
            ms = median_ms(model, channels)
            ns = 1e6 * ms / (TOKENS * channels)
            cells = [str(channels), label, "int8 4-bit grid", "True", f"{ms:.2f}", f"{ns:.1f}"]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
