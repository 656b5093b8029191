"""The TensorRT variant's linears: folded rows, columns and bias, symmetric weight DequantizeLinear.

A linear reading a quantized activation gets X̂ = s∘(C − z) folded into its rows and bias
(W' = diag(s)·W, b' = b − z·W'); a linear writing one gets 1/s (times head_dim^-½ for q) in
its columns and +z in its bias (rptq.quant.trt_weights.fold_bias). Weights are then stored as
TensorRT takes them: integer codes and one scale per output channel, zero point 0, feeding the
MatMul directly (DequantizeLinear(axis=1) into MatMul is the pattern TensorRT fuses into an
INT8 GEMM). A plan calibrated with `--target tensorrt` already holds the codes of the folded
weight (GPTQ/RTN symmetric codes, GPTQT planes, LoRC factors of the folded error) and is used
verbatim: GPTQT as one GEMM per plane plus ReduceSum(x)·β, LoRC as a parallel branch on the
same input, both inside the bias fold. An ONNX Runtime RTN plan is re-quantized by
rptq.quant.trt_weights.trt_weight, which the PyTorch reference calls too. With an INT4 block
size, codes of <= 4 bits are stored as INT4 with the per-channel scale repeated over blocks of
the input dim, and a plan weight kept with its zero points gets `y -= ReduceSum(x) ⊗ (s_w∘z_w)`
after the MatMul (names.weight_zero_correction).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs
from numpy.typing import NDArray

from rptq import names
from rptq.errors import ConfigError, GraphPatternError, PlanError
from rptq.passes.binary_weights import PLANE_AXIS, add_plane_products, graph_planes, plane_tensors
from rptq.passes.graph_ops import (
    GraphIndex,
    Linear,
    RowTermNames,
    add_dequantize,
    add_row_term,
    as_dtype,
    find_linear,
    float_dtype,
    packed_nbytes,
)
from rptq.passes.lowrank import add_branch
from rptq.passes.quantize_weights import check_relative_error
from rptq.passes.tensorrt.acts import OFFSET_AFTER_PRODUCER, ActVectors
from rptq.plan import QuantPlan, Target, WeightQuant
from rptq.points import LINEAR_INPUT_ACT, LINEAR_OUTPUT_ACT, Act
from rptq.quant.bcq import binary_weight
from rptq.quant.trt_weights import (
    DEFAULT_WEIGHT_GROUPS,
    INT4_MAX,
    INT4_MIN,
    SymmetricWeight,
    fold_bias,
    fold_float_rows,
    int4_block_scales,
    trt_weight,
)

WEIGHT_AXIS = 1  # B is [in, out]: one scale per output channel = per column
BLOCK_AXIS = 0  # INT4 blocks run along the input dim (rows of B)

Edit = Callable[[], None]


@dataclass(frozen=True)
class LayerFold:
    """What the linears of one layer need: the graph, the plan and the layer's activations."""

    graph: gs.Graph
    index: GraphIndex
    plan: QuantPlan
    layer: int
    acts: dict[Act, ActVectors]
    head_factor: float | None  # head_dim^-½ of the removed q Mul (None: q not folded)
    int4_block: int  # 0: INT8 weights
    weight_groups: int = DEFAULT_WEIGHT_GROUPS  # scale groups of a re-quantized folded weight


@dataclass(frozen=True)
class _Quantized:
    """A linear's folded weight, ready to write: codes, DQ scale and the new bias."""

    symmetric: SymmetricWeight
    plan_codes: NDArray[np.int64]  # the plan's codes [in, out] in graph order
    plan_zero: NDArray[np.int64]  # and their zero points [out]
    dq_scale: NDArray[np.floating]  # [out], output-side fold included, graph dtype
    factor: NDArray[np.float64] | None  # output-side column factor
    bias: NDArray[np.floating]


def _output_fold(
    linear: str, out: ActVectors | None, head_factor: float | None
) -> tuple[NDArray[np.float64] | None, NDArray[np.int64] | None]:
    """(column factor c, bias offset) that make the linear write U of its output activation."""
    if out is None:
        return None, None
    factor = 1.0 / out.scale.astype(np.float64)
    if LINEAR_OUTPUT_ACT[linear] is Act.Q:
        assert head_factor is not None, "q is folded only together with its head_dim^-½ Mul"
        factor = factor * head_factor
    offset = None if out.quant.act in OFFSET_AFTER_PRODUCER else out.zero
    return factor, offset


