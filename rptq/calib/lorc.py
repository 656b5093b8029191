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
from rptq.quant.trt_weights import requantize_folded

log = logging.getLogger(__name__)


def _symmetric_factor(
    factor: NDArray[np.floating],
) -> tuple[NDArray[np.int8], NDArray[np.float32], NDArray[np.int32]]:
    """8-bit codes of a factor [rows, R], one symmetric scale per row, zero points 0."""
    codes, scale = requantize_folded(np.asarray(factor, np.float32), None, FACTOR_BITS)
    return codes, scale, np.zeros(scale.shape, np.int32)


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
