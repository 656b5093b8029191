"""The TensorRT variant's folds and symmetric weights: pure numpy, the single source of truth.

TensorRT takes per-tensor, symmetric activation Q/DQ only (docs/tensorrt-rules.md,
"Implementation"), so each RPTQ activation X with per-channel scale s and zero point z is
carried as U = X/s + z on the integer grid, and X̂ = s∘(C − z) is folded into the consumer:
a linear whose input rows are multiplied by s. Those rows then no longer carry the plan's
per-row (output-channel) codes, so the folded weight diag(s)·W is quantized again,
symmetrically and per output channel (zero point 0, as TensorRT demands). Where nothing folds
into a linear's input, the plan's own asymmetric codes are kept exactly: C − z_w is an INT8
code with zero point 0.

The export passes (rptq/passes/trt_*.py) and the PyTorch reference
(rptq/runtime/trt_reference.py) both call `trt_weight`, so their codes agree bit for bit: every
step is elementwise or a per-row maximum, hence independent of the channel order the graph
uses. Weights here are [out, in] (Hugging Face layout, rows = output channels) unless a name
says `in_out` (MatMul's B operand). Nothing is modified in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from rptq.quant.qparams import grid_bounds

INT8_MIN, INT8_MAX = -128, 127  # the container of every TensorRT variant code
INT4_MIN, INT4_MAX = -8, 7
# Scale groups of a re-quantized folded weight (`scale_groups`): 3, the fewest measured within
# 1 dB of the default target at W4A8 and W4A4 on both outlier models (2 lost 1.35 dB at W4A8 on
# the hidden-1024 one; bench/RESULTS.md, trt-outliers); 1 is the single per-row scale of the
# first variant.
DEFAULT_WEIGHT_GROUPS = 3


def symmetric_max(bits: int) -> int:
    """Largest code of the symmetric `bits` grid [-qmax, qmax] (zero point 0)."""
    grid_bounds(bits)
    return 2 ** (bits - 1) - 1


@dataclass(frozen=True)
class SymmetricWeight:
    """A linear weight as TensorRT takes it: integer codes, one scale per output row, zero 0.

    `in_scale` is the activation scale folded into the input channels (the graph's weight is
    codes·scale; the model's weight is that divided by in_scale), None when nothing folds in.
    `requantized` says whether the codes are symmetric codes of the (folded) weight, computed
    here or calibrated so by a `--target tensorrt` plan, rather than the plan's asymmetric
    codes shifted by their zero points.
    """

    codes: NDArray[np.int8]  # [out, in]
    scale: NDArray[np.float32]  # [out]; [groups, out] when group_of is set
    in_scale: NDArray[np.float32] | None  # [in]
    requantized: bool
    group_of: NDArray[np.int64] | None = None  # [in]: the scale group of each input channel

    def folded_values(self) -> NDArray[np.float32]:
        """codes·scale [out, in]: what the graph's weight DequantizeLinear yields (before any
        output-channel fold); with scale groups, the sum of the groups' products."""
        if self.group_of is None:
            return (self.codes.astype(np.float32) * self.scale[:, None]).astype(np.float32)
        return (self.codes.astype(np.float32) * self.scale[self.group_of].T).astype(np.float32)

    def values(self) -> NDArray[np.float32]:
        """The weight [out, in] in the model's own domain: what the reference multiplies X̂ by."""
        folded = self.folded_values()
        if self.in_scale is None:
            return folded
        return (folded / self.in_scale[None, :]).astype(np.float32)


def _check_rows(weight: NDArray[np.generic], what: str) -> None:
    if weight.ndim != 2:
        raise ValueError(f"{what} must be 2-D [out, in], got shape {weight.shape}")


