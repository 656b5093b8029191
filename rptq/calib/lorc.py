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

log = logging.getLogger(__name__)


def lorc_correction(
    weight: torch.Tensor, quantized: NDArray[np.float32], rank: int, bits: int
) -> LowRank | None:
    """Top-`rank` factors of E = W − Ŵ ([out, in]); None when E is exactly zero.

    A rank above min(out, in) is clamped to it (full rank then recovers W up to float error).
    `bits` 8 stores both factors as int8 codes with one scale per row; 16 keeps them float.
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
        return LowRank(
            LowRankFactor(bits, *quantize_factor(u_hat)),
            LowRankFactor(bits, *quantize_factor(v_hat)),
        )
    return LowRank(LowRankFactor(bits, u_hat), LowRankFactor(bits, v_hat))
