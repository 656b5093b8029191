"""LoRC (ZeroQuant-V2 low-rank compensation) maths: factors of the weight quantization error.

E = W − Ŵ (Hugging Face layout [out, in]) is approximated by its best rank-R approximation
(Eckart–Young), split symmetrically as Û = U_R Σ_R^½ [out, R] and V̂ = V_R Σ_R^½ [in, R], so the
effective weight is Ŵ + Û V̂ᵀ and inference adds a parallel branch (x V̂) Ûᵀ (docs/algorithms.md
§6.1). Factors may be quantized to 8 bits per row on RPTQ's grid (rows of Û are output channels,
rows of V̂ input channels), which keeps them exportable as int8 DequantizeLinear with one scale
per row.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from rptq.quant.qparams import dequantize, quantize_rows

FACTOR_BITS = 8  # the only quantized factor width (the paper's choice)


def split_svd(
    u: NDArray[np.floating], singular: NDArray[np.floating], vh: NDArray[np.floating], rank: int
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Û [out, R], V̂ [in, R] from a thin SVD E = U diag(σ) Vᴴ, keeping the top `rank` triplets."""
    if u.ndim != 2 or vh.ndim != 2 or singular.ndim != 1:
        raise ValueError("expected a thin SVD: U [out, k], sigma [k], Vh [k, in]")
    if not 1 <= rank <= singular.shape[0]:
        raise ValueError(f"rank must be 1..{singular.shape[0]}, got {rank}")
    root = np.sqrt(np.asarray(singular[:rank], np.float64))
    u_hat = np.asarray(u[:, :rank], np.float64) * root[None, :]
    v_hat = np.asarray(vh[:rank, :], np.float64).T * root[None, :]
    return np.ascontiguousarray(u_hat, np.float32), np.ascontiguousarray(v_hat, np.float32)


def lowrank_factors(
    error: NDArray[np.floating], rank: int
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Û, V̂ of the best rank-`rank` approximation of `error` [out, in] (numpy SVD, float64)."""
    if error.ndim != 2:
        raise ValueError(f"error must be 2-D [out, in], got shape {error.shape}")
    u, singular, vh = np.linalg.svd(np.asarray(error, np.float64), full_matrices=False)
    return split_svd(u, singular, vh, min(rank, singular.shape[0]))


def quantize_factor(
    factor: NDArray[np.floating],
) -> tuple[NDArray[np.int8], NDArray[np.float32], NDArray[np.int32]]:
    """8-bit codes of a factor [rows, R] with one (scale, zero) per row (RPTQ's grid)."""
    return quantize_rows(factor, FACTOR_BITS)


def dequantize_factor(
    codes: NDArray[np.integer], scale: NDArray[np.float32], zero: NDArray[np.int32]
) -> NDArray[np.float32]:
    """Float factor [rows, R] of per-row 8-bit codes."""
    return dequantize(codes, scale[:, None], zero[:, None])


def lowrank_product(
    u_hat: NDArray[np.floating], v_hat: NDArray[np.floating]
) -> NDArray[np.float32]:
    """Û V̂ᵀ [out, in] in float32: the correction the parallel branch adds to Ŵ."""
    if u_hat.ndim != 2 or v_hat.ndim != 2 or u_hat.shape[1] != v_hat.shape[1]:
        raise ValueError(f"factor shapes {u_hat.shape} and {v_hat.shape} do not share a rank")
    return (np.asarray(u_hat, np.float32) @ np.asarray(v_hat, np.float32).T).astype(np.float32)
