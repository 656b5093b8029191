"""Weight quantization of one decoder layer: RTN, GPTQ or GPTQT, each optionally with LoRC.

Every method works on a `LinearProblem`: the weight [out, in] as the exported graph will hold
it (Hugging Face orientation), the Hessian of the inputs that weight sees, and the column order
of the graph. The runner builds problems from the float layer and the plan's reorder sites
(the ONNX target folds only permutations into the weights). A target that folds more into the
weights (TensorRT folds cluster scales: W' = W diag(c) with inputs x / c, so H' = diag(1/c) H
diag(1/c); calib/trt_domain.py) passes `adjust` to hand its own weight and Hessian to the same
methods, so that what is exported is what was optimized. Such a problem carries
`folded_scale` = c: RTN and GPTQ then use the symmetric per-row grid TensorRT takes
(rptq.quant.trt_weights), one scale per output row and scale group when the problem carries
`scale_groups`; GPTQT its usual grid (its planes are exported with an offset term, one group),
and LoRC factors are quantized symmetrically.

Codes are stored back in Hugging Face column order (the plan's contract); the sweep itself runs
on the permuted columns because GPTQ's column order changes its result. Weight groups
(`weight_group_size`, RTN and GPTQ) are cut in that permuted order too, so that they are
contiguous blocks of the exported weight (one blocked DequantizeLinear).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar

import numpy as np
import torch
from numpy.typing import NDArray

from rptq.calib.gptq import GptqResult, GridQuantizer, HessianTap, gptq_sweep
from rptq.calib.gptqt import gptqt_quantize
from rptq.calib.lorc import lorc_correction
from rptq.model.weights import layer_prefix
from rptq.plan import Recipe, ReorderSite, WeightMethod, WeightQuant
from rptq.points import LINEAR_INPUT_ACT, LINEAR_INPUT_SITE, LINEARS
from rptq.quant.clusters import inverse_permutation
from rptq.quant.qparams import affine_params, grid_bounds, quantize
from rptq.quant.trt_weights import (
    requantize_grouped,
    symmetric_codes,
    symmetric_max,
    symmetric_scale,
)

log = logging.getLogger(__name__)
_Scalar = TypeVar("_Scalar", bound=np.generic)


@dataclass(frozen=True)
class LinearProblem:
    """One linear weight to quantize, as the exported graph will hold it.

    `weight` [out, in] in Hugging Face orientation; `hessian` [in, in] of the inputs in the same
    (Hugging Face) channel order, None for RTN; `in_perm` the graph's column order (position i
    holds column in_perm[i]), None for the identity. `folded_scale` [in] is the activation
    scale already folded into `weight` (and out of `hessian`) for the TensorRT target; None
    for a weight in the model's own domain. `symmetric` selects TensorRT's zero-point-free
    grids (weights, LoRC factors). `scale_groups` [in] (Hugging Face order, TensorRT only) is
    the scale group of each input channel (rptq.quant.trt_weights.scale_groups): RTN and GPTQ
    then take one symmetric scale per output row and group; None for one per row.
    """

    fqn: str
    weight: torch.Tensor
    hessian: torch.Tensor | None
    in_perm: NDArray[np.int64] | None
    folded_scale: NDArray[np.float32] | None = None
    symmetric: bool = False
    scale_groups: NDArray[np.int64] | None = None


AdjustFn = Callable[[str, LinearProblem], LinearProblem]  # (linear, problem) -> problem


def needs_hessian(recipe: Recipe) -> bool:
    """Whether the calibration pass must collect Hessians for this recipe."""
    return recipe.wbits < 16 and recipe.weight_method is not WeightMethod.RTN


def hessian_tap() -> HessianTap:
    """A tap collecting the Hessians of all six linears' inputs."""
    return HessianTap(set(LINEAR_INPUT_ACT.values()))


