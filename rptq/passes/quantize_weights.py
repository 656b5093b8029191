"""Store each quantized linear weight as integer codes plus a per-output-channel DequantizeLinear.

The plan keeps codes [out, in] in the Hugging Face order; the folded graph's MatMul wants
B = W^T [in, out] with rows permuted by the input reorder and columns by the output reorder,
which rptq.quant.fold.permute_weight_codes produces (the same maths fold_reorder used on the
float weight). DequantizeLinear(axis=1) then yields exactly the dequantized folded weight.

INT4 codes are packed two per byte by the DequantizeLinear builder of rptq.passes.graph_ops
(see there why onnx-graphsurgeon needs that).
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
    PACKED_DTYPES,
    GraphIndex,
    add_dequantize,
    packed_nbytes,
    weight_matmul,
)
from rptq.plan import QuantPlan, WeightQuant
from rptq.quant.fold import permute_weight_codes
from rptq.quant.groups import grouped_weight_layout
from rptq.quant.qparams import container_bits, dequantize

WEIGHT_AXIS = 1  # B is [in, out]: one (scale, zero) per output channel = per column
# Round-to-nearest on RPTQ's grid is off by at most 1.5 steps: the top of the range maps to
# 2^(b-1) + (rounding of the zero point, up to 0.5) and is clipped to 2^(b-1) - 1. A wrong
# permutation moves weights by a fraction of the row range, i.e. several steps.
MAX_ERROR_STEPS = 1.51
# GPTQ moves weights by several steps on purpose (error feedback), so its codes get a
# statistical check instead: the relative Frobenius error of the whole weight. Measured on the
# tiny model: 0.6 at most for 2-bit GPTQ codes of the right weight, about 1.4 (√2) for a
# permuted one.
MAX_RELATIVE_ERROR = 1.0
_CONTAINERS: dict[int, type] = {4: ml_dtypes.int4, 8: np.int8, 16: np.int16}


@dataclass(frozen=True)
class _Prepared:
    matmul: gs.Node
    weight: gs.Constant
    names: dict[str, str]
    codes: NDArray[np.generic]
    scale: NDArray[np.floating]
    zero: NDArray[np.generic]
    block_size: int = 0  # grouped weights: blocked DequantizeLinear along the input axis

    def nbytes(self) -> int:
        return sum(packed_nbytes(a.dtype, a.size) for a in (self.codes, self.scale, self.zero))


def _prepare(index: GraphIndex, plan: QuantPlan, quant: WeightQuant) -> _Prepared:
    """Check one weight and build its codes in the graph layout (no graph edits)."""
    layer, linear = quant.layer, quant.linear
    qw = names.quantized_weight(quant.fqn)
    if qw["node"] in index.nodes or qw["codes"] in index.tensors:
        raise GraphPatternError(f"node {qw['node']} already exists: weights already quantized")
    matmul, weight = weight_matmul(index, quant)
    out_ch, in_ch = quant.codes.shape
    dtype = np.dtype(weight.dtype)
    in_perm, out_perm = plan.linear_perms(layer, linear)
    block = 0
    if quant.group_index is None:
        codes, scale, zero = permute_weight_codes(
            quant.codes, quant.scale, quant.zero, in_perm, out_perm
        )
    else:
        try:
            codes, scale, zero, block = grouped_weight_layout(
                quant.codes, quant.scale, quant.zero, quant.group_index, in_perm, out_perm
            )
        except ValueError as exc:
            raise PlanError(f"plan weight {quant.fqn}: {exc}; recalibrate") from None
    scale = np.asarray(scale, dtype=np.float32).astype(dtype)
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        raise PlanError(f"plan weight {quant.fqn}: a scale is not representable in {dtype}")
    per_element = plan.recipe.weight_method == "rtn"
    if block:
        expanded = (np.repeat(scale, block, axis=0), np.repeat(zero, block, axis=0))
        _check_close(weight, codes, *expanded, per_element=per_element)
    else:
        _check_close(weight, codes, scale, zero, per_element=per_element)
    try:
        container = _CONTAINERS[container_bits(zero, quant.bits)]
    except ValueError:
        raise PlanError(f"plan weight {quant.fqn}: zero point outside int16; recalibrate") from None
    return _Prepared(
        matmul,
        weight,
        qw,
        codes.astype(container),
        scale,
        np.asarray(zero).astype(container),
        block,
    )


def check_relative_error(weight: gs.Constant, recovered: NDArray[np.floating]) -> None:
    """Non-RTN codes must still stand for the graph's weight (MAX_RELATIVE_ERROR)."""
    current = np.asarray(weight.values, dtype=np.float64)
    error = float(np.linalg.norm(recovered - current) / max(float(np.linalg.norm(current)), 1e-30))
    if error > MAX_RELATIVE_ERROR:
        raise GraphPatternError(
            f"initializer {weight.name}: the plan's weight is {error:.2f} (relative Frobenius "
            f"error) from the graph weight (max {MAX_RELATIVE_ERROR}); the graph was folded with "
            "other permutations than the plan's (run fold_reorder with this plan)"
        )


