"""Activation metrics that search a clipped range per cluster (`mse`, `percentile`).

They need the calibration values, not only their extremes. Keeping the rows would cost
N x T x C floats per activation; instead a second pass over the windows (same float layer, same
inputs as the range pass) fills a histogram per cluster over the cluster's global [lo, hi] from
the minmax pass. Memory is bounded per activation and per layer (at most `HISTOGRAM_BINS_BUDGET`
int64 counts, so 0.5 MiB, whatever the window count; the layer-by-layer loop drops them after the
layer), and counts add exactly, so a sharded calibration merges to the single-device plan byte
for byte. The search itself is `rptq.quant.clip_search` (numpy, float64, CPU).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rptq.calib.observers import ClusterRangeObserver
from rptq.calib.shards import Shard, on_each
from rptq.model.forward import LayerWeights
from rptq.model.shape import OptShape
from rptq.plan import ActMetric, Recipe
from rptq.points import Act
from rptq.quant.clip_search import mse_ranges, percentile_ranges

SEARCHED_METRICS = frozenset({ActMetric.MSE, ActMetric.PERCENTILE})
MAX_BINS = 2048  # per cluster: at A8 and a range clipped to half, about 4 bins per grid step
MIN_BINS = 64
HISTOGRAM_BINS_BUDGET = 1 << 16  # per activation: clusters x bins (per-channel gets fewer bins)


def bins_for(clusters: int) -> int:
    """Bins per cluster within the per-activation budget."""
    return max(MIN_BINS, min(MAX_BINS, HISTOGRAM_BINS_BUDGET // max(clusters, 1)))


class ClusterHistogram:
    """A tap counting each cluster's values in equal bins over its [lo, hi]; zeros apart."""

    def __init__(
        self,
        labels: dict[Act, torch.Tensor],
        lo: dict[Act, torch.Tensor],
        hi: dict[Act, torch.Tensor],
    ) -> None:
        self.labels = labels
        self.lo = lo
        self.hi = hi
        self.bins = {act: bins_for(int(lo[act].numel())) for act in lo}
        self.counts: dict[Act, torch.Tensor] = {}
        self.zeros: dict[Act, torch.Tensor] = {}

    def __call__(self, act: Act, x: torch.Tensor) -> torch.Tensor:
        """Count this window's values of `act` into its clusters' bins; pass `x` through."""
        if act not in self.lo:
            return x
        flat = x.detach().reshape(-1, x.shape[-1]).double()
        device = flat.device
        labels = self.labels[act].to(device)
        lo = self.lo[act].to(device).double()[labels]
        hi = self.hi[act].to(device).double()[labels]
        clusters, bins = self.lo[act].numel(), self.bins[act]
        width = torch.where(hi > lo, (hi - lo) / bins, torch.ones_like(lo))
        index = ((flat - lo) / width).floor().clamp_(0, bins - 1).long() + labels * bins
        nonzero = flat != 0
        counts = torch.bincount(index[nonzero], minlength=clusters * bins)
        zeros = torch.bincount(labels.expand_as(flat)[~nonzero], minlength=clusters)
        if act in self.counts:
            self.counts[act] += counts.cpu()
            self.zeros[act] += zeros.cpu()
        else:
            self.counts[act], self.zeros[act] = counts.cpu(), zeros.cpu()
        return x

    def merge(self, other: ClusterHistogram) -> None:
        """Add another histogram's counts (integers: exact in any order)."""
        for act, counts in other.counts.items():
            if act in self.counts:
                self.counts[act] += counts
                self.zeros[act] += other.zeros[act]
            else:
                self.counts[act], self.zeros[act] = counts, other.zeros[act]


def search_ranges(
    shards: Sequence[Shard],
    weights: LayerWeights,
    shape: OptShape,
    observer: ClusterRangeObserver,
    recipe: Recipe,
) -> None:
    """Replace the observer's minmax ranges by the recipe's searched ranges (second pass)."""
    if not observer.min:
        return
    lo = {act: value.cpu() for act, value in observer.min.items()}
    hi = {act: value.cpu() for act, value in observer.max.items()}

    def work(shard: Shard) -> ClusterHistogram:
        histogram = ClusterHistogram(observer.labels, lo, hi)
        shard.run(weights, shape, histogram)
        return histogram

    merged, *others = on_each(shards, work)
    for other in others:
        merged.merge(other)
    for act in lo:
        clusters = lo[act].numel()
        if act not in merged.counts:
            continue
        counts = merged.counts[act].numpy().reshape(clusters, merged.bins[act])
        zeros = merged.zeros[act].numpy()
        low, high = lo[act].double().numpy(), hi[act].double().numpy()
        if recipe.act_metric is ActMetric.MSE:
            new_lo, new_hi = mse_ranges(counts, zeros, low, high, recipe.bits_of(act))
        else:
            new_lo, new_hi = percentile_ranges(counts, zeros, low, high)
        device = observer.min[act].device
        observer.min[act] = torch.from_numpy(np.ascontiguousarray(new_lo)).to(device)
        observer.max[act] = torch.from_numpy(np.ascontiguousarray(new_hi)).to(device)
