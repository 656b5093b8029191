"""A per-cluster activation quantizer written as plain elementwise ops (the ONNX Runtime
target's default form; docs/graph.md, "ONNX Runtime kernels").

    codes = Min(Max(Round(Div(x, s)), qmin - z), qmax - z);   x̂ = Mul(codes, s)

with s, qmin - z and qmax - z per channel (the cluster values repeated by cluster size). This is
DequantizeLinear(clip(QuantizeLinear(x))) value for value: z is an integer, so
clip(round(x/s) + z, qmin, qmax) - z = clip(round(x/s), qmin - z, qmax - z) exactly, Round
rounds half to even as QuantizeLinear does, both divide by s, and (codes) * s is the one
rounding DequantizeLinear makes. The only bits that can differ are the sign of a zero (Round
keeps -0.0 where DequantizeLinear writes +0.0), which no sum downstream can see. Why: ONNX
Runtime 1.32's CPU provider runs a per-axis Q/DQ on the last axis element by element (about
50 ns per element against about 1 ns for these ops, bench/RESULTS.md `ort_qdq_kernels`).

float16 graphs compute the quantizer in float32 (Cast in, Cast out), as ORT's Q/DQ kernels do
with a float16 input. That is the same arithmetic in ONNX's terms, but not in ONNX Runtime's CPU
provider: it has no float16 Div/Mul/MatMul/Add, runs them in float32 between Casts it inserts,
and drops float32 -> float16 -> float32 Cast pairs, so this form may read a producer's unrounded
float32 value where the QuantizeLinear reads the float16 one. float16 exports therefore keep
the per-axis Q/DQ pair unless asked otherwise (`act_quant_form` "auto"). The codes (`<act>/codes`,
centered on the zero point) stay a tensor of their own: the integer KV cache stores them
(rptq.passes.kv_cache).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from numpy.typing import NDArray

from rptq import names
from rptq.passes.graph_ops import add_cast, rewire_consumers
from rptq.quant.qparams import grid_bounds

_FLOAT32 = np.dtype(np.float32)


def elementwise_form(form: str, dtype: np.dtype) -> bool:
    """Whether per-cluster quantizers take the elementwise form: `form` "elementwise", or
    "auto" in a float32 graph (see the module docstring for float16)."""
    return form == "elementwise" or (form == "auto" and np.dtype(dtype) == _FLOAT32)


def code_bounds(zero: NDArray[np.integer], bits: int) -> tuple[NDArray[np.float32], ...]:
    """(qmin - z, qmax - z) per channel, float32: the grid's codes minus the zero point."""
    qmin, qmax = grid_bounds(bits)
    z = np.asarray(zero, dtype=np.float32)
    return (np.float32(qmin) - z).astype(np.float32), (np.float32(qmax) - z).astype(np.float32)


def insert_elementwise(
    graph: gs.Graph,
    source: gs.Variable,
    scale: NDArray[np.floating],
    zero: NDArray[np.integer],
    bits: int,
    dtype: np.dtype,
) -> None:
    """Rewire `source -> consumers` into `source -> [Cast] -> Div -> Round -> Max -> Min -> Mul
    [-> Cast] -> consumers`; `scale` holds the values of the Q/DQ form's scale, which is in
    the graph's float `dtype`."""
    n = names.act_quant(source.name)
    consumers = list(source.outputs)
    shape = source.shape
    low, high = code_bounds(zero, bits)
    scale32 = gs.Constant(n["scale"], np.asarray(scale).astype(np.float32))
    wide = np.dtype(dtype) != _FLOAT32
    x: gs.Variable = source
    if wide:
        x = add_cast(graph, source, _FLOAT32, n["float32_input"], n["cast_in_node"])
    steps: list[tuple[str, str, str, list[gs.Tensor]]] = [
        ("Div", "div_node", "scaled", [scale32]),
        ("Round", "round_node", "rounded", []),
        ("Max", "max_node", "codes_low", [gs.Constant(n["code_min"], low)]),
        ("Min", "min_node", "codes", [gs.Constant(n["code_max"], high)]),
    ]
    for op, node_key, out_key, extra in steps:
        out = gs.Variable(n[out_key], dtype=_FLOAT32, shape=shape)
        graph.nodes.append(gs.Node(op, n[node_key], inputs=[x, *extra], outputs=[out]))
        x = out
    out_key = "dequantized_float32" if wide else "dequantized"
    product = gs.Variable(n[out_key], dtype=_FLOAT32, shape=shape)
    graph.nodes.append(gs.Node("Mul", n["mul_node"], inputs=[x, scale32], outputs=[product]))
    dequantized = product
    if wide:
        dequantized = add_cast(graph, product, dtype, n["dequantized"], n["cast_out_node"])
    rewire_consumers(consumers, source, dequantized)
