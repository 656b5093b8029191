"""GPTQT (docs/algorithms.md §5.2): linear quantization at m = n + 1 bits, then n binary planes.

Per linear, on the weight as the exported graph holds it (columns in the graph's order):

1. re-explore: for each scale multiplier γ, RTN at m bits on the per-row grid widened by γ
   about the row's midpoint, BCQ fit of the row's code histogram, and the output error
   tr((W − Ŵ) H (W − Ŵ)ᵀ) of the merged weight; every row keeps its best γ (the error is a sum
   of per-row terms, so choosing per row costs nothing extra);
2. GPTQ at m bits on the chosen grid (RTN in the search, GPTQ once: §5.2 step 4);
3. BCQ with offset of each row's m-bit codes (rptq.quant.bcq.fit_bcq) merged into α (rows × n)
   and β (rows): the row's 2^n weight levels;
4. a second GPTQ sweep from the float weight whose quantizer is "nearest of the row's BCQ
   levels" (§5.2 step 5), so the error of the integer-to-binary conversion is compensated too.
   On correlated random inputs this cuts the output error by 10–20 % against stopping after
   step 3 (tests/unit/test_gptqt.py), and it is what makes GPTQT beat GPTQ at 2 and 3 bits.

The result is n-bit codes (signed BCQ indices) plus α, β: plan_weights.BinaryCode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from rptq.calib.gptq import LevelQuantizer, gptq_codes, gptq_sweep, output_error
from rptq.plan_weights import BinaryCode
from rptq.quant.bcq import (
    BcqFit,
    binary_weight,
    code_histogram,
    fit_bcq,
    merge_with_grid,
    planes_of,
)
from rptq.quant.qparams import affine_params, grid_bounds, quantize

# Multipliers of the initial (min/max) half-range tried by the re-explore search [design: the
# paper's grid is not public]. Below 1 clips outliers, above 1 makes room for the BCQ levels,
# which the least-squares fit pulls inside the integer range.
REEXPLORE_GAMMAS: tuple[float, ...] = tuple(round(0.80 + 0.05 * i, 2) for i in range(15))


@dataclass(frozen=True)
class GptqtResult:
    """n-bit codes [out, in] (input's column order), the m-bit grid of step 1, α/β, the γ."""

    codes: NDArray[np.int32]  # signed BCQ index: k − 2^(n−1)
    scale: NDArray[np.float32]  # step 1's m-bit grid (provenance)
    zero: NDArray[np.int32]
    binary: BinaryCode
    gamma: NDArray[np.float64]  # [out] chosen multiplier per row


def widened_grid(
    weight: NDArray[np.float32], gamma: NDArray[np.floating] | float, bits: int
) -> tuple[NDArray[np.float32], NDArray[np.int32]]:
    """RPTQ's per-row grid of [mid − γ·half, mid + γ·half] (γ = 1: the min/max grid)."""
    lo, hi = weight.min(axis=1).astype(np.float64), weight.max(axis=1).astype(np.float64)
    mid, half = (hi + lo) / 2, (hi - lo) / 2
    return affine_params(mid - gamma * half, mid + gamma * half, bits)


def binary_code(
    codes: NDArray[np.integer], scale: NDArray[np.float32], zero: NDArray[np.int32], m: int, n: int
) -> tuple[BinaryCode, NDArray[np.int64]]:
    """BCQ of m-bit codes (one fit per row, §5.2 steps 2–3): α/β and each weight's BCQ index."""
    qmin, qmax = grid_bounds(m)
    fit: BcqFit = fit_bcq(
        code_histogram(codes, qmin, 2**m), np.arange(qmin, qmax + 1, dtype=np.float64), n
    )
    alpha, beta = merge_with_grid(fit, scale, zero)
    index = np.take_along_axis(fit.lookup.astype(np.int64), codes.astype(np.int64) - qmin, axis=1)
    return BinaryCode(alpha, beta), index


def weight_levels(binary: BinaryCode) -> NDArray[np.float32]:
    """[out, 2^n] weight value of every BCQ index, computed as the reference computes weights."""
    n, rows = binary.planes, binary.alpha.shape[0]
    every_index = np.broadcast_to(np.arange(2**n), (rows, 2**n))
    return binary_weight(planes_of(every_index, n), binary.alpha, binary.beta, axis=0)


def reexplore_gamma(
    weight: NDArray[np.float32],
    hessian: torch.Tensor,
    m: int,
    n: int,
    gammas: tuple[float, ...] = REEXPLORE_GAMMAS,
) -> NDArray[np.float64]:
    """Per-row γ minimising the output error of RTN-then-BCQ (§5.2 step 4)."""
    # every candidate's rows stacked, [G * out, in]: one BCQ fit and one product with H
    reference = np.tile(weight, (len(gammas), 1))
    grids = [widened_grid(weight, gamma, m) for gamma in gammas]
    scale = np.concatenate([g[0] for g in grids])
    zero = np.concatenate([g[1] for g in grids])
    codes = quantize(reference, scale[:, None], zero[:, None], m)
    binary, index = binary_code(codes, scale, zero, m, n)
    merged = binary_weight(planes_of(index, n), binary.alpha, binary.beta, axis=0)
    stacked, target = torch.from_numpy(merged), torch.from_numpy(reference)
    error = output_error(target, stacked, hessian).cpu().numpy().reshape(len(gammas), -1)
    return np.asarray(gammas, dtype=np.float64)[error.argmin(axis=0)]


def gptqt_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    percdamp: float,
    block_size: int,
    act_order: bool,
    gammas: tuple[float, ...] = REEXPLORE_GAMMAS,
) -> GptqtResult:
    """GPTQT of `weight` [out, in] to `bits` binary planes; `hessian` [in, in] in the same order."""
    n, m = bits, bits + 1
    w = weight.detach().float().cpu().numpy()
    gamma = reexplore_gamma(w, hessian.float(), m, n, gammas)
    scale, zero = widened_grid(w, gamma, m)
    qmin, qmax = grid_bounds(m)
    result = gptq_codes(
        weight,
        hessian,
        torch.from_numpy(scale),
        torch.from_numpy(zero),
        qmin,
        qmax,
        percdamp=percdamp,
        block_size=block_size,
        act_order=act_order,
    )
    binary, _ = binary_code(result.codes.cpu().numpy(), scale, zero, m, n)
    levels = torch.from_numpy(weight_levels(binary)).to(weight.device)
    second = gptq_sweep(weight, hessian, LevelQuantizer(levels), percdamp, block_size, act_order)
    codes = second.codes.cpu().numpy() - 2 ** (n - 1)
    return GptqtResult(codes.astype(np.int32), scale, zero, binary, gamma)
