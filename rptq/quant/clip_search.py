"""Clipped activation ranges chosen from per-cluster histograms: RPTQ's `mse` and a percentile.

RPTQ's `mse` metric (RPTQ4LLM quantize/quantizer.py, `mse_calibration`) grid-searches a
clipped (xmin, xmax) per channel group that minimises the quantization MSE of the values it
sees. Here the values are the calibration rows of one cluster, summarised as a histogram of
`bins` equal bins over the cluster's global [lo, hi] (from a minmax pass), plus the count of
exact zeros kept apart: RPTQ's grid always reproduces 0 inside the range (code z), and ReLU
outputs are half zeros, which a bin centre would misplace. Integer counts merge exactly across
devices and windows in any order, so plans stay byte-identical however the windows are split.

The error of a candidate range uses the grid the plan will use (`qparams.affine_params`: step
(hi-lo)/2^b, midpoint zero point) with values uniform inside each bin (a closed-form integral of
the squared rounding/clipping error over the bin), so the estimate does not depend on how the
bins fall against the grid steps, even when a clipped step is narrower than a bin. The
search is deterministic: a joint shrink of both ends towards the median, then one round of
one-sided refinements; ties keep the wider range. Everything is float64 numpy on the CPU.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from rptq.quant.qparams import affine_params, grid_bounds

# Fractions of the distance from the cluster's median to its extreme kept on a side: 1.0 (no
# clipping) down to 0.02, geometric so that deep clips (3-bit grids, heavy tails) are as finely
# searched as shallow ones.
SHRINKS = np.geomspace(1.0, 0.02, 40)
REFINE_ROUNDS = 1
PERCENTILE = 99.99  # two-sided: clip 0.01 % of a cluster's values at each end


def _saw_integral(x: NDArray[np.float64], step: NDArray[np.float64]) -> NDArray[np.float64]:
    """Integral from 0 to x of the squared distance to the nearest multiple of `step`."""
    ax = np.abs(x)
    whole = np.floor(ax / step)
    r = ax - whole * step
    part = np.where(r <= step / 2, r**3 / 3, step**3 / 12 - (step - r) ** 3 / 3)
    return np.sign(x) * (whole * step**3 / 12 + part)


def _error_integral(
    x: NDArray[np.float64],
    step: NDArray[np.float64],
    low: NDArray[np.float64],
    high: NDArray[np.float64],
) -> NDArray[np.float64]:
    """Antiderivative of (x - fake_quant(x))^2 for a grid of multiples of `step` in [low, high].

    Below the lowest and above the highest grid value the error is the distance to it (the
    clamp); in between it is the distance to the nearest grid value.
    """
    inside = _saw_integral(np.clip(x, low, high), step) - _saw_integral(low, step)
    below = np.minimum(x - low, 0.0) ** 3 / 3
    above = np.maximum(x - high, 0.0) ** 3 / 3
    return inside + below + above


def _squared_errors(
    counts: NDArray[np.float64],
    zeros: NDArray[np.float64],
    edges: NDArray[np.float64],
    lo: NDArray[np.float64],
    hi: NDArray[np.float64],
    bits: int,
) -> NDArray[np.float64]:
    """Expected squared quantization error per cluster with the grid of range [lo, hi].

    Values are taken as uniform inside each bin, so a bin's error is its count times the mean
    of the squared error over the bin (closed form), which stays right whether bins are
    narrower or wider than the grid step; exact zeros add their own error.
    """
    scale, zero = affine_params(lo, hi, bits)
    qmin, qmax = grid_bounds(bits)
    step = scale.astype(np.float64)[:, None]
    z = zero.astype(np.float64)[:, None]
    low, high = (qmin - z) * step, (qmax - z) * step
    integral = _error_integral(edges, step, low, high)  # [K, B + 1] at the bin edges
    mean = np.diff(integral, axis=1) / (edges[:, 1:] - edges[:, :-1])
    at_zero = (np.maximum(low - 0.0, 0.0) + np.maximum(0.0 - high, 0.0))[:, 0] ** 2
    return (counts * mean).sum(axis=1) + zeros * at_zero


def _median(
    counts: NDArray[np.float64],
    zeros: NDArray[np.float64],
    left_edges: NDArray[np.float64],
    width: NDArray[np.float64],
    lo: NDArray[np.float64],
    hi: NDArray[np.float64],
) -> NDArray[np.float64]:
    """Approximate median per cluster (bin centre; zeros counted at 0): where clips shrink to.

    Shrinking towards the midpoint of [lo, hi] would miss the best range whenever one tail is
    longer than the other (OPT's one-signed outlier channels); the bulk sits at the median.
    """
    clusters = counts.shape[0]
    rows = np.arange(clusters)
    zero_bin = np.clip(np.floor(-lo / width), 0, counts.shape[1] - 1).astype(np.int64)
    with_zeros = counts.copy()
    with_zeros[rows, zero_bin] += zeros
    cumulative = np.cumsum(with_zeros, axis=1)
    half = cumulative[:, -1] / 2
    index = (cumulative >= half[:, None]).argmax(axis=1)
    median = left_edges[rows, index] + width / 2
    return np.clip(median, lo, hi)


def mse_ranges(
    counts: NDArray[np.integer],
    zeros: NDArray[np.integer],
    lo: NDArray[np.floating],
    hi: NDArray[np.floating],
    bits: int,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per-cluster clipped (lo, hi) minimising the histogram's quantization MSE.

    counts [K, B]: non-zero values per bin over [lo, hi]; zeros [K]: exact zeros.
    """
    lo64: NDArray[np.float64] = np.asarray(lo, dtype=np.float64)
    hi64: NDArray[np.float64] = np.asarray(hi, dtype=np.float64)
    return _search(np.asarray(counts, np.float64), np.asarray(zeros, np.float64), lo64, hi64, bits)


def _search(
    counts_f: NDArray[np.float64],
    zeros_f: NDArray[np.float64],
    lo: NDArray[np.float64],
    hi: NDArray[np.float64],
    bits: int,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    bins = counts_f.shape[1]
    width = np.where(hi > lo, (hi - lo) / bins, 1.0)[:, None]
    edges = lo[:, None] + np.arange(bins + 1, dtype=np.float64)[None, :] * width
    left_edges = edges[:, :-1]
    mid = _median(counts_f, zeros_f, left_edges, width[:, 0], lo, hi)
    left, right = mid - lo, hi - mid
    best_a = np.ones_like(lo)
    best_b = np.ones_like(lo)
    best = _squared_errors(counts_f, zeros_f, edges, lo, hi, bits)

    def consider(a: NDArray[np.float64], b: NDArray[np.float64]) -> None:
        nonlocal best
        err = _squared_errors(counts_f, zeros_f, edges, mid - a * left, mid + b * right, bits)
        better = err < best
        best = np.where(better, err, best)
        best_a[better] = a[better]
        best_b[better] = b[better]

    for t in SHRINKS[1:]:
        shrink = np.full_like(lo, t)
        consider(shrink, shrink)
    for _ in range(REFINE_ROUNDS):
        for t in SHRINKS:
            consider(np.full_like(lo, t), best_b.copy())
        for t in SHRINKS:
            consider(best_a.copy(), np.full_like(lo, t))
    degenerate = hi <= lo
    new_lo = np.where(degenerate, lo, mid - best_a * left)
    new_hi = np.where(degenerate, hi, mid + best_b * right)
    return new_lo, new_hi


def percentile_ranges(
    counts: NDArray[np.integer],
    zeros: NDArray[np.integer],
    lo: NDArray[np.floating],
    hi: NDArray[np.floating],
    percentile: float = PERCENTILE,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per-cluster (lo, hi) clipped at the lower and upper `percentile` of the values.

    A bound is the edge of the bin where the cumulative count crosses the tail mass, never
    inside [lo, hi]'s complement; exact zeros count at 0.
    """
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {percentile}")
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    bins = counts.shape[1]
    width = (hi - lo) / bins
    # fold the zeros into the bin holding 0 (the percentile only needs ranks)
    zero_bin = np.clip(np.floor(-lo / np.where(width > 0, width, 1.0)), 0, bins - 1).astype(int)
    counts = counts.copy()
    counts[np.arange(lo.shape[0]), zero_bin] += np.asarray(zeros, dtype=np.float64)
    total = counts.sum(axis=1)
    tail = total * (100.0 - percentile) / 100.0
    below = np.cumsum(counts, axis=1)
    above = np.cumsum(counts[:, ::-1], axis=1)
    # first bin whose cumulative count passes the tail: its lower edge (upper edge from above)
    first = (below > tail[:, None]).argmax(axis=1)
    last = bins - 1 - (above > tail[:, None]).argmax(axis=1)
    new_lo = lo + first * width
    new_hi = lo + (last + 1) * width
    degenerate = (hi <= lo) | (total == 0)
    return np.where(degenerate, lo, new_lo), np.where(degenerate, hi, new_hi)