def weight_grid(
    weight: NDArray[np.float32], bits: int, group_size: int
) -> tuple[NDArray[np.float32], NDArray[np.int32]]:
    """RPTQ's grid from the float weight, fixed before any sweep (§2.8): [out] per row, or
    [out, in / group_size] per row and block of `group_size` columns in the order given.
    """
    if not group_size:
        return affine_params(weight.min(axis=1), weight.max(axis=1), bits)
    blocks = weight.reshape(weight.shape[0], -1, group_size)
    return affine_params(blocks.min(axis=2), blocks.max(axis=2), bits)


def _per_column(values: NDArray[_Scalar], group_size: int) -> NDArray[_Scalar]:
    """[out] or [out, groups] grid values as [out, 1] or [out, in] (broadcast over columns)."""
    return values[:, None] if not group_size else np.repeat(values, group_size, axis=1)


def _linear_codes(problem: LinearProblem, recipe: Recipe) -> WeightQuant:
    """Codes of the method (RTN, GPTQ or GPTQT), back in Hugging Face column order."""
    bits, group_size = recipe.wbits, recipe.weight_group_size
    weight, hessian, perm = problem.weight.detach().float(), problem.hessian, problem.in_perm
    if recipe.weight_method is not WeightMethod.RTN and hessian is None:
        raise ValueError(f"{problem.fqn}: {recipe.weight_method} needs the inputs' Hessian")
    if perm is not None:  # grids and sweeps see the columns in the graph's order
        index = torch.from_numpy(perm).to(weight.device)
        weight = weight[:, index]
        if hessian is not None:
            hessian = hessian.to(weight.device)[index][:, index]
    binary = None
    codes: NDArray[np.integer]
    group_index: NDArray[np.int32] | None = None
    if recipe.weight_method is WeightMethod.GPTQT:
        assert hessian is not None
        gptqt = gptqt_quantize(
            weight,
            hessian,
            bits,
            recipe.gptq_percdamp,
            recipe.gptq_block_size,
            recipe.act_order,
        )
        codes, scale, zero, binary = gptqt.codes, gptqt.scale, gptqt.zero, gptqt.binary
    elif problem.folded_scale is not None:
        group_of = problem.scale_groups
        if group_of is not None and perm is not None:
            group_of = group_of[perm]  # graph order, like the weight's columns
        codes, scale, zero = _symmetric_codes(weight, hessian, recipe, group_of)
        if problem.scale_groups is not None:
            group_index = problem.scale_groups.astype(np.int32)
    else:
        w = weight.cpu().numpy()
        scale, zero = weight_grid(w, bits, group_size)
        column_scale, column_zero = _per_column(scale, group_size), _per_column(zero, group_size)
        if recipe.weight_method is WeightMethod.RTN:
            codes = quantize(w, column_scale, column_zero, bits)
        else:
            assert hessian is not None
            quantizer = GridQuantizer(
                torch.from_numpy(column_scale if group_size else scale).to(weight.device),
                torch.from_numpy(column_zero if group_size else zero).to(weight.device),
                *grid_bounds(bits),
            )
            # GPTQ's groups take their grid when the sweep reaches them (§3.3 step 7); with
            # act-order the grids stay the static ones computed above (its --static-groups)
            dynamic = bool(group_size) and not recipe.act_order
            result = _sweep(
                weight,
                hessian,
                quantizer,
                recipe,
                regroup=partial(quantizer.refit, bits=bits) if dynamic else None,
                group_size=group_size,
            )
            codes = result.codes.cpu().numpy()
            if dynamic:
                scale = quantizer.scale[:, ::group_size].cpu().numpy().astype(np.float32)
                zero = quantizer.zero[:, ::group_size].cpu().numpy().astype(np.int32)
    position = np.arange(codes.shape[1]) if perm is None else inverse_permutation(perm)
    codes = codes[:, position]
    if group_size:
        group_index = (position // group_size).astype(np.int32)
    return WeightQuant(
        problem.fqn, bits, codes.astype(np.int8), scale, zero, binary, group_index=group_index
    )


def _symmetric_codes(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    recipe: Recipe,
    group_of: NDArray[np.int64] | None = None,
) -> tuple[NDArray[np.int8], NDArray[np.float32], NDArray[np.int32]]:
    """RTN or GPTQ codes of a folded weight on TensorRT's grid: scale max|row| / qmax fixed
    from the float row (as the export's re-quantization), zero point 0, codes in ±qmax.

    With `group_of` ([in], the columns' order) the scale is max|row over a group| / qmax,
    scale/zero [out, groups]. RTN is rptq.quant.trt_weights' own rounding
    (requantize_folded / requantize_grouped), so a TensorRT RTN plan holds exactly the codes
    the export computes when it re-quantizes an ONNX Runtime RTN plan.
    """
    w = weight.cpu().numpy()
    bits = recipe.wbits
    if group_of is None:
        scale = symmetric_scale(w, bits)
        column_scale = scale
    else:
        codes, by_group = requantize_grouped(w, None, bits, group_of)
        scale = np.ascontiguousarray(by_group.T)  # [out, groups], the plan's layout
        column_scale = np.ascontiguousarray(scale[:, group_of])  # [out, in]
    zero = np.zeros(scale.shape, np.int32)
    if recipe.weight_method is WeightMethod.RTN:
        if group_of is None:
            codes = symmetric_codes(w, scale, bits)
        return codes, scale, zero
    assert hessian is not None
    qmax = symmetric_max(bits)
    quantizer = GridQuantizer(
        torch.from_numpy(column_scale).to(weight.device),
        torch.zeros(column_scale.shape, device=weight.device),
        -qmax,
        qmax,
    )
    result = _sweep(weight, hessian, quantizer, recipe)
    return result.codes.cpu().numpy().astype(np.int8), scale, zero


def _sweep(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantizer: GridQuantizer,
    recipe: Recipe,
    **options: Any,
) -> GptqResult:
    """GPTQ's sweep with the recipe's dampening, block size and column order."""
    return gptq_sweep(
        weight,
        hessian,
        quantizer,
        recipe.gptq_percdamp,
        recipe.gptq_block_size,
        recipe.act_order,
        **options,
    )


def quantize_linear(problem: LinearProblem, recipe: Recipe) -> WeightQuant:
    """The plan entry of one linear: the method's codes, plus LoRC factors when asked for.

    LoRC factors approximate the error of the weight the graph holds (W·diag(c) for a folded
    problem), so the entry's folded input scale is attached only afterwards.
    """
    quant = _linear_codes(problem, recipe)
    if recipe.lorc_rank:
        lorc = lorc_correction(
            problem.weight,
            quant.values(),
            recipe.lorc_rank,
            recipe.lorc_bits,
            symmetric=problem.symmetric,
        )
        quant = replace(quant, lorc=lorc)
    if problem.folded_scale is not None:
        quant = replace(quant, folded_scale=problem.folded_scale)
    return quant


def quantize_layer(
    layer: int,
    weights: dict[str, torch.Tensor],
    recipe: Recipe,
    sites: list[ReorderSite],
    hessians: HessianTap | None,
    adjust: AdjustFn | None = None,
) -> list[WeightQuant]:
    """Plan entries of the six linears of decoder layer `layer` (keys of `weights` as in
    LAYER_TENSORS); `sites` are the layer's reorder sites, `hessians` the calibration tap.
    """
    by_point = {s.point: s for s in sites if s.layer == layer}
    out = []
    for linear in LINEARS:
        site = by_point.get(LINEAR_INPUT_SITE[linear])
        hessian = None
        if hessians is not None and needs_hessian(recipe):
            hessian = hessians.hessian(LINEAR_INPUT_ACT[linear])
        problem = LinearProblem(
            f"{layer_prefix(layer)}.{linear}",
            weights[f"{linear}.weight"],
            hessian,
            None if site is None else site.perm,
        )
        if adjust is not None:
            problem = adjust(linear, problem)
        out.append(quantize_linear(problem, recipe))
    return out
