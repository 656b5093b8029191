"""Channel clustering: permutations, contiguity, canonical order, edge cases."""

import numpy as np
import pytest

from rptq.calib.cluster import cluster_channels, fixed_clusters
from rptq.errors import ConfigError
from rptq.plan import Granularity
from rptq.quant.clusters import (
    cluster_of_channel,
    expand_to_channels,
    expand_to_positions,
    inverse_permutation,
    is_block_diagonal,
    is_permutation,
    reduce_to_clusters,
)


def separated_points(rng, labels):
    centers = np.array([[1.0, -1.0], [10.0, -10.0], [100.0, -100.0]])
    return centers[labels] + rng.normal(scale=0.01, size=(len(labels), 2))


def test_permutation_makes_clusters_contiguous():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=40)
    perm, sizes = cluster_channels(separated_points(rng, labels), groups=1, k=3)
    assert is_permutation(perm, 40)
    assert sizes.sum() == 40
    assert (sizes >= 1).all()
    # reordered positions hold one true label per contiguous run
    runs = np.split(labels[perm], np.cumsum(sizes)[:-1])
    assert all(len(set(run)) == 1 for run in runs)
    # canonical order: ascending max (column 0), so the smallest-range cluster comes first
    assert [run[0] for run in runs] == [0, 1, 2]
    # channels inside a cluster keep ascending original index (stable)
    for run_perm in np.split(perm, np.cumsum(sizes)[:-1]):
        assert (np.diff(run_perm) > 0).all()


def test_per_head_clusters_never_cross_heads():
    rng = np.random.default_rng(1)
    points = rng.normal(size=(64, 4))
    perm, sizes = cluster_channels(points, groups=4, k=3)
    assert is_block_diagonal(perm, 16)
    assert len(sizes) == 12
    assert sizes.sum() == 64


def test_duplicate_points_give_fewer_clusters_not_empty_ones():
    points = np.zeros((10, 2))
    points[5:] = 1.0
    perm, sizes = cluster_channels(points, groups=1, k=4)
    assert sizes.tolist() == [5, 5]


def test_too_many_clusters_is_a_config_error():
    with pytest.raises(ConfigError, match="exceeds"):
        cluster_channels(np.zeros((8, 2)), groups=1, k=9)


def test_deterministic():
    rng = np.random.default_rng(2)
    points = rng.normal(size=(128, 2))
    a = cluster_channels(points, 1, 8)
    b = cluster_channels(points.copy(), 1, 8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_fixed_clusters():
    perm, sizes = fixed_clusters(6, Granularity.TENSOR)
    assert perm.tolist() == list(range(6))
    assert sizes.tolist() == [6]
    perm, sizes = fixed_clusters(6, Granularity.CHANNEL)
    assert sizes.tolist() == [1] * 6


def test_expand_and_reduce_are_consistent():
    perm = np.array([3, 0, 2, 1, 4])
    sizes = np.array([2, 3])
    values = np.array([10.0, 20.0])
    assert expand_to_positions(values, sizes).tolist() == [10, 10, 20, 20, 20]
    # original channel 3 and 0 are in cluster 0
    assert expand_to_channels(values, perm, sizes).tolist() == [10, 20, 20, 10, 20]
    assert cluster_of_channel(perm, sizes).tolist() == [0, 1, 1, 0, 1]
    lo, hi = reduce_to_clusters(np.arange(5.0), np.arange(5.0) + 1, perm, sizes)
    assert lo.tolist() == [0, 1]
    assert hi.tolist() == [4, 5]
    assert inverse_permutation(perm)[perm].tolist() == list(range(5))