def _check_close(
    weight: gs.Constant,
    codes: NDArray[np.integer],
    scale: NDArray[np.floating],
    zero: NDArray,
    per_element: bool = True,
) -> None:
    """The codes must stand for the graph's (folded) float weight: catches a wrong permutation."""
    current = np.asarray(weight.values, dtype=np.float32)
    s32 = scale.astype(np.float32)
    if s32.ndim == 1:  # one (scale, zero) per output column; 2-D: per element (groups)
        s32, zero = s32[None, :], np.asarray(zero)[None, :]
    recovered = dequantize(codes, s32, np.asarray(zero))
    if not per_element:
        check_relative_error(weight, recovered)
        return
    # float slack: the weight itself was rounded to the export dtype
    slack = np.abs(current) * float(np.finfo(np.dtype(weight.dtype)).eps)
    steps = (np.abs(recovered - current) - slack) / s32
    worst = float(steps.max(initial=0.0))
    if worst > MAX_ERROR_STEPS:
        column = int(np.unravel_index(int(np.argmax(steps)), steps.shape)[1])
        raise GraphPatternError(
            f"initializer {weight.name}: the plan's codes are {worst:.2f} quantization steps "
            f"from the graph weight (output channel {column}; max {MAX_ERROR_STEPS}); the graph "
            "was folded with other permutations than the plan's (run fold_reorder with this plan)"
        )


def quantize_weights(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Replace each planned float weight by DequantizeLinear(codes, scale, zero, axis=1).

    Preconditions, checked for all weights before the first edit: the MatMul and its weight
    exist with the plan's shape, are not quantized yet, and the codes reproduce the weight
    within MAX_ERROR_STEPS steps in the graph's current (folded) channel order.
    """
    plan = ctx.plan
    if not plan.weights:
        return PassResult(quantize_weights.__name__)
    index = GraphIndex(graph)
    # GPTQT weights are binary planes, written by passes/binary_weights.py
    items = [_prepare(index, plan, quant) for quant in plan.weights if quant.binary is None]
    before = sum(packed_nbytes(i.weight.dtype, int(np.prod(i.weight.shape))) for i in items)
    after = sum(item.nbytes() for item in items)
    int4 = 0
    for item in items:
        n = item.names
        item.matmul.inputs[1] = add_dequantize(
            graph,
            n["node"],
            n["output"],
            (n["codes"], item.codes),
            (n["scale"], item.scale),
            (n["zero_point"], item.zero),
            {"axis": 0, "block_size": item.block_size}
            if item.block_size
            else {"axis": WEIGHT_AXIS},
        )
        int4 += int(item.codes.dtype in PACKED_DTYPES)
    return PassResult(
        quantize_weights.__name__,
        counts={
            "dequantize_linear": len(items),
            "int4_weights": int4,
            "weight_bytes_before": before,
            "weight_bytes_after": after,
        },
        touched=tuple(item.weight.name for item in items),
    )
