"""Binary-coding quantization (BCQ) of integer weight codes: GPTQT's second step.

GPTQT (docs/algorithms.md §5.2) first quantizes a weight row linearly to m bits, then re-codes
the integers as an n-bit binary code with offset, `q ≈ o + Σ_i a_i b_i`, b_i ∈ {−1, +1}. A row's
integer codes take at most 2^m distinct values, so the fit runs on the row's histogram of codes
(levels weighted by their counts), not on the weights: cheap enough to run for every row and
every candidate scale of the re-explore search.

Index convention (shared with the plan and the ONNX export): a BCQ index k ∈ [0, 2^n) selects
the signs b_i = +1 where bit i of k is set, −1 otherwise. `lookup[row, q − qmin]` is the index
each integer code maps to (its nearest BCQ level). Merging with the linear grid
`w = s (q − z)` gives pure BCQ on the weights, `ŵ = Σ_i α_i b_i + β` with α_i = s a_i and
β = s (o − z) (§5.2 step 3): the integer intermediate is then only provenance.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

MAX_ITERATIONS = 30  # alternating fit: assignment and least squares never raise the error
EXHAUSTIVE_MAX_LEVELS = 16  # n = 2 with up to 16 levels: every monotone partition (969) is tried
RIDGE = 1e-12  # relative Tikhonov term of the per-row least squares
_ROW_CHUNK = 4096  # rows per batched least-squares call (bounds memory on wide layers)


@dataclass(frozen=True)
class BcqFit:
    """Per-row BCQ of integer levels: `level(k) = offset + Σ_i a[:, i] sign_i(k)`."""

    offset: NDArray[np.float64]  # [rows]
    a: NDArray[np.float64]  # [rows, n], canonical: a[:, 0] >= a[:, 1] >= ... >= 0
    lookup: NDArray[np.int8]  # [rows, L]: integer level l -> BCQ index (nearest level)
    sse: NDArray[np.float64]  # [rows]: count-weighted squared error in integer units


def signs(n: int) -> NDArray[np.float64]:
    """[2^n, n] matrix of ±1: row k holds the plane signs of BCQ index k."""
    if not 1 <= n <= 7:
        raise ValueError(f"binary planes must be 1..7, got {n}")
    k = np.arange(2**n)[:, None]
    return np.where((k >> np.arange(n)[None, :]) & 1, 1.0, -1.0)


def bcq_levels(offset: NDArray[np.floating], a: NDArray[np.floating]) -> NDArray[np.float64]:
    """[rows, 2^n] level of every BCQ index."""
    return np.asarray(offset, np.float64)[:, None] + np.asarray(a, np.float64) @ signs(a.shape[1]).T


def planes_of(index: NDArray[np.integer], n: int) -> NDArray[np.int8]:
    """[n, *index.shape] sign planes (±1) of BCQ indices."""
    index = np.asarray(index)
    if index.size and (int(index.min()) < 0 or int(index.max()) >= 2**n):
        raise ValueError(f"BCQ index outside [0, {2**n})")
    bits = (index[None, ...] >> np.arange(n).reshape((n,) + (1,) * index.ndim)) & 1
    return np.where(bits == 1, 1, -1).astype(np.int8)


def index_of_planes(planes: NDArray[np.integer]) -> NDArray[np.int64]:
    """Inverse of `planes_of`: the BCQ index that [n, ...] sign planes spell."""
    planes = np.asarray(planes)
    if not np.all(np.abs(planes) == 1):
        raise ValueError("binary planes must hold only -1 and +1")
    weights = (1 << np.arange(planes.shape[0])).reshape((-1,) + (1,) * (planes.ndim - 1))
    return ((planes > 0).astype(np.int64) * weights).sum(axis=0)


def binary_weight(
    planes: NDArray[np.integer], alpha: NDArray[np.floating], beta: NDArray[np.floating], axis: int
) -> NDArray[np.float32]:
    """Σ_i α_i b_i + β in float32, summed plane by plane in index order.

    The ONNX graph adds its DequantizeLinear outputs in the same order (plane 0 + plane 1, then
    + plane 2, ..., then + β), so the reference weight and the graph's weight are bit-equal.
    `axis` is the output-channel axis of a plane (0 for [out, in], 1 for MatMul's [in, out]);
    alpha is [out, n] and beta [out].
    """
    planes = np.asarray(planes)
    if planes.ndim != 3 or alpha.shape != (planes.shape[1 + axis], planes.shape[0]):
        raise ValueError(f"planes {planes.shape} do not match alpha {alpha.shape} on axis {axis}")
    shape = [1, 1]
    shape[axis] = -1
    alpha32 = np.asarray(alpha, np.float32)
    out = planes[0].astype(np.float32) * alpha32[:, 0].reshape(shape)
    for i in range(1, planes.shape[0]):
        out = out + planes[i].astype(np.float32) * alpha32[:, i].reshape(shape)
    return (out + np.asarray(beta, np.float32).reshape(shape)).astype(np.float32)


def code_histogram(codes: NDArray[np.integer], qmin: int, levels: int) -> NDArray[np.float64]:
    """[rows, levels] count of each integer code per row (code q in column q − qmin)."""
    codes = np.asarray(codes, np.int64) - qmin
    if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= levels):
        raise ValueError(f"codes outside [{qmin}, {qmin + levels})")
    rows = codes.shape[0]
    flat = codes + (np.arange(rows)[:, None] * levels)
    return np.bincount(flat.ravel(), minlength=rows * levels).reshape(rows, levels).astype(float)


def _solve_rows(
    hist: NDArray[np.float64], values: NDArray[np.float64], design: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Weighted least squares per row: θ minimising Σ_l h_l (v_l − design_l · θ)².

    `design` is [rows, L, n+1]. Rank-deficient rows (fewer occupied levels than parameters) get
    a ridge of RIDGE × the mean diagonal: close to the minimum-norm solution, and a batched
    solve is an order of magnitude faster than a batched pseudo-inverse.
    """
    weighted = design * hist[..., None]
    normal = np.einsum("rli,rlj->rij", weighted, design)
    rhs = np.einsum("rli,l->ri", weighted, values)
    size = normal.shape[-1]
    ridge = RIDGE * np.trace(normal, axis1=1, axis2=2)[:, None, None] / size
    return np.linalg.solve(normal + ridge * np.eye(size), rhs[..., None])[..., 0]


def _assign(
    values: NDArray[np.float64], offset: NDArray[np.float64], a: NDArray[np.float64]
) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Nearest BCQ index of every level (ties to the lower index) and its squared error."""
    levels = bcq_levels(offset, a)  # [rows, K]
    dist = (values[None, :, None] - levels[:, None, :]) ** 2  # [rows, L, K]
    index = dist.argmin(axis=2)
    return index, np.take_along_axis(dist, index[..., None], axis=2)[..., 0]


def _canonical(
    offset: NDArray[np.float64], a: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """|a| sorted descending: flipping a plane's sign or reordering planes keeps the level set."""
    return offset, -np.sort(-np.abs(a), axis=1)


def _alternate(
    hist: NDArray[np.float64],
    values: NDArray[np.float64],
    offset: NDArray[np.float64],
    a: NDArray[np.float64],
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Alternate nearest-level assignment and least squares (§5.1) until assignments settle."""
    sign_matrix = signs(a.shape[1])
    previous = None
    for _ in range(MAX_ITERATIONS):
        index, _ = _assign(values, offset, a)
        if previous is not None and np.array_equal(index, previous):
            break
        previous = index
        design = np.concatenate([np.ones(index.shape + (1,)), sign_matrix[index]], axis=2)
        theta = _solve_rows(hist, values, design)
        offset, a = theta[:, 0], theta[:, 1:]
    return _canonical(offset, a)


def _initial_guesses(
    hist: NDArray[np.float64], values: NDArray[np.float64], n: int
) -> list[tuple[NDArray[np.float64], NDArray[np.float64]]]:
    """Uniform n-bit grid over the occupied range, and greedy BCQ (§5.1) of the histogram."""
    occupied = hist > 0
    lo = np.where(occupied, values[None, :], np.inf).min(axis=1)
    hi = np.where(occupied, values[None, :], -np.inf).max(axis=1)
    step = (hi - lo) / (2**n - 1)
    uniform_a = step[:, None] * (2.0 ** np.arange(n))[None, ::-1] / 2
    guesses = [((hi + lo) / 2, uniform_a)]
    total = hist.sum(axis=1)
    mean = (hist * values[None, :]).sum(axis=1) / total
    residual = values[None, :] - mean[:, None]
    greedy = np.empty((hist.shape[0], n))
    for i in range(n):
        greedy[:, i] = (hist * np.abs(residual)).sum(axis=1) / total
        residual = residual - greedy[:, i : i + 1] * np.where(residual >= 0, 1.0, -1.0)
    guesses.append((mean, greedy))
    return guesses


def _monotone_partitions(levels: int, groups: int) -> NDArray[np.int64]:
    """[P, levels] group of each sorted level, for every split into `groups` ordered runs."""
    rows = []
    for cuts in itertools.combinations_with_replacement(range(levels + 1), groups - 1):
        bounds = (0, *cuts, levels)
        rows.append(np.repeat(np.arange(groups), np.diff(bounds)))
    return np.array(rows, dtype=np.int64)


def _exhaustive_two_planes(
    hist: NDArray[np.float64], values: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Optimal 2-plane BCQ with offset: try every monotone assignment of the sorted levels.

    With a_1 >= a_2 >= 0 the four levels are always ordered o−a1−a2 <= o−a1+a2 <= o+a1−a2 <=
    o+a1+a2 (indices 0, 2, 1, 3), so an optimal nearest assignment is a split of the sorted
    integer levels into four consecutive runs; least squares on each split and the best one is
    the global optimum.
    """
    order = np.array([0, 2, 1, 3])  # sorted level position -> BCQ index
    sign_matrix = signs(2)
    best_cost = np.full(hist.shape[0], np.inf)
    best = np.zeros((hist.shape[0], 3))
    for groups in _monotone_partitions(values.shape[0], 4):
        design_one = np.concatenate([np.ones((values.shape[0], 1)), sign_matrix[order[groups]]], 1)
        design = np.broadcast_to(design_one, (hist.shape[0],) + design_one.shape)
        theta = _solve_rows(hist, values, design)
        cost = (hist * (values[None, :] - theta @ design_one.T) ** 2).sum(axis=1)
        better = cost < best_cost
        best_cost = np.where(better, cost, best_cost)
        best[better] = theta[better]
    return _canonical(best[:, 0], best[:, 1:])


def fit_bcq(hist: NDArray[np.floating], values: NDArray[np.floating], n: int) -> BcqFit:
    """n-plane BCQ with offset of each row's integer levels, weighted by their counts.

    Two planes over at most EXHAUSTIVE_MAX_LEVELS levels are solved exactly (every monotone
    split); otherwise the best of two alternating fits (uniform and greedy starts) is kept.
    The final lookup is the nearest level of every integer level, so the error never exceeds
    that of the uniform n-bit grid over the occupied range (the first start).
    """
    counts: NDArray[np.float64] = np.asarray(hist, np.float64)
    levels: NDArray[np.float64] = np.asarray(values, np.float64)
    if counts.ndim != 2 or counts.shape[1] != levels.shape[0]:
        raise ValueError(f"histogram {counts.shape} does not match {levels.shape[0]} levels")
    if np.any(counts.sum(axis=1) <= 0):
        raise ValueError("every row needs at least one code")
    offsets, amplitudes, lookups, errors = [], [], [], []
    for start in range(0, counts.shape[0], _ROW_CHUNK):
        h = counts[start : start + _ROW_CHUNK]
        if n == 2 and levels.shape[0] <= EXHAUSTIVE_MAX_LEVELS:
            candidates = [_exhaustive_two_planes(h, levels)]
        else:
            candidates = [_alternate(h, levels, o, a) for o, a in _initial_guesses(h, levels, n)]
        best_sse = np.full(h.shape[0], np.inf)
        offset, a = np.zeros(h.shape[0]), np.zeros((h.shape[0], n))
        for cand_offset, cand_a in candidates:
            _, sq = _assign(levels, cand_offset, cand_a)
            sse = (h * sq).sum(axis=1)
            better = sse < best_sse
            best_sse = np.where(better, sse, best_sse)
            offset = np.where(better, cand_offset, offset)
            a = np.where(better[:, None], cand_a, a)
        index, _ = _assign(levels, offset, a)
        offsets.append(offset)
        amplitudes.append(a)
        lookups.append(index.astype(np.int8))
        errors.append(best_sse)
    return BcqFit(
        np.concatenate(offsets), np.concatenate(amplitudes), np.concatenate(lookups),
        np.concatenate(errors),
    )  # fmt: skip


def merge_with_grid(
    fit: BcqFit, scale: NDArray[np.floating], zero: NDArray[np.integer]
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """α [rows, n] and β [rows] of ŵ = Σ α_i b_i + β, from w = s (q − z) (§5.2 step 3)."""
    s = np.asarray(scale, np.float64)[:, None]
    alpha = (s * fit.a).astype(np.float32)
    beta = (s[:, 0] * (fit.offset - np.asarray(zero, np.float64))).astype(np.float32)
    return alpha, beta