def _check_width(vectors: ActVectors | None, width: int, where: str) -> None:
    if vectors is not None and vectors.scale.shape != (width,):
        raise GraphPatternError(
            f"{where}: {vectors.quant.key} has {vectors.scale.shape[0]} channels, the linear "
            f"has {width}"
        )


def plan_linear(fold: LayerFold, linear: str) -> tuple[Edit, int] | None:
    """Check one linear and return (the edit that folds and quantizes it, weight bytes after).

    None when nothing folds into it and its weight stays float.
    """
    module = names.module(fold.layer, linear)
    in_vec = fold.acts.get(LINEAR_INPUT_ACT[linear])
    out_act = LINEAR_OUTPUT_ACT.get(linear)
    out_vec = fold.acts.get(out_act) if out_act is not None else None
    quant = fold.plan.weight(module)
    if in_vec is None and out_vec is None and quant is None:
        return None
    found = find_linear(fold.index, module)
    dtype = float_dtype(found.weight, found.matmul.name)
    in_ch, out_ch = found.weight.shape
    _check_width(in_vec, in_ch, found.matmul.name)
    _check_width(out_vec, out_ch, found.matmul.name)
    factor, offset = _output_fold(linear, out_vec, fold.head_factor)
    in_scale = None if in_vec is None else in_vec.scale
    in_zero = None if in_vec is None else in_vec.zero
    w32 = np.asarray(found.weight.values, np.float32)
    if quant is None:
        folded = fold_float_rows(w32, in_scale)
        new_w = as_dtype(folded if factor is None else folded * factor[None, :], dtype, module)
        new_b = as_dtype(
            fold_bias(found.bias.values, folded, in_zero, factor, offset), dtype, module
        )

        def edit_float() -> None:
            found.weight.values = new_w
            found.bias.values = new_b

        return edit_float, new_w.nbytes
    rows, cols = fold.plan.linear_perms(fold.layer, linear)
    order = _order(rows, in_ch), _order(cols, out_ch)
    # the plan's weight must stand for the graph's: catches a wrong permutation
    check_relative_error(found.weight, quant.values().T[np.ix_(*order)])
    if quant.binary is not None:
        return _binary_edit(fold, found, quant, order, in_vec, factor, offset, dtype)
    sym, plan_codes, plan_zero = _weight(fold, quant, found.weight, in_scale, order)
    dq_scale: NDArray[np.floating] = sym.scale.astype(np.float64) * (
        1.0 if factor is None else factor
    )  # [out], or [groups, out] with scale groups
    dq_scale = as_dtype(dq_scale, dtype, module)
    if np.any(dq_scale <= 0):
        raise PlanError(f"plan weight {module}: a folded scale underflows in {dtype}")
    matrix = sym.folded_values().T.astype(np.float64) + _lorc_matrix(quant, order)
    new_b = as_dtype(fold_bias(found.bias.values, matrix, in_zero, factor, offset), dtype, module)
    prepared = _Quantized(sym, plan_codes, plan_zero, dq_scale, factor, new_b)
    if sym.group_of is not None:
        edit, size = _grouped_edit(fold, found, prepared)
    elif fold.int4_block:
        edit, size = _int4_edit(fold.graph, found, prepared, fold.int4_block)
    else:
        codes = np.ascontiguousarray(sym.codes.T)
        zero = np.zeros(out_ch, np.int8)

        def edit() -> None:
            attrs = {"axis": WEIGHT_AXIS}
            _dequantize(fold.graph, found, codes, prepared.dq_scale, zero, attrs)
            found.bias.values = prepared.bias

        size = codes.nbytes + dq_scale.nbytes + zero.nbytes
    return _with_branch(fold.graph, found, quant, order, factor, dtype, edit, size)


def _order(perm: NDArray[np.int64] | None, size: int) -> NDArray[np.int64]:
    return np.arange(size, dtype=np.int64) if perm is None else perm.astype(np.int64)


