"""Folding a channel permutation into LayerNorm and linear weights: pure numpy, shapes first.

Like SmoothQuant's `smooth_ln_fcs`, each function is the algebra of one exact identity (see
docs/algorithms.md §1.1) and nothing else, so the fold pass and the weight pass share it and a
unit test can check it against the direct formula. Weights here are MatMul's B operand, stored
[in, out] (the transposed Hugging Face layout): rows are input channels, columns are output
channels. `perm` follows rptq.quant.clusters: position i of the reordered tensor holds original
channel perm[i]. Every function returns new arrays and never writes into its arguments, because
onnx-graphsurgeon's `Graph.copy` shares weight arrays between graphs.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from rptq.quant.clusters import is_permutation


def _check_perm(perm: NDArray[np.integer], length: int, what: str) -> NDArray[np.int64]:
    perm = np.asarray(perm)
    if not np.issubdtype(perm.dtype, np.integer):
        raise ValueError(f"{what} must be an integer array, got dtype {perm.dtype}")
    if not is_permutation(perm, length):
        raise ValueError(
            f"{what} must be a permutation of {length} channels, got shape {perm.shape}"
        )
    return perm.astype(np.int64)


def _check_ndim(array: NDArray[np.generic], ndim: int, what: str) -> None:
    if array.ndim != ndim:
        raise ValueError(f"{what} must be {ndim}-D, got shape {array.shape}")


def permute_layernorm(
    gamma: NDArray[np.floating], beta: NDArray[np.floating], perm: NDArray[np.integer]
) -> tuple[NDArray[np.floating], NDArray[np.floating]]:
    """gamma/beta for a LayerNorm whose input is gathered by `perm`.

    Mean and variance do not depend on channel order, so LN(x; g, b)[..., perm] equals
    LN(x[..., perm]; g[perm], b[perm]). The residual stream stays in the original order, which is
    why the graph gathers the LN input rather than permuting the producer.
    """
    _check_ndim(gamma, 1, "gamma")
    if beta.shape != gamma.shape:
        raise ValueError(f"beta shape {beta.shape} != gamma shape {gamma.shape}")
    p = _check_perm(perm, gamma.shape[0], "perm")
    return gamma[p].copy(), beta[p].copy()


def permute_matmul_rows(
    weight_t: NDArray[np.floating], perm: NDArray[np.integer]
) -> NDArray[np.floating]:
    """Weight [in, out] of a linear whose input arrives permuted: x[:, perm] @ W[perm] == x @ W."""
    _check_ndim(weight_t, 2, "weight_t [in, out]")
    p = _check_perm(perm, weight_t.shape[0], "perm (input channels)")
    return weight_t[p, :].copy()


def permute_matmul_cols(
    weight_t: NDArray[np.floating], bias: NDArray[np.floating], perm: NDArray[np.integer]
) -> tuple[NDArray[np.floating], NDArray[np.floating]]:
    """Weight [in, out] and bias of a linear whose output must come out permuted.

    (x @ W + b)[:, perm] == x @ W[:, perm] + b[perm]; the bias moves with its output channel.
    """
    _check_ndim(weight_t, 2, "weight_t [in, out]")
    _check_ndim(bias, 1, "bias")
    if bias.shape[0] != weight_t.shape[1]:
        raise ValueError(
            f"bias has {bias.shape[0]} channels but weight_t has {weight_t.shape[1]} outputs"
        )
    p = _check_perm(perm, weight_t.shape[1], "perm (output channels)")
    return weight_t[:, p].copy(), bias[p].copy()


def permute_weight_codes(
    codes_out_in: NDArray[np.integer],
    scale: NDArray[np.floating],
    zero: NDArray[np.integer],
    in_perm: NDArray[np.integer] | None,
    out_perm: NDArray[np.integer] | None,
) -> tuple[NDArray[np.integer], NDArray[np.floating], NDArray[np.integer]]:
    """Integer weight codes in the folded MatMul layout, with their per-output-row parameters.

    The plan stores codes [out, in] in the Hugging Face order with one (scale, zero) per output
    row. The folded graph needs B = codes^T [in, out] with rows permuted by the input reorder and
    columns by the output reorder; scale/zero follow the output channels, so dequantizing on
    axis 1 yields exactly permute_matmul_cols(permute_matmul_rows(dequantized^T)). None means
    the identity (that reorder point is not in the plan).
    """
    _check_ndim(codes_out_in, 2, "codes [out, in]")
    out_ch, in_ch = codes_out_in.shape
    _check_ndim(scale, 1, "scale")
    _check_ndim(zero, 1, "zero")
    if scale.shape[0] != out_ch or zero.shape[0] != out_ch:
        raise ValueError(
            f"scale {scale.shape} / zero {zero.shape} must have one entry per output row ({out_ch})"
        )
    rows = (
        np.arange(in_ch, dtype=np.int64)
        if in_perm is None
        else _check_perm(in_perm, in_ch, "in_perm")
    )
    cols = (
        np.arange(out_ch, dtype=np.int64)
        if out_perm is None
        else _check_perm(out_perm, out_ch, "out_perm")
    )
    codes_in_out = np.ascontiguousarray(codes_out_in.T[np.ix_(rows, cols)])
    return codes_in_out, scale[cols].copy(), zero[cols].copy()
