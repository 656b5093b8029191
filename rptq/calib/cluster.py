"""Cluster channels by their (max, min) ranges and derive RPTQ's reorder permutation.

RPTQ (reorder_utils.tensor_calc_reorder_index) runs KMeans on the raw per-channel points,
per head for R2/R3, and orders channels by label. rptq keeps the maths but makes the result
canonical [design, algorithms.md 2.4]: clusters are ordered by ascending centroid max (ties by
smallest channel index) and channels within a cluster keep ascending index, so the same data
gives byte-identical plans. Empty clusters cannot occur (k is clamped to the number of distinct
points), so sizes always sum to the channel count with every size >= 1.
"""

from __future__ import annotations

import warnings

import numpy as np
from numpy.typing import NDArray

from rptq.errors import ConfigError
from rptq.plan import Granularity

KMEANS_SEED = 0
KMEANS_INITS = 10


def _canonical_labels(labels: NDArray[np.int64], key: NDArray[np.float64]) -> NDArray[np.int64]:
    """Relabel clusters 0..k-1 by ascending mean key, ties by their smallest channel index."""
    present = np.unique(labels)
    order = sorted(
        present, key=lambda c: (float(key[labels == c].mean()), int(np.flatnonzero(labels == c)[0]))
    )
    remap = np.empty(int(present.max()) + 1, dtype=np.int64)
    remap[np.array(order)] = np.arange(len(order))
    return remap[labels]


def kmeans_labels(points: NDArray[np.float64], k: int) -> NDArray[np.int64]:
    """KMeans labels of `points` [n, D] (k clamped to the number of distinct points)."""
    n_distinct = len(np.unique(points, axis=0))
    k = min(k, n_distinct)
    if k <= 1:
        return np.zeros(points.shape[0], dtype=np.int64)
    from sklearn.cluster import KMeans

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on near-duplicate points
        model = KMeans(n_clusters=k, n_init=KMEANS_INITS, random_state=KMEANS_SEED)
        labels = model.fit_predict(points).astype(np.int64)
    return labels


def cluster_channels(
    points: NDArray[np.floating], groups: int, k: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Permutation and cluster sizes for channel `points` [C, D] split into `groups` blocks.

    Column 0 of `points` is the channel max: the canonical cluster order sorts by it.
    """
    channels = points.shape[0]
    if channels % groups:
        raise ConfigError(f"{channels} channels cannot be split into {groups} heads")
    if k < 1:
        raise ConfigError(f"cluster count must be >= 1, got {k}")
    size = channels // groups
    if k > size:
        raise ConfigError(
            f"--clusters {k} exceeds the {size} channels per group; use at most {size}"
        )
    perms, sizes = [], []
    for g in range(groups):
        block = np.asarray(points[g * size : (g + 1) * size], dtype=np.float64)
        labels = _canonical_labels(kmeans_labels(block, k), block[:, 0])
        perms.append(np.argsort(labels, kind="stable") + g * size)
        sizes.append(np.bincount(labels))
    return np.concatenate(perms).astype(np.int64), np.concatenate(sizes).astype(np.int64)


def fixed_clusters(
    channels: int, granularity: Granularity
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Identity permutation with one cluster (per tensor) or C clusters (per channel)."""
    perm = np.arange(channels, dtype=np.int64)
    if granularity is Granularity.TENSOR:
        return perm, np.array([channels], dtype=np.int64)
    return perm, np.ones(channels, dtype=np.int64)
