"""LoRC factors of a quantized weight's error (docs/algorithms.md §6.1), computed with torch.

The SVD runs on the weight's device (a 16384 × 4096 error takes seconds on a GPU, minutes in
numpy on a CPU); the split into Û, V̂ and the optional 8-bit factor codes use rptq.quant.lowrank,
the same maths the reference and the export read.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from numpy.typing import NDArray

from rptq.plan_weights import LowRank, LowRankFactor
from rptq.quant.lowrank import FACTOR_BITS, quantize_factor, split_svd
from rptq.quant.trt_weights import symmetric_codes, symmetric_max, symmetric_scale

log = logging.getLogger(__name__)


def _symmetric_factor(
    factor: NDArray[np.floating],
) -> tuple[NDArray[np.int8], NDArray[np.float32], NDArray[np.int32]]:
    """8-bit codes of a factor [rows, R], one symmetric scale per row, zero points 0.

    A row's scale is at least the largest row scale / 2^8: with scale groups a weight's
    one-column group is exact, its error column (a row of V̂) nearly 0, and its scale (1e-12
    seen) would flush to 0 in a float16 graph, which TensorRT refuses. A floored row's rounding
    error stays 2^8 times below the widest row's, and rows above the floor keep their codes.
    """
    values = np.asarray(factor, np.float32)
    amax = np.abs(values).max(axis=1, initial=0.0).astype(np.float32)
    scale = symmetric_scale(values, FACTOR_BITS)  # 1 for an all-zero row
    floor = np.float32(amax.max(initial=0.0) / symmetric_max(FACTOR_BITS) / 2**FACTOR_BITS)
    scale = np.where(amax > 0, np.maximum(scale, floor), scale).astype(np.float32)
    return symmetric_codes(values, scale, FACTOR_BITS), scale, np.zeros(scale.shape, np.int32)


def lorc_correction(
    weight: torch.Tensor,
    quantized: NDArray[np.float32],
    rank: int,
    bits: int,
    symmetric: bool = False,
) -> LowRank | None:
    """Top-`rank` factors of E = W − Ŵ ([out, in]); None when E is exactly zero.

    A rank above min(out, in) is clamped to it (full rank then recovers W up to float error).
    `bits` 8 stores both factors as int8 codes with one scale per row; 16 keeps them float.
    `symmetric` (TensorRT, whose DequantizeLinear takes zero points of 0 only) quantizes the
    int8 rows on the symmetric grid ±127 with zero point 0.
    """
    if quantized.shape != tuple(weight.shape):
        raise ValueError(f"quantized {quantized.shape} does not match weight {tuple(weight.shape)}")
    dtype = torch.float64 if weight.device.type == "cpu" else torch.float32
    error = weight.detach().to(dtype) - torch.from_numpy(quantized).to(weight.device, dtype)
    u, singular, vh = torch.linalg.svd(error, full_matrices=False)
    if float(singular[0]) == 0.0:
        return None
    kept = min(rank, singular.shape[0])
    if kept < rank:
        log.debug("LoRC rank %d clamped to %d for a %s weight", rank, kept, tuple(weight.shape))
    u_hat, v_hat = split_svd(
        u.cpu().double().numpy(), singular.cpu().double().numpy(), vh.cpu().double().numpy(), kept
    )
    if bits == FACTOR_BITS:
        quantize = _symmetric_factor if symmetric else quantize_factor
        return LowRank(LowRankFactor(bits, *quantize(u_hat)), LowRankFactor(bits, *quantize(v_hat)))
    return LowRank(LowRankFactor(bits, u_hat), LowRankFactor(bits, v_hat))
