"""Channel clusters: a permutation plus the sizes of the contiguous runs it creates.

A reorder site stores `perm` (position i of the reordered tensor holds original channel
perm[i]) and `sizes` (cluster j covers reordered positions [offset_j, offset_j + sizes[j])).
Per-cluster quantization parameters are arrays of length len(sizes).
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

_Scalar = TypeVar("_Scalar", bound=np.generic)  # expansions keep the dtype they are given


def is_permutation(perm: NDArray[np.integer], length: int) -> bool:
    """True when perm holds each of 0..length-1 exactly once."""
    if perm.ndim != 1 or perm.shape[0] != length:
        return False
    seen = np.zeros(length, dtype=bool)
    if perm.min(initial=0) < 0 or perm.max(initial=-1) >= length:
        return False
    seen[perm] = True
    return bool(seen.all())


def inverse_permutation(perm: NDArray[np.integer]) -> NDArray[np.int64]:
    """inv such that x[:, perm][:, inv] == x."""
    inv = np.empty_like(perm, dtype=np.int64)
    inv[perm] = np.arange(perm.shape[0], dtype=np.int64)
    return inv


def cluster_of_position(sizes: NDArray[np.integer]) -> NDArray[np.int64]:
    """Cluster index of every reordered position."""
    return np.repeat(np.arange(sizes.shape[0], dtype=np.int64), sizes)


def cluster_of_channel(perm: NDArray[np.integer], sizes: NDArray[np.integer]) -> NDArray[np.int64]:
    """Cluster index of every original channel."""
    labels = np.empty(perm.shape[0], dtype=np.int64)
    labels[perm] = cluster_of_position(sizes)
    return labels


def expand_to_channels(
    values: NDArray[_Scalar], perm: NDArray[np.integer], sizes: NDArray[np.integer]
) -> NDArray[_Scalar]:
    """Per-cluster values as a per-channel vector in the original channel order."""
    return values[cluster_of_channel(perm, sizes)]


def expand_to_positions(values: NDArray[_Scalar], sizes: NDArray[np.integer]) -> NDArray[_Scalar]:
    """Per-cluster values as a per-channel vector in the reordered (contiguous) order."""
    return np.repeat(values, sizes)


def reduce_to_clusters(
    channel_min: NDArray[np.floating],
    channel_max: NDArray[np.floating],
    perm: NDArray[np.integer],
    sizes: NDArray[np.integer],
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Cluster min = min over its channels, cluster max = max over its channels."""
    labels = cluster_of_channel(perm, sizes)
    n = sizes.shape[0]
    cmin = np.full(n, np.inf)
    cmax = np.full(n, -np.inf)
    np.minimum.at(cmin, labels, channel_min.astype(np.float64))
    np.maximum.at(cmax, labels, channel_max.astype(np.float64))
    return cmin, cmax


def is_block_diagonal(perm: NDArray[np.integer], block: int) -> bool:
    """True when perm never moves a channel out of its block of `block` channels (its head)."""
    positions = np.arange(perm.shape[0])
    return bool(np.all(perm // block == positions // block))
