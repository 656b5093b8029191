"""GPTQT weights as binary planes: y = Σ_i x·DequantizeLinear(b_i, α_i, 0, axis=1) + ΣxΣ·β.

ONNX has no binary-coding op, so each of the n planes b_i ∈ {−1, +1} is an integer initializer
whose DequantizeLinear (scale α_i per output column, zero point 0) yields α_i b_i exactly (the
same values as the reference's planes). Each plane feeds its own MatMul on the linear's input
and the products are summed, plus x's channel sum times the per-column offset β: exact in real
arithmetic (x·Σ_i α_i∘b_i + x·1βᵀ), a reassociation of float sums against the reference's
summed weight. Summing the planes as float weights before one MatMul would be bit-equal, but
ONNX Runtime fuses a weight DequantizeLinear into MatMulNBits only where it feeds the MatMul
directly, so that form dequantizes every plane to float on every call (docs/graph.md).

Plane storage: INT2 (2 bits per plane weight) where the graph's opset is 25 or newer and the
target is ONNX Runtime (its CPU provider runs INT2 DequantizeLinear); INT4 below opset 25 (ORT);
INT8 for TensorRT, whose weight DequantizeLinear takes INT4 only with block-wise scales.
Planes are the bits of the plan's n-bit codes (plan_weights.BinaryCode, binary_index).
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs
from numpy.typing import NDArray

from rptq import names
from rptq.errors import GraphPatternError, PlanError
from rptq.passes.context import PassContext, PassResult
from rptq.passes.graph_ops import (
    GraphIndex,
    RowTermNames,
    add_dequantize,
    add_row_term,
    packed_nbytes,
    rewire_consumers,
    weight_matmul,
)
from rptq.passes.quantize_weights import check_relative_error
from rptq.plan import QuantPlan, Target, WeightQuant
from rptq.plan_weights import binary_index
from rptq.quant.bcq import binary_weight, planes_of

INT2_MIN_OPSET = 25  # INT2/UINT2 tensor types (ONNX 1.20)
PLANE_BITS = {np.dtype(ml_dtypes.int2): 2, np.dtype(ml_dtypes.int4): 4, np.dtype(np.int8): 8}
PLANE_AXIS = 1  # planes are MatMul's B [in, out]: α_i per output column


def graph_order(
    plan: QuantPlan, layer: int, linear: str, in_ch: int, out_ch: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Rows (input channels) and columns (output channels) of the folded MatMul's B."""
    rows, cols = plan.linear_perms(layer, linear)
    return (
        np.arange(in_ch, dtype=np.int64) if rows is None else rows.astype(np.int64),
        np.arange(out_ch, dtype=np.int64) if cols is None else cols.astype(np.int64),
    )


