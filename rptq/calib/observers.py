"""Forward taps that record activation statistics during calibration.

Both are owned by the layer-wise runner for one layer and thrown away after it (no module-level
hook state). They observe and return the tensor unchanged.
"""

from __future__ import annotations

import torch

from rptq.plan import ActMetric
from rptq.points import Act

EMA_DECAY = 0.99  # RPTQ's ema_minmax: M <- 0.99 M + 0.01 m_row


def _channel_extremes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.detach().reshape(-1, x.shape[-1]).float()
    return flat.amin(dim=0), flat.amax(dim=0)


class ChannelRangeObserver:
    """Global per-channel min/max (over all rows and tokens) of selected activations.

    These are the clustering points of RPTQ (its reorder_utils: true global extremes, in fp32).
    """

    def __init__(self, acts: set[Act]) -> None:
        self.acts = acts
        self.min: dict[Act, torch.Tensor] = {}
        self.max: dict[Act, torch.Tensor] = {}

    def __call__(self, act: Act, x: torch.Tensor) -> torch.Tensor:
        """Record the range statistics of `act`; pass `x` through unchanged."""
        if act in self.acts:
            lo, hi = _channel_extremes(x)
            if act in self.min:
                torch.minimum(self.min[act], lo, out=self.min[act])
                torch.maximum(self.max[act], hi, out=self.max[act])
            else:
                self.min[act], self.max[act] = lo, hi
        return x

    def merge(self, other: ChannelRangeObserver) -> None:
        """Fold in the extremes another observer saw (other windows, any device): exact."""
        for act, lo in other.min.items():
            if act in self.min:
                device = self.min[act].device
                torch.minimum(self.min[act], lo.to(device), out=self.min[act])
                torch.maximum(self.max[act], other.max[act].to(device), out=self.max[act])
            else:
                self.min[act], self.max[act] = lo, other.max[act]


class ClusterRangeObserver:
    """Per-cluster activation ranges accumulated across calibration rows.

    Each call is one calibration row: per-channel extremes are reduced to cluster extremes
    first, then combined across rows with RPTQ's metric (the EMA of per-row cluster extremes
    for ema_minmax, the running extremes for minmax).
    """

    def __init__(self, labels: dict[Act, torch.Tensor], metric: ActMetric) -> None:
        self.labels = labels  # act -> cluster index of each channel (original order)
        self.metric = metric
        self.min: dict[Act, torch.Tensor] = {}
        self.max: dict[Act, torch.Tensor] = {}

    def __call__(self, act: Act, x: torch.Tensor) -> torch.Tensor:
        """Fold this window's cluster extremes of `act` into the running ranges."""
        extremes = self.cluster_extremes(act, x)
        if extremes is not None:
            self.update(act, *extremes)
        return x

    def cluster_extremes(
        self, act: Act, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One row's per-cluster (min, max) on x's device; None for an act without clusters."""
        labels = self.labels.get(act)
        if labels is None:
            return None
        lo, hi = _channel_extremes(x)
        n = int(labels.max()) + 1
        labels = labels.to(lo.device)
        cmin = torch.full((n,), float("inf"), device=lo.device).scatter_reduce(
            0, labels, lo, reduce="amin"
        )
        cmax = torch.full((n,), float("-inf"), device=hi.device).scatter_reduce(
            0, labels, hi, reduce="amax"
        )
        return cmin, cmax

    def update(self, act: Act, cmin: torch.Tensor, cmax: torch.Tensor) -> None:
        """Combine one row's cluster extremes with the rows before it (order matters for EMA)."""
        if act not in self.min:
            self.min[act], self.max[act] = cmin, cmax
        elif self.metric is ActMetric.EMA_MINMAX:
            self.min[act] = EMA_DECAY * self.min[act] + (1 - EMA_DECAY) * cmin
            self.max[act] = EMA_DECAY * self.max[act] + (1 - EMA_DECAY) * cmax
        else:
            self.min[act] = torch.minimum(self.min[act], cmin)
            self.max[act] = torch.maximum(self.max[act], cmax)