def fold_input_scale(
    weight: NDArray[np.floating], in_scale: NDArray[np.floating] | None
) -> NDArray[np.float32]:
    """W·diag(in_scale) [out, in] in float32 (one rounding): the weight the variant's graph
    multiplies the activation codes by. Calibration for the TensorRT target quantizes exactly
    this array, so the plan's codes are the ones the export would compute."""
    _check_rows(weight, "weight")
    folded = np.asarray(weight, dtype=np.float32)
    if in_scale is None:
        return folded
    in_scale = np.asarray(in_scale, dtype=np.float32)
    if in_scale.shape != (folded.shape[1],):
        raise ValueError(
            f"in_scale has shape {in_scale.shape}, expected ({folded.shape[1]},) input channels"
        )
    return (folded * in_scale[None, :]).astype(np.float32)


def symmetric_scale(folded: NDArray[np.floating], bits: int) -> NDArray[np.float32]:
    """Per-row scale max|row| / qmax of the symmetric `bits` grid (1 for an all-zero row)."""
    _check_rows(folded, "weight")
    qmax = symmetric_max(bits)
    amax = np.abs(np.asarray(folded, np.float32)).max(axis=1, initial=0.0).astype(np.float32)
    scale = (amax / np.float32(qmax)).astype(np.float32)
    scale[~(scale > 0)] = np.float32(1.0)  # an all-zero row: codes 0, any positive scale
    return scale


def symmetric_codes(
    folded: NDArray[np.floating], scale: NDArray[np.float32], bits: int
) -> NDArray[np.int8]:
    """Round-to-nearest codes of `folded` [out, in] on the symmetric grid with per-row scale."""
    qmax = symmetric_max(bits)
    values = np.asarray(folded, np.float32) / np.asarray(scale, np.float32)[:, None]
    return np.clip(np.round(values), -qmax, qmax).astype(np.int8)


def requantize_folded(
    weight: NDArray[np.floating], in_scale: NDArray[np.floating] | None, bits: int
) -> tuple[NDArray[np.int8], NDArray[np.float32]]:
    """Symmetric per-row codes of W·diag(in_scale): scale = max|row| / qmax, zero point 0.

    The product is taken in float32 (one rounding), as both the graph pass and the reference
    do, so the same weight and scale give the same codes in any channel order.
    """
    folded = fold_input_scale(weight, in_scale)
    scale = symmetric_scale(folded, bits)
    return symmetric_codes(folded, scale, bits), scale


def scale_groups(in_scale: NDArray[np.floating], count: int) -> NDArray[np.int64]:
    """Scale group (0 = smallest scales) of each input channel: the distinct scale values, in
    log order, cut at their `count − 1` widest gaps.

    An outlier cluster's scale is 10-100x the others' (rptq/outliers.py), so the widest gap in
    log scale separates it; a per-row weight scale then serves each group's columns instead of
    being set by the outlier columns alone. The groups depend only on the values, so the graph
    (cluster order) and the reference (model order) agree channel for channel.
    """
    if count < 1:
        raise ValueError(f"scale groups must be >= 1, got {count}")
    s = np.asarray(in_scale, np.float32)
    values = np.unique(s)  # sorted
    if count == 1 or values.size == 1:
        return np.zeros(s.shape, np.int64)
    gaps = np.diff(np.log(values.astype(np.float64)))
    widest = np.argsort(-gaps, kind="stable")[: count - 1]  # ties: the smaller scales first
    cuts = values[np.sort(widest) + 1]  # first value of each new group
    return np.searchsorted(cuts, s, side="right").astype(np.int64)


