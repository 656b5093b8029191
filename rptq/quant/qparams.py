"""Asymmetric uniform quantization on RPTQ's signed grid.

RPTQ's UniformAffineQuantizer (RPTQ4LLM quantize/quantizer.py) uses the signed grid
[-2^(b-1), 2^(b-1)-1], step s = (xmax - xmin) / 2^b and the midpoint zero-point
z = round(-(xmax + xmin) / (2 s)), so xmin maps to the lowest code and the top of the range is
clipped one step below xmax. Fake quantization is x_hat = (clamp(round(x / s) + z) - z) * s with
round-half-to-even, the same as ONNX QuantizeLinear.

One deliberate difference [design]: instead of clamping s to [1e-4, 1e4] (which does not
reproduce constant channels), a range is widened symmetrically about its midpoint until
|z| <= 32767, so every zero point fits an int16 Q/DQ container and constant channels are
reproduced to within one small step.

A second one [design]: no cluster's scale is below the activation's widest range / 2^16
(`floor_cluster_ranges`). The TensorRT variant divides by a cluster's scale (U = X/s + z
folded into the producer's weights and bias), and a nearly dead cluster (a ReLU channel group
that is almost never positive: s = 1.8e-6 seen) made those constants leave float16.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from rptq.errors import ConfigError

MAX_ZERO_POINT = 32767  # int16, the widest ONNX Q/DQ container ONNX Runtime runs on CPU
MIN_HALF_RANGE = 1e-6  # half-range given to an all-zero channel


def grid_bounds(bits: int) -> tuple[int, int]:
    """Lowest and highest integer code of a signed `bits`-bit grid."""
    if not 2 <= bits <= 8:
        raise ConfigError(f"quantization bits must be 2..8, got {bits}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def affine_params(
    xmin: NDArray[np.floating], xmax: NDArray[np.floating], bits: int
) -> tuple[NDArray[np.float32], NDArray[np.int32]]:
    """Scale and integer zero point for each (xmin, xmax) range, elementwise."""
    grid_bounds(bits)
    xmin = np.asarray(xmin, dtype=np.float64)
    xmax = np.asarray(xmax, dtype=np.float64)
    if xmin.shape != xmax.shape:
        raise ValueError(f"xmin shape {xmin.shape} != xmax shape {xmax.shape}")
    if not (np.all(np.isfinite(xmin)) and np.all(np.isfinite(xmax))):
        raise ValueError("non-finite quantization range")
    mid = (xmax + xmin) / 2
    half = np.maximum((xmax - xmin) / 2, 0.0)
    min_half = np.maximum(np.abs(mid) * 2 ** (bits - 1) / MAX_ZERO_POINT, MIN_HALF_RANGE)
    half = np.maximum(half, min_half)
    scale = (2 * half / 2**bits).astype(np.float32)
    zero = np.round(-mid / scale.astype(np.float64))
    zero = np.clip(zero, -MAX_ZERO_POINT, MAX_ZERO_POINT).astype(np.int32)
    return scale, zero


FLOOR_LEVELS = 2**16  # float16's largest finite value is 65504, just below 2^16


def floor_cluster_ranges(
    xmin: NDArray[np.floating], xmax: NDArray[np.floating], bits: int
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The clusters' ranges of one activation, each widened about its midpoint until its
    scale (width / 2^bits) is at least the widest range / 2^16.

    Why this floor: the TensorRT variant carries every value as U = X/s + z, so a value
    inside the activation's widest range has |X/s| <= width_max / s <= 2^16 and stays near or
    below float16's limit (65504); an unfloored dead cluster's 1/s had no bound at all. It
    only bites far below the live ranges: a cluster narrower than width_max·2^bits/2^16
    (1/256 of the widest at 8 bits, 1/4096 at 4), whose rounding error is already that much
    below the widest cluster's, and stays so. Ranges above the floor (every live cluster, and
    any single per-tensor range) are returned bit for bit.
    """
    lo = np.asarray(xmin, dtype=np.float64)
    hi = np.asarray(xmax, dtype=np.float64)
    width = np.maximum(hi - lo, 0.0)
    if width.size == 0:
        return lo, hi
    floor = width.max() * 2**bits / FLOOR_LEVELS
    grow = np.where(width < floor, (floor - width) / 2, 0.0)
    return np.where(grow > 0, lo - grow, lo), np.where(grow > 0, hi + grow, hi)


def quantize(
    x: NDArray[np.floating], scale: NDArray[np.float32], zero: NDArray[np.int32], bits: int
) -> NDArray[np.int32]:
    """Integer codes of x; scale/zero broadcast against x (ONNX QuantizeLinear semantics)."""
    qmin, qmax = grid_bounds(bits)
    x32 = np.asarray(x, dtype=np.float32)
    codes = np.round(x32 / scale.astype(np.float32)).astype(np.int64) + zero
    return np.clip(codes, qmin, qmax).astype(np.int32)


def dequantize(
    codes: NDArray[np.integer], scale: NDArray[np.float32], zero: NDArray[np.int32]
) -> NDArray[np.float32]:
    """Float values of integer codes (ONNX DequantizeLinear semantics)."""
    return ((codes.astype(np.int64) - zero).astype(np.float32) * scale).astype(np.float32)


def fake_quant(
    x: NDArray[np.floating], scale: NDArray[np.float32], zero: NDArray[np.int32], bits: int
) -> NDArray[np.float32]:
    """Quantize then dequantize: what a Q/DQ pair computes."""
    return dequantize(quantize(x, scale, zero, bits), scale, zero)


def container_bits(zero: NDArray[np.integer], bits: int) -> int:
    """Smallest ONNX integer container (4, 8 or 16 bits) holding the codes and zero points.

    ONNX Q/DQ need the zero point in the same type as the codes, and RPTQ's midpoint zero point
    can lie outside the bits-wide grid (e.g. 2^(b-1) for a range that ends at 0).
    """
    for width in (4, 8, 16):
        if bits > width:
            continue
        lo, hi = -(2 ** (width - 1)), 2 ** (width - 1) - 1
        if zero.size == 0 or (int(zero.min()) >= lo and int(zero.max()) <= hi):
            return width
    raise ValueError(f"zero point out of int16 range: {zero.min()}..{zero.max()}")


def quantize_rows(
    weight: NDArray[np.floating], bits: int
) -> tuple[NDArray[np.int8], NDArray[np.float32], NDArray[np.int32]]:
    """Round-to-nearest quantization of a [out, in] weight, one (scale, zero) per output row."""
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {weight.shape}")
    w = np.asarray(weight, dtype=np.float32)
    scale, zero = affine_params(w.min(axis=1), w.max(axis=1), bits)
    codes = quantize(w, scale[:, None], zero[:, None], bits)
    return codes.astype(np.int8), scale, zero