def plane_nbytes(dtype: np.dtype, size: int) -> int:
    """Bytes of an ONNX initializer of `size` plane elements (INT2/INT4 are packed)."""
    return -(-size * PLANE_BITS[np.dtype(dtype)] // 8)


def plane_dtype(ctx: PassContext) -> np.dtype:
    """Integer type of the ±1 planes for this target and opset (see the module docstring)."""
    if ctx.target is Target.TRT:
        return np.dtype(np.int8)
    if ctx.opset >= INT2_MIN_OPSET:
        return np.dtype(ml_dtypes.int2)
    return np.dtype(ml_dtypes.int4)


@dataclass(frozen=True)
class _Prepared:
    matmul: gs.Node
    weight: gs.Constant
    planes: NDArray[np.int8]  # [n, in, out], ±1
    alpha: NDArray[np.floating]  # [out, n] in graph column order, graph dtype
    beta: NDArray[np.floating]  # [out]


def _prepare(index: GraphIndex, plan: QuantPlan, quant: WeightQuant) -> _Prepared:
    """Check one GPTQT weight and build its planes in the graph layout (no graph edits)."""
    assert quant.binary is not None
    layer, linear = quant.layer, quant.linear
    node_names = names.binary_weight(quant.fqn, quant.bits)
    if node_names["plane0_node"] in index.nodes or node_names["plane0"] in index.tensors:
        raise GraphPatternError(f"node {node_names['plane0_node']} already exists: weights done")
    matmul, weight = weight_matmul(index, quant)
    out_ch, in_ch = quant.codes.shape
    rows, cols = graph_order(plan, layer, linear, in_ch, out_ch)
    planes, alpha, beta = graph_planes(quant, rows, cols)
    dtype = np.dtype(weight.dtype)
    alpha, beta = alpha.astype(dtype), beta.astype(dtype)
    if not (np.all(np.isfinite(alpha)) and np.all(np.isfinite(beta))):
        raise PlanError(f"plan weight {quant.fqn}: alpha/beta are not representable in {dtype}")
    check_relative_error(weight, binary_weight(planes, alpha, beta, axis=PLANE_AXIS))
    return _Prepared(matmul, weight, planes, alpha, beta)


def _add_offset(
    graph: gs.Graph, fqn: str, x: gs.Tensor, total: gs.Tensor, beta: NDArray[np.floating]
) -> gs.Variable:
    """`total + ReduceSum(x, last axis) · β`: x·1βᵀ, the offset's share of x·W, per token."""
    n = names.binary_weight(fqn, 1)
    term = RowTermNames(
        reduce_node=n["input_sum_node"],
        axes=n["input_sum_axes"],
        reduced=n["input_sum"],
        mul_node=n["offset_mul_node"],
        row=n["offset"],
        product=n["offset_product"],
        combine_node=n["offset_node"],
        output=n["offset_output"],
    )
    return add_row_term(graph, x, total, beta, term, "Add")


def binary_weights(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Replace each GPTQT weight by its binary planes (see the module docstring).

    Preconditions, checked for all weights before the first edit: the MatMul and its float
    weight exist with the plan's shape, carry no planes yet, and the planes stand for the
    graph's (folded) weight (quantize_weights.MAX_RELATIVE_ERROR).
    """
    plan = ctx.plan
    binary = [quant for quant in plan.weights if quant.binary is not None]
    if not binary:
        return PassResult(binary_weights.__name__)
    index = GraphIndex(graph)
    items = [(quant, _prepare(index, plan, quant)) for quant in binary]
    container = plane_dtype(ctx)
    before = after = 0
    for quant, item in items:
        x, product = item.matmul.inputs[0], item.matmul.outputs[0]
        consumers = list(product.outputs)
        stored = [
            (np.ascontiguousarray(item.planes[i].astype(container)), item.alpha[:, i])
            for i in range(item.planes.shape[0])
        ]
        total = add_plane_products(graph, quant.fqn, item.matmul, stored, 0)
        output = _add_offset(graph, quant.fqn, x, total, item.beta)
        rewire_consumers(consumers, product, output)
        for plane, alpha in stored:
            after += plane_nbytes(container, plane.size) + plane_nbytes(container, alpha.size)
            after += alpha.nbytes
        after += item.beta.nbytes
        before += packed_nbytes(item.weight.dtype, int(np.prod(item.weight.shape)))
    return PassResult(
        binary_weights.__name__,
        counts={
            "binary_weights": len(items),
            "planes": sum(item.planes.shape[0] for _, item in items),
            "plane_bits": PLANE_BITS[container],
            "weight_bytes_before": before,
            "weight_bytes_after": after,
        },
        touched=tuple(item.weight.name for _, item in items),
    )


# --- the TensorRT variant: one GEMM per plane ---------------------------------------------------
# TensorRT fuses a weight DequantizeLinear into a GEMM only when it feeds the MatMul directly, so
# a sum of dequantized planes would run as float weights. The variant multiplies every plane on
# its own, x·DQ(b_i; α_i) (INT8 per output channel, or INT4 with block scales repeating α_i),
# and sums the products; β needs x's channel sum (trt_linears). Exact in real arithmetic:
# Σ_i x·(α_i∘b_i) = x·Σ_i α_i∘b_i.


def graph_planes(
    quant: WeightQuant, rows: NDArray[np.int64], cols: NDArray[np.int64]
) -> tuple[NDArray[np.int8], NDArray[np.float32], NDArray[np.float32]]:
    """Planes [n, in, out] (±1), α [out, n] and β [out] of a GPTQT weight in graph order."""
    assert quant.binary is not None
    bcq_index = binary_index(quant.codes, quant.bits).T[np.ix_(rows, cols)]
    planes = planes_of(bcq_index, quant.bits)
    return planes, quant.binary.alpha[cols], quant.binary.beta[cols]


def plane_tensors(
    planes: NDArray[np.int8],
    alpha: NDArray[np.floating],
    dtype: np.dtype,
    block: int,
    where: str,
) -> list[tuple[NDArray[np.generic], NDArray[np.floating]]]:
    """(codes [in, out], scale) of each plane as TensorRT takes it: symmetric, scale > 0.

    Scales are α_i per output column (`block` 0: INT8, axis 1) or repeated over blocks of the
    input dim (INT4, [in / block, out]). A column whose α_i is 0 (a plane the BCQ fit left
    unused, or an fp16 underflow) gets codes 0 and scale 1: the same zero product, and no
    zero scale, which TensorRT refuses.
    """
    out: list[tuple[NDArray[np.generic], NDArray[np.floating]]] = []
    for i in range(planes.shape[0]):
        scale = np.asarray(alpha[:, i], np.float64).astype(dtype)
        if not np.all(np.isfinite(scale)):
            raise PlanError(f"plan weight {where}: plane {i} scales are not representable")
        unused = ~(scale > 0)
        codes = np.where(unused[None, :], 0, planes[i]).astype(np.int8)
        scale = np.where(unused, np.ones((), dtype), scale).astype(dtype)
        if block:
            codes = codes.astype(ml_dtypes.int4)
            scale = np.repeat(scale[None, :], codes.shape[0] // block, axis=0)
        out.append((np.ascontiguousarray(codes), np.ascontiguousarray(scale)))
    return out


def add_plane_products(
    graph: gs.Graph,
    fqn: str,
    matmul: gs.Node,
    stored: list[tuple[NDArray[np.generic], NDArray[np.floating]]],
    block: int,
) -> gs.Tensor:
    """Plane 0 becomes `matmul`'s weight; planes 1.. get MatMuls on the same input, summed.

    Returns the sum's tensor (`matmul`'s output for one plane); the caller wires it onward.
    """
    n = names.binary_weight(fqn, len(stored))
    x = matmul.inputs[0]
    total: gs.Tensor = matmul.outputs[0]
    attrs = {"axis": 0, "block_size": block} if block else {"axis": PLANE_AXIS}
    for i, (codes, scale) in enumerate(stored):
        dtype = scale.dtype
        dequantized = add_dequantize(
            graph,
            n[f"plane{i}_node"],
            n[f"plane{i}_dequantized"],
            (n[f"plane{i}"], codes),
            (n[f"plane{i}_scale"], scale),
            (n[f"plane{i}_zero_point"], np.zeros(scale.shape, codes.dtype)),
            attrs,
        )
        if i == 0:
            matmul.inputs[1] = dequantized
            continue
        product = gs.Variable(n[f"plane{i}_product"], dtype=dtype)
        summed = gs.Variable(n[f"sum{i}"], dtype=dtype)
        graph.nodes += [
            gs.Node(
                "MatMul", name=n[f"plane{i}_matmul"], inputs=[x, dequantized], outputs=[product]
            ),
            gs.Node("Add", name=n[f"sum{i}_node"], inputs=[total, product], outputs=[summed]),
        ]
        total = summed
    return total
