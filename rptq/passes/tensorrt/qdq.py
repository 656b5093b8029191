"""Per-tensor, symmetric INT8 Q/DQ on every folded activation (TensorRT variant).

After trt_fold each quantized activation is carried as U = X/s + z, so its Q/DQ is
QuantizeLinear(U, scale 1, zero point 0, INT8) -> DequantizeLinear, whose output is
C = clamp(round(U), -128, 127): RPTQ's integer code (both round half to even). A grid narrower
than INT8 (A4, A3) gets a scalar `Clip(qmin, qmax)` before the Q, and clamp(round(U)) equals
round(clamp(U)) for integer bounds, so the codes are exactly RPTQ's. The per-tensor softmax
output keeps its own scale (1/255) with zero point 0: trt_fold moved its offset into a `Sub`.
TensorRT reads scalar scales as per-tensor activation scales, the only kind it has.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from numpy.typing import NDArray

from rptq import names
from rptq.errors import GraphPatternError
from rptq.passes.context import PassContext, PassResult
from rptq.passes.graph_ops import GraphIndex, as_dtype, graph_float_dtype, rewire_consumers
from rptq.passes.tensorrt.acts import act_digest, quantized_input_name, trt_folded
from rptq.plan import ActQuant
from rptq.points import SITE_OF
from rptq.quant.qparams import grid_bounds

CONTAINER_BITS = 8  # INT8: every RPTQ grid (<= 8 bits) fits, and TensorRT quantizes to it


@dataclass(frozen=True)
class _Prepared:
    tensor: gs.Variable
    act_name: str
    scale: NDArray[np.floating]  # scalar
    clip: tuple[NDArray[np.floating], NDArray[np.floating]] | None


def _prepare(
    index: GraphIndex, quant: ActQuant, recorded: dict[str, str], dtype: np.dtype
) -> _Prepared:
    """Check one activation (folded by trt_fold with these parameters, no Q/DQ yet)."""
    act_name = names.act_tensor(quant.layer, quant.act)
    if quant.key not in recorded:
        raise GraphPatternError(
            f"tensor {act_name}: {quant.key} is not folded into this graph; run trt_fold before "
            "trt_insert_qdq"
        )
    if recorded[quant.key] != act_digest(quant):
        raise GraphPatternError(
            f"tensor {act_name}: the graph was folded with other scales or zero points for "
            f"{quant.key} than this plan's; fold the graph with this plan"
        )
    source = quantized_input_name(quant.layer, quant.act)
    tensor = index.tensors.get(source)
    if not isinstance(tensor, gs.Variable) or not tensor.inputs or not tensor.outputs:
        raise GraphPatternError(f"tensor {source} not found with a producer and consumers")
    if names.qdq(act_name)["quantize"] in index.nodes:
        raise GraphPatternError(f"node {names.qdq(act_name)['quantize']} already exists")
    # cluster activations sit on the integer grid (scale 1); per-tensor ones keep their scale
    value = 1.0 if quant.act in SITE_OF else float(quant.scale.reshape(()))
    scale = as_dtype(np.array(value), dtype, act_name)
    clip = None
    if quant.bits < CONTAINER_BITS:
        qmin, qmax = grid_bounds(quant.bits)
        clip = (
            as_dtype(np.array(qmin * value), dtype, act_name),
            as_dtype(np.array(qmax * value), dtype, act_name),
        )
    return _Prepared(tensor, act_name, scale, clip)


def _insert(graph: gs.Graph, item: _Prepared) -> int:
    """`U -> [Clip] -> QuantizeLinear -> DequantizeLinear -> U's consumers`; returns clips."""
    q, t = names.qdq(item.act_name), names.trt_act(item.act_name)
    source = item.tensor
    consumers = list(source.outputs)
    x: gs.Tensor = source
    if item.clip is not None:
        clipped = gs.Variable(t["clipped"], dtype=source.dtype, shape=source.shape)
        low, high = item.clip
        graph.nodes.append(
            gs.Node(
                "Clip",
                name=t["clip_node"],
                inputs=[x, gs.Constant(t["clip_min"], low), gs.Constant(t["clip_max"], high)],
                outputs=[clipped],
            )
        )
        x = clipped
    scale = gs.Constant(q["scale"], item.scale)
    zero = gs.Constant(q["zero_point"], np.array(0, np.int8))
    quantized = gs.Variable(q["quantized"], dtype=np.int8, shape=source.shape)
    dequantized = gs.Variable(q["dequantized"], dtype=source.dtype, shape=source.shape)
    graph.nodes += [
        gs.Node("QuantizeLinear", name=q["quantize"], inputs=[x, scale, zero], outputs=[quantized]),
        gs.Node(
            "DequantizeLinear",
            name=q["dequantize"],
            inputs=[quantized, scale, zero],
            outputs=[dequantized],
        ),
    ]
    rewire_consumers(consumers, source, dequantized)
    return int(item.clip is not None)


def trt_insert_qdq(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Insert [Clip ->] INT8 Q/DQ (scalar scale, zero point 0) on every folded activation.

    Preconditions, checked for every activation before the first edit: trt_fold folded it with
    this plan's scales and zero points, its U tensor exists with consumers, and it has no Q/DQ.
    """
    plan = ctx.plan
    if not plan.acts:
        return PassResult(trt_insert_qdq.__name__)
    dtype = graph_float_dtype(graph)
    index = GraphIndex(graph)
    recorded = trt_folded(graph)
    items = [_prepare(index, quant, recorded, dtype) for quant in plan.acts]
    clips = sum(_insert(graph, item) for item in items)
    return PassResult(
        trt_insert_qdq.__name__,
        counts={
            "quantize_linear": len(items),
            "dequantize_linear": len(items),
            "clip_nodes": clips,
        },
        touched=tuple(item.tensor.name for item in items),
    )