def _lorc_matrix(quant: WeightQuant, order: tuple[NDArray, NDArray]) -> NDArray[np.float64]:
    """V̂Ûᵀ [in, out] in graph order (0 without LoRC): the branch's share of the bias fold."""
    if quant.lorc is None:
        return np.zeros((), np.float64)
    v = quant.lorc.v.dequantized()[order[0]].astype(np.float64)
    u = quant.lorc.u.dequantized()[order[1]].astype(np.float64)
    return v @ u.T


def _with_branch(
    graph: gs.Graph,
    linear: Linear,
    quant: WeightQuant,
    order: tuple[NDArray[np.int64], NDArray[np.int64]],
    factor: NDArray[np.float64] | None,
    dtype: np.dtype,
    edit: Edit,
    size: int,
) -> tuple[Edit, int]:
    """The weight edit, then (LoRC) `+ (x V̂) Ûᵀ∘c` on the same input, before the bias Add.

    x is read when the edit runs, so the branch takes what the main MatMul takes: U here, the
    INT8 Q/DQ output once trt_insert_qdq rewires U's consumers.
    """
    if quant.lorc is None:
        return edit, size
    nbytes = quant.lorc.u.values.nbytes + quant.lorc.v.values.nbytes

    def edit_with_branch() -> None:
        edit()
        x, main = linear.matmul.inputs[0], linear.add.inputs[0]
        total, _ = add_branch(graph, quant, x, main, *order, dtype, factor)
        linear.add.inputs[0] = total

    return edit_with_branch, size + nbytes


def _binary_edit(
    fold: LayerFold,
    linear: Linear,
    quant: WeightQuant,
    order: tuple[NDArray[np.int64], NDArray[np.int64]],
    in_vec: ActVectors | None,
    factor: NDArray[np.float64] | None,
    offset: NDArray[np.int64] | None,
    dtype: np.dtype,
) -> tuple[Edit, int]:
    """GPTQT planes as one INT8 (or INT4-blocked) GEMM per plane, summed, plus ReduceSum(x)·β.

    TensorRT fuses a weight DequantizeLinear only when it feeds a MatMul directly, so the
    planes are multiplied separately (binary_weights.add_plane_products) instead of summed as
    weights; β∘c (a per-output constant of the row) is x's channel sum times β.
    """
    _check_folded(fold, quant, order[0], in_vec)
    planes, alpha, beta = graph_planes(quant, *order)
    matrix = binary_weight(planes, alpha, beta, axis=PLANE_AXIS).astype(np.float64)
    matrix = matrix + _lorc_matrix(quant, order)
    in_zero = None if in_vec is None else in_vec.zero
    new_b = as_dtype(
        fold_bias(linear.bias.values, matrix, in_zero, factor, offset), dtype, linear.module
    )
    column = np.ones(alpha.shape[0]) if factor is None else factor
    scaled_alpha = alpha.astype(np.float64) * column[:, None]
    row = as_dtype(-beta.astype(np.float64) * column, dtype, linear.module)
    block = fold.int4_block
    if block and planes.shape[1] % block:
        raise ConfigError(
            f"{linear.module} has {planes.shape[1]} input channels, not a multiple of "
            f"--int4-block {block}; use the other block size or INT8 weights"
        )
    stored = plane_tensors(planes, scaled_alpha, dtype, block, linear.module)

    def edit() -> None:
        total = add_plane_products(fold.graph, quant.fqn, linear.matmul, stored, block)
        linear.add.inputs[0] = total
        linear.bias.values = new_b
        if np.any(row != 0):
            _subtract_zero_points(fold.graph, linear, row)

    size = sum(
        packed_nbytes(c.dtype, c.size) + packed_nbytes(c.dtype, s.size) + s.nbytes
        for c, s in stored
    )
    return _with_branch(fold.graph, linear, quant, order, factor, dtype, edit, size + row.nbytes)


