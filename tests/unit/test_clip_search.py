"""Clipped activation ranges from histograms (`mse`, `percentile`): the search and its merge."""

import numpy as np
import pytest
import torch

from rptq.calib.range_search import ClusterHistogram, bins_for
from rptq.points import Act
from rptq.quant.clip_search import mse_ranges, percentile_ranges
from rptq.quant.qparams import affine_params, fake_quant


def _histogram(values: np.ndarray, lo: float, hi: float, bins: int) -> tuple[np.ndarray, int]:
    nonzero = values[values != 0]
    index = np.clip(np.floor((nonzero - lo) / ((hi - lo) / bins)), 0, bins - 1).astype(int)
    return np.bincount(index, minlength=bins)[None, :], int((values == 0).sum())


def _mse(values: np.ndarray, lo: float, hi: float, bits: int) -> float:
    scale, zero = affine_params(np.array([lo]), np.array([hi]), bits)
    return float(((fake_quant(values, scale, zero, bits) - values) ** 2).mean())


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_mse_range_beats_minmax_on_heavy_tails_and_is_near_the_true_optimum(bits):
    rng = np.random.default_rng(0)
    values = rng.standard_t(df=3, size=50_000)
    lo, hi = float(values.min()), float(values.max())
    counts, zeros = _histogram(values, lo, hi, 2048)
    new_lo, new_hi = mse_ranges(counts, np.array([zeros]), np.array([lo]), np.array([hi]), bits)
    searched = _mse(values, new_lo[0], new_hi[0], bits)
    minmax = _mse(values, lo, hi, bits)
    assert searched < (0.8 if bits <= 4 else 1.0) * minmax  # minmax wastes the grid on the tail
    # exhaustive symmetric scan on the raw values: the histogram search is within 2 % of it
    best = min(_mse(values, -t, t, bits) for t in np.linspace(0.5, max(-lo, hi), 200))
    assert searched <= 1.02 * best
    assert lo <= new_lo[0] < new_hi[0] <= hi


def test_mse_keeps_the_range_of_uniform_values_and_zeros_are_exact():
    values = np.concatenate([np.linspace(0, 1, 10_001), np.zeros(20_000)])  # ReLU-like
    counts, zeros = _histogram(values, 0.0, 1.0, 2048)
    new_lo, new_hi = mse_ranges(counts, np.array([zeros]), np.zeros(1), np.ones(1), 8)
    assert new_lo[0] == 0.0  # clipping the bottom would move every zero
    assert new_hi[0] > 0.95


def test_percentile_clips_the_tails_only():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.uniform(-1, 1, 1_000_000), [-50.0, 80.0]])
    counts, zeros = _histogram(values, -50.0, 80.0, 2048)
    lo, hi = percentile_ranges(counts, np.array([zeros]), np.array([-50.0]), np.array([80.0]))
    width = 130 / 2048
    assert -1 - width <= lo[0] <= -1 + width
    assert 1 - width <= hi[0] <= 1 + width


def test_degenerate_clusters_keep_their_range():
    counts = np.zeros((2, 64), dtype=np.int64)
    counts[1, 10] = 5
    lo, hi = np.array([3.0, -1.0]), np.array([3.0, 1.0])
    new_lo, new_hi = mse_ranges(counts, np.zeros(2, dtype=np.int64), lo, hi, 4)
    assert (new_lo[0], new_hi[0]) == (3.0, 3.0)
    new_lo, new_hi = percentile_ranges(counts, np.zeros(2, dtype=np.int64), lo, hi)
    assert (new_lo[0], new_hi[0]) == (3.0, 3.0)


def test_histogram_counts_merge_exactly_in_any_split():
    rows = torch.randn(6, 1, 32, 16, generator=torch.Generator().manual_seed(0)) * 3
    rows[rows.abs() < 0.3] = 0.0
    labels = {Act.FC2_IN: torch.arange(16) % 3}
    flat = rows.reshape(-1, 16)
    lo = {Act.FC2_IN: torch.stack([flat[:, labels[Act.FC2_IN] == c].min() for c in range(3)])}
    hi = {Act.FC2_IN: torch.stack([flat[:, labels[Act.FC2_IN] == c].max() for c in range(3)])}
    one = ClusterHistogram(labels, lo, hi)
    for row in rows:
        one(Act.FC2_IN, row)
    merged = ClusterHistogram(labels, lo, hi)
    for shard in torch.tensor_split(rows, 4):
        part = ClusterHistogram(labels, lo, hi)
        for row in shard:
            part(Act.FC2_IN, row)
        merged.merge(part)
    assert torch.equal(one.counts[Act.FC2_IN], merged.counts[Act.FC2_IN])
    assert torch.equal(one.zeros[Act.FC2_IN], merged.zeros[Act.FC2_IN])
    assert int(one.counts[Act.FC2_IN].sum() + one.zeros[Act.FC2_IN].sum()) == rows.numel()


def test_bins_stay_within_the_budget():
    assert bins_for(32) == 2048
    assert bins_for(16384) * 16384 <= 1 << 20
    assert bins_for(1024) == 64
    assert bins_for(1) == 2048
