"""Insert per-cluster activation Q/DQ on every activation the plan quantizes.

After fold_reorder each reordered activation is produced in cluster order, so a cluster is a
contiguous run of channels and the per-cluster (scale, zero) become per-axis vectors: the
cluster values repeated by cluster size (docs/algorithms.md §2.11). ONNX Q/DQ saturate to the
integer container, not to RPTQ's bits-wide grid, so grids narrower than the container get an
exact clamp: the container's codes are clamped after the DequantizeLinear to
[(qmin - z) s, (qmax - z) s], which are themselves dequantized codes, so the result equals
DQ(clip(round(x/s) + z, qmin, qmax)) bit for bit. Clip only takes scalars, hence Max/Min with
vectors.

The clamp sits after the DequantizeLinear, not before the QuantizeLinear, for ONNX Runtime's
sake: its DQ -> MatMul -> MatMulNBits rewrite (DQMatMulNodeGroupSelector) takes a MatMul only
when the weight's DequantizeLinear is its *only* DequantizeLinear parent, so an int8
activation DQ feeding the MatMul directly leaves the weight dequantized to float on every call
(docs/graph.md, "ONNX Runtime kernels"). Every activation read by a quantized linear therefore
reaches it through the clamp, also on 8-bit grids where the clamp changes no value.

That per-axis pair is the portable form (`act_quant_form="qdq"`). ONNX Runtime's CPU provider
runs a per-axis QuantizeLinear/DequantizeLinear on the channel axis element by element, about
50x slower than per tensor (bench/RESULTS.md, ort_qdq_kernels), so the ONNX Runtime target's
default for float32 graphs (`"auto"`, or `"elementwise"`) writes each per-cluster quantizer as
the same arithmetic in plain ops (rptq.passes.elementwise_quant). Per-tensor activations
(attn_probs) keep their Q/DQ pair in both forms: ORT runs it at full speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from numpy.typing import NDArray

from rptq import names
from rptq.errors import GraphPatternError, PlanError
from rptq.passes.context import PassContext, PassResult, check_site_folded, folded_sites
from rptq.passes.elementwise_quant import elementwise_form, insert_elementwise
from rptq.passes.graph_ops import GraphIndex, graph_float_dtype, rewire_consumers
from rptq.plan import ActQuant, QuantPlan, ReorderSite
from rptq.points import LINEAR_INPUT_ACT, SITE_OF
from rptq.quant.clusters import expand_to_positions
from rptq.quant.qparams import container_bits, grid_bounds

ACT_CHANNEL_AXIS = 2  # activations are [B, T, C]
MIN_ACT_CONTAINER_BITS = 8  # ORT runs activation QuantizeLinear on int8/int16 containers
_CONTAINERS: dict[int, type[np.signedinteger]] = {8: np.int8, 16: np.int16}
_FLOAT_TYPES = (np.dtype(np.float32), np.dtype(np.float16))
# activations a quantized linear reads: their DQ must not feed the MatMul directly (see above)
_LINEAR_INPUTS = frozenset(LINEAR_INPUT_ACT.values())


@dataclass(frozen=True)
class ActQdq:
    """Everything one activation's Q/DQ needs, computed before the graph is touched."""

    tensor: gs.Variable
    names: dict[str, str]
    scale: NDArray[np.floating]
    zero: NDArray[np.signedinteger]
    clip: tuple[NDArray[np.floating], NDArray[np.floating]] | None  # (low, high) or no clamp
    axis: int | None  # None: per tensor
    bits: int  # the grid's width (the container may be wider)


def _site_of(plan: QuantPlan, quant: ActQuant) -> ReorderSite | None:
    if quant.act not in SITE_OF:
        return None
    point = SITE_OF[quant.act]
    try:
        return plan.site(quant.layer, point)
    except KeyError:
        raise PlanError(
            f"plan quantizes {quant.key} per cluster but has no site layers.{quant.layer}.{point}; "
            "recalibrate"
        ) from None