def _check_folded(
    fold: LayerFold, quant: WeightQuant, rows: NDArray[np.int64], in_vec: ActVectors | None
) -> None:
    """A GPTQT/LoRC/GPTQ weight is kept as calibrated: its folded input scale (graph order)
    must be the graph's activation scale, and exist exactly where one folds in."""
    folded = None if quant.folded_scale is None else quant.folded_scale[rows]
    expected = None if in_vec is None else in_vec.scale
    if (folded is None) != (expected is None) or (
        folded is not None and expected is not None and not np.array_equal(folded, expected)
    ):
        raise PlanError(
            f"plan weight {quant.fqn} was calibrated with other activation scales than this "
            "plan's; recalibrate with --target tensorrt"
        )


def _weight(
    fold: LayerFold,
    quant: WeightQuant,
    weight: gs.Constant,
    in_scale: NDArray[np.float32] | None,
    order: tuple[NDArray[np.int64], NDArray[np.int64]],
) -> tuple[SymmetricWeight, NDArray[np.int64], NDArray[np.int64]]:
    """The variant's weight in graph order, plus the plan's codes/zeros in graph order.

    Only an RTN plan calibrated for ONNX Runtime may be re-quantized here
    (QuantPlan.check_target refuses the others); every other plan's codes are used as
    calibrated.
    """
    codes = np.ascontiguousarray(quant.codes.T[np.ix_(*order)])
    scale, zero = quant.scale[order[1]], quant.zero[order[1]]
    folded = None if quant.folded_scale is None else quant.folded_scale[order[0]]
    w32 = np.asarray(weight.values, np.float32)
    may_requantize = fold.plan.recipe.target is Target.ORT and quant.lorc is None
    try:
        sym = trt_weight(
            w32.T,
            codes.T,
            scale,
            zero,
            quant.bits,
            in_scale,
            folded,
            may_requantize,
            fold.weight_groups,
        )
    except ValueError as exc:
        raise PlanError(
            f"plan weight {quant.fqn}: {exc}; recalibrate with --target tensorrt"
        ) from None
    return sym, codes.astype(np.int64), zero.astype(np.int64)


def _grouped_edit(fold: LayerFold, linear: Linear, prepared: _Quantized) -> tuple[Edit, int]:
    """One GEMM for all activation-scale groups (rptq.quant.trt_weights.scale_groups).

    Group g's codes (the folded weight's codes on its input channels, 0 elsewhere) with its own
    scale per output channel sit side by side in one weight [in, groups x out]: a single
    DequantizeLinear (per column, or INT4 blocks) into a single MatMul, the pattern TensorRT
    (and ONNX Runtime) fuse into one integer GEMM. Its output is split into the groups'
    products, which are summed: codes·scale[group] of every input channel.
    """
    sym = prepared.symmetric
    assert sym.group_of is not None
    groups, out_ch = prepared.dq_scale.shape
    block = fold.int4_block
    in_ch = sym.codes.shape[1]
    if block and in_ch % block:
        raise ConfigError(
            f"{linear.module} has {in_ch} input channels, not a multiple of --int4-block "
            f"{block}; use the other block size or INT8 weights"
        )
    if block and (sym.codes.min(initial=0) < INT4_MIN or sym.codes.max(initial=0) > INT4_MAX):
        raise ConfigError(f"{linear.module}: INT4 weights need --wbits 4 or less")
    member = sym.group_of[:, None] == np.arange(groups)[None, :]  # [in, groups]
    codes = np.concatenate(
        [np.where(member[:, g : g + 1], sym.codes.T, 0) for g in range(groups)], axis=1
    )  # [in, groups x out], group-major columns like the flattened scale
    scale = np.ascontiguousarray(prepared.dq_scale.reshape(-1))
    if block:
        codes = codes.astype(ml_dtypes.int4)
        scale = np.ascontiguousarray(int4_block_scales(scale, in_ch, block))
        zero: NDArray[np.generic] = np.zeros(scale.shape, ml_dtypes.int4)
        attrs = {"axis": BLOCK_AXIS, "block_size": block}
    else:
        codes = codes.astype(np.int8)
        zero = np.zeros(scale.shape, np.int8)
        attrs = {"axis": WEIGHT_AXIS}
    codes = np.ascontiguousarray(codes)
    n = names.weight_groups(linear.module, groups)
    sizes = np.full(groups, out_ch, np.int64)

    def edit() -> None:
        _dequantize(fold.graph, linear, codes, scale, zero, attrs)
        product = linear.matmul.outputs[0]
        product.shape = None  # [..., groups x out] now
        dtype = product.dtype
        parts = [gs.Variable(n[f"part{g}"], dtype=dtype) for g in range(groups)]
        summed = gs.Variable(n["output"], dtype=dtype)
        fold.graph.nodes += [
            gs.Node(
                "Split",
                name=n["split_node"],
                attrs={"axis": -1},
                inputs=[product, gs.Constant(n["split_sizes"], sizes)],
                outputs=parts,
            ),
            gs.Node("Sum", name=n["sum_node"], inputs=list(parts), outputs=[summed]),
        ]
        linear.add.inputs[0] = summed
        linear.bias.values = prepared.bias

    size = packed_nbytes(codes.dtype, codes.size) + scale.nbytes
    return edit, size + packed_nbytes(zero.dtype, zero.size) + sizes.nbytes