def requantize_grouped(
    weight: NDArray[np.floating],
    in_scale: NDArray[np.floating],
    bits: int,
    group_of: NDArray[np.int64],
) -> tuple[NDArray[np.int8], NDArray[np.float32]]:
    """Symmetric codes of W·diag(in_scale) [out, in] with one scale per (group, output row).

    Group g's scale [g, out] is max|row over g's columns| / qmax (requantize_folded on those
    columns); a group's graph GEMM multiplies its columns' codes (the others 0) by it.
    """
    folded = fold_input_scale(weight, in_scale)
    if group_of.shape != (folded.shape[1],):
        raise ValueError(f"group_of has shape {group_of.shape}, expected ({folded.shape[1]},)")
    groups = int(group_of.max(initial=0)) + 1
    codes = np.zeros(folded.shape, np.int8)
    scale = np.ones((groups, folded.shape[0]), np.float32)
    for g in range(groups):
        columns = group_of == g
        if not columns.any():
            continue
        scale[g] = symmetric_scale(folded[:, columns], bits)
        codes[:, columns] = symmetric_codes(folded[:, columns], scale[g], bits)
    return codes, scale


def shift_plan_codes(
    codes: NDArray[np.integer], zero: NDArray[np.integer]
) -> NDArray[np.int8] | None:
    """The plan's asymmetric codes as zero-point-0 INT8 codes C − z (None if one leaves INT8).

    s∘(C − z) is exactly the plan's dequantized weight, so nothing is lost; RPTQ's midpoint
    zero point keeps |C − z| near 2^(b−1) for any row whose range contains 0.
    """
    _check_rows(codes, "codes")
    if zero.shape != (codes.shape[0],):
        raise ValueError(f"zero has shape {zero.shape}, expected ({codes.shape[0]},) rows")
    shifted = codes.astype(np.int64) - zero.astype(np.int64)[:, None]
    if shifted.size and (shifted.min() < INT8_MIN or shifted.max() > INT8_MAX):
        return None
    return shifted.astype(np.int8)


def trt_weight(
    weight: NDArray[np.floating],
    codes: NDArray[np.integer],
    scale: NDArray[np.floating],
    zero: NDArray[np.integer],
    bits: int,
    in_scale: NDArray[np.floating] | None,
    folded_scale: NDArray[np.floating] | None = None,
    may_requantize: bool = True,
    groups: int = DEFAULT_WEIGHT_GROUPS,
) -> SymmetricWeight:
    """The TensorRT variant's weight for one linear (float weight and plan codes both [out, in]).

    A plan calibrated for TensorRT (`folded_scale`, the input scale its symmetric codes were
    computed with) is used verbatim; its scale must be the activation scale the graph folds
    (`in_scale`, same channel order). Otherwise, with an activation scale folded into the
    input channels the plan's codes no longer apply and W·diag(in_scale) is re-quantized
    symmetrically (round to nearest); without one the plan's codes are kept (shifted by their
    zero points), unless a shifted code leaves INT8, in which case W itself is re-quantized
    symmetrically, or, with `may_requantize` False (a plan whose codes must be kept: GPTQ,
    LoRC, TensorRT-calibrated), a ValueError is raised. A folded re-quantization takes one
    scale per output row and scale group (`scale_groups(in_scale, groups)`; 1: per row only).
    """
    _check_rows(weight, "weight")
    if codes.shape != weight.shape:
        raise ValueError(f"codes shape {codes.shape} != weight shape {weight.shape}")
    if folded_scale is not None:
        if in_scale is None or not np.array_equal(
            np.asarray(folded_scale, np.float32), np.asarray(in_scale, np.float32)
        ):
            raise ValueError("the codes were calibrated with another input scale than the graph's")
        if np.any(np.asarray(zero) != 0):
            raise ValueError("codes calibrated for TensorRT must be symmetric (zero point 0)")
        return SymmetricWeight(
            np.asarray(codes, np.int8).copy(),
            np.asarray(scale, np.float32).copy(),
            np.asarray(folded_scale, np.float32).copy(),
            True,
        )
    if in_scale is None:
        shifted = shift_plan_codes(codes, zero)
        if shifted is not None:
            return SymmetricWeight(shifted, np.asarray(scale, np.float32).copy(), None, False)
        if not may_requantize:
            raise ValueError("the plan's codes leave INT8 after their zero-point shift")
        new_codes, new_scale = requantize_folded(weight, None, bits)
        return SymmetricWeight(new_codes, new_scale, None, True)
    if not may_requantize:
        raise ValueError("the plan's codes were not calibrated with the graph's input scale")
    kept_scale = np.asarray(in_scale, np.float32).copy()
    group_of = scale_groups(kept_scale, groups)
    if group_of.max(initial=0) > 0:
        new_codes, new_scale = requantize_grouped(weight, kept_scale, bits, group_of)
        return SymmetricWeight(new_codes, new_scale, kept_scale, True, group_of)
    new_codes, new_scale = requantize_folded(weight, in_scale, bits)
    return SymmetricWeight(new_codes, new_scale, kept_scale, True)