def _prepare(
    index: GraphIndex, plan: QuantPlan, quant: ActQuant, dtype: np.dtype, folded: dict[str, str]
) -> ActQdq:
    """Check one activation and compute its per-axis vectors (all checks, no graph edits)."""
    name = names.act_tensor(quant.layer, quant.act)
    qdq = names.qdq(name)
    tensor = index.tensors.get(name)
    pattern = f"activation {name} produced by a node and read by others (docs/graph.md)"
    if not isinstance(tensor, gs.Variable) or not tensor.inputs:
        raise GraphPatternError(f"tensor {name} not found; expected {pattern}")
    if qdq["quantize"] in index.nodes or qdq["scale"] in index.tensors:
        raise GraphPatternError(f"node {qdq['quantize']} already exists: Q/DQ already inserted")
    if not tensor.outputs:
        raise GraphPatternError(f"tensor {name} has no consumers; expected {pattern}")
    site = _site_of(plan, quant)
    scale: NDArray[np.generic]
    zero: NDArray[np.generic]
    if site is None:
        if quant.scale.shape != (1,) or quant.zero.shape != (1,):
            raise PlanError(f"plan {quant.key}: per-tensor activation needs one scale and zero")
        scale = quant.scale.reshape(())
        zero = quant.zero.reshape(())
        axis = None
    else:
        if quant.scale.shape != site.sizes.shape or quant.zero.shape != site.sizes.shape:
            raise PlanError(
                f"plan {quant.key}: {quant.scale.shape[0]} scales for {site.sizes.shape[0]} "
                f"clusters of {site.key}; recalibrate"
            )
        check_site_folded(site, name, folded, insert_act_qdq.__name__)
        width = int(site.sizes.sum())
        shape = tensor.shape
        known = shape is not None and len(shape) == 3 and isinstance(shape[2], int)
        if known and shape[2] != width:
            raise GraphPatternError(
                f"tensor {name} has {shape[2]} channels but site {site.key} has {width}"
            )
        scale = expand_to_positions(quant.scale, site.sizes)
        zero = expand_to_positions(quant.zero, site.sizes)
        axis = ACT_CHANNEL_AXIS
    try:
        container = max(MIN_ACT_CONTAINER_BITS, container_bits(np.asarray(zero), quant.bits))
    except ValueError:
        raise PlanError(f"plan {quant.key}: zero point outside int16; recalibrate") from None
    scale_f = np.asarray(scale, dtype=np.float32).astype(dtype)
    if not np.all(np.isfinite(scale_f)) or np.any(scale_f <= 0):
        raise PlanError(f"plan {quant.key}: a scale is not representable in {dtype} (0 or inf)")
    clip = None
    separate = bool(plan.weights) and quant.act in _LINEAR_INPUTS
    if quant.bits < container or separate:
        qmin, qmax = grid_bounds(quant.bits)
        s32 = scale_f.astype(np.float32)
        z32 = np.asarray(zero, dtype=np.float32)
        clip = (((qmin - z32) * s32).astype(dtype), ((qmax - z32) * s32).astype(dtype))
    return ActQdq(
        tensor=tensor,
        names=qdq,
        scale=scale_f,
        zero=np.asarray(zero).astype(_CONTAINERS[container]),
        clip=clip,
        axis=axis,
        bits=quant.bits,
    )


def _insert(graph: gs.Graph, item: ActQdq, dtype: np.dtype) -> int:
    """Rewire `tensor -> consumers` into `tensor -> Q -> DQ [-> Max -> Min] -> consumers`."""
    n = item.names
    source = item.tensor
    consumers = list(source.outputs)
    shape = source.shape
    scale = gs.Constant(n["scale"], item.scale)
    zero = gs.Constant(n["zero_point"], item.zero)
    attrs = {} if item.axis is None else {"axis": item.axis}
    quantized = gs.Variable(n["quantized"], dtype=item.zero.dtype, shape=shape)
    dequantized = gs.Variable(n["dequantized"], dtype=dtype, shape=shape)
    dq_output = dequantized if item.clip is None else gs.Variable(n["unclamped"], dtype, shape)
    graph.nodes.append(
        gs.Node(
            "QuantizeLinear",
            name=n["quantize"],
            attrs=dict(attrs),
            inputs=[source, scale, zero],
            outputs=[quantized],
        )
    )
    graph.nodes.append(
        gs.Node(
            "DequantizeLinear",
            name=n["dequantize"],
            attrs=dict(attrs),
            inputs=[quantized, scale, zero],
            outputs=[dq_output],
        )
    )
    added = 0
    if item.clip is not None:
        low, high = item.clip
        clipped_low = gs.Variable(n["clipped_low"], dtype=dtype, shape=shape)
        graph.nodes.append(
            gs.Node(
                "Max",
                name=n["clip_min_node"],
                inputs=[dq_output, gs.Constant(n["clip_min"], low)],
                outputs=[clipped_low],
            )
        )
        graph.nodes.append(
            gs.Node(
                "Min",
                name=n["clip_max_node"],
                inputs=[clipped_low, gs.Constant(n["clip_max"], high)],
                outputs=[dequantized],
            )
        )
        added += 2
    rewire_consumers(consumers, source, dequantized)
    return added


def insert_act_qdq(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Quantize each plan activation per cluster (per-axis Q/DQ, or the elementwise form when
    `ctx.act_quant_form` says so) or per tensor (Q/DQ).

    Preconditions, checked for every activation before the first edit: the tensor exists with a
    producer and consumers, has no Q/DQ yet, its site was folded (non-identity permutation) and
    the plan's parameters fit its clusters and the graph's float dtype.
    """
    plan = ctx.plan
    if not plan.acts:
        return PassResult(insert_act_qdq.__name__)
    dtype = graph_float_dtype(graph)
    index = GraphIndex(graph)
    folded = folded_sites(graph)
    items = [_prepare(index, plan, quant, dtype, folded) for quant in plan.acts]
    # per-tensor activations keep their Q/DQ pair in both forms (module docstring)
    per_axis_elementwise = elementwise_form(ctx.act_quant_form, dtype)
    as_elementwise = [per_axis_elementwise and item.axis is not None for item in items]
    elementwise = [item for item, flag in zip(items, as_elementwise, strict=True) if flag]
    pairs = [item for item, flag in zip(items, as_elementwise, strict=True) if not flag]
    clamps = sum(_insert(graph, item, dtype) for item in pairs)
    for item in elementwise:
        insert_elementwise(graph, item.tensor, item.scale, item.zero, item.bits, dtype)
    wide = sum(1 for item in pairs if item.zero.dtype == np.int16)
    return PassResult(
        insert_act_qdq.__name__,
        counts={
            "quantize_linear": len(pairs),
            "dequantize_linear": len(pairs),
            "clamp_nodes": clamps,
            "int16_containers": wide,
            "elementwise_quantizers": len(elementwise),
        },
        touched=tuple(item.tensor.name for item in items),
    )