def _dequantize(
    graph: gs.Graph,
    linear: Linear,
    codes: NDArray[np.generic],
    scale: NDArray[np.floating],
    zero: NDArray[np.generic],
    attrs: dict[str, int],
) -> None:
    """codes -> DequantizeLinear(scale, zero 0) -> the MatMul's B (names.quantized_weight)."""
    n = names.quantized_weight(linear.module)
    linear.matmul.inputs[1] = add_dequantize(
        graph,
        n["node"],
        n["output"],
        (n["codes"], codes),
        (n["scale"], scale),
        (n["zero_point"], zero),
        attrs,
    )


def _int4_edit(
    graph: gs.Graph, linear: Linear, prepared: _Quantized, block: int
) -> tuple[Edit, int]:
    """INT4 blocked weight: same values as the INT8 form (block scales repeat the channel's)."""
    sym = prepared.symmetric
    in_ch = sym.codes.shape[1]
    if in_ch % block:
        raise ConfigError(
            f"{linear.module} has {in_ch} input channels, not a multiple of --int4-block "
            f"{block}; use the other block size or INT8 weights"
        )
    # requantized codes have zero point 0; kept plan codes keep theirs, subtracted per token
    codes = sym.codes.T if sym.requantized else prepared.plan_codes
    if codes.min(initial=0) < INT4_MIN or codes.max(initial=0) > INT4_MAX:
        raise ConfigError(f"{linear.module}: INT4 weights need --wbits 4 or less")
    codes = np.ascontiguousarray(codes.astype(ml_dtypes.int4))
    scale = np.ascontiguousarray(int4_block_scales(prepared.dq_scale, in_ch, block))
    zero = np.zeros(scale.shape, ml_dtypes.int4)
    row = None
    if not sym.requantized and np.any(prepared.plan_zero != 0):
        correction = sym.scale.astype(np.float64) * prepared.plan_zero
        if prepared.factor is not None:
            correction = correction * prepared.factor
        row = as_dtype(correction, prepared.dq_scale.dtype, linear.module)

    def edit() -> None:
        attrs = {"axis": BLOCK_AXIS, "block_size": block}
        _dequantize(graph, linear, codes, scale, zero, attrs)
        linear.bias.values = prepared.bias
        if row is not None:
            _subtract_zero_points(graph, linear, row)

    size = packed_nbytes(codes.dtype, codes.size) + scale.nbytes
    return edit, size + packed_nbytes(zero.dtype, zero.size)


def _subtract_zero_points(graph: gs.Graph, linear: Linear, row: NDArray[np.floating]) -> None:
    """y = x·DQ(C) − ReduceSum(x) ⊗ (s_w∘z_w): the zero points of a symmetric-stored weight."""
    n = names.weight_zero_correction(linear.module)
    term = RowTermNames(
        reduce_node=n["reduce_node"],
        axes=n["axes"],
        reduced=n["reduced"],
        mul_node=n["mul_node"],
        row=n["row"],
        product=n["product"],
        combine_node=n["sub_node"],
        output=n["output"],
    )
    x, y = linear.matmul.inputs[0], linear.add.inputs[0]
    linear.add.inputs[0] = add_row_term(graph, x, y, row, term, "Sub")