def fold_layernorm_affine(
    gamma: NDArray[np.floating],
    beta: NDArray[np.floating],
    scale: NDArray[np.floating],
    zero: NDArray[np.integer],
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """γ/s and β/s + z: the LayerNorm then writes U = X/s + z (exact; rounded once on cast)."""
    if not gamma.shape == beta.shape == scale.shape == zero.shape or gamma.ndim != 1:
        raise ValueError(
            f"gamma {gamma.shape}, beta {beta.shape}, scale {scale.shape}, zero {zero.shape} "
            "must be equal 1-D shapes"
        )
    s = np.asarray(scale, np.float64)
    return gamma.astype(np.float64) / s, beta.astype(np.float64) / s + zero.astype(np.float64)


def fold_float_rows(
    weight_in_out: NDArray[np.floating], in_scale: NDArray[np.floating] | None
) -> NDArray[np.float64]:
    """diag(in_scale)·W for a float (unquantized) weight [in, out]: the consumer fold of X̂."""
    w = np.asarray(weight_in_out, np.float64)
    if in_scale is None:
        return w
    if in_scale.shape != (w.shape[0],):
        raise ValueError(f"in_scale has shape {in_scale.shape}, expected ({w.shape[0]},) rows")
    return w * np.asarray(in_scale, np.float64)[:, None]


def fold_bias(
    bias: NDArray[np.floating],
    folded_in_out: NDArray[np.floating],
    in_zero: NDArray[np.integer] | None,
    out_factor: NDArray[np.floating] | None,
    out_offset: NDArray[np.integer] | None,
) -> NDArray[np.float64]:
    """Bias of a linear fed C (codes) instead of X̂ and writing U instead of Y.

    With F the folded weight [in, out] (diag(s)·W, or the codes' values), the graph computes
    C·F·diag(c) + b', and b' = c∘(b − z·F) + z_out makes that (X̂·W + b)∘c + z_out, i.e. U of
    the next activation (c = 1/s_out, times head_dim^-½ for q).
    """
    b = np.asarray(bias, np.float64)
    if bias.ndim != 1 or folded_in_out.ndim != 2 or folded_in_out.shape[1] != b.shape[0]:
        raise ValueError(f"bias {bias.shape} does not match folded weight {folded_in_out.shape}")
    if in_zero is not None:
        b = b - np.asarray(in_zero, np.float64) @ np.asarray(folded_in_out, np.float64)
    if out_factor is not None:
        b = b * np.asarray(out_factor, np.float64)
    if out_offset is not None:
        b = b + np.asarray(out_offset, np.float64)
    return b


def int4_block_scales(scale: NDArray[np.floating], in_channels: int, block: int) -> NDArray:
    """Per-output-channel scales [out] as INT4 block scales [in / block, out] (same values).

    TensorRT's INT4 weights need block scales (block 64 or 128); repeating the per-channel
    scale over the blocks of the input dim keeps every dequantized value unchanged.
    """
    if block <= 0 or in_channels % block:
        raise ValueError(f"{in_channels} input channels are not a multiple of block {block}")
    return np.repeat(np.asarray(scale)[None, :], in_channels // block, axis=0)
