"""RPTQ's grid maths against hand-computed values."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rptq.errors import ConfigError
from rptq.quant.qparams import (
    affine_params,
    container_bits,
    fake_quant,
    floor_cluster_ranges,
    grid_bounds,
    quantize,
    quantize_rows,
)


def test_grid_bounds():
    assert grid_bounds(4) == (-8, 7)
    assert grid_bounds(3) == (-4, 3)
    assert grid_bounds(8) == (-128, 127)
    with pytest.raises(ConfigError):
        grid_bounds(9)


def test_symmetric_range_4bit_by_hand():
    scale, zero = affine_params(np.array([-1.0]), np.array([1.0]), 4)
    assert scale[0] == np.float32(0.125)
    assert zero[0] == 0
    x = np.array([0.3, 1.0, -1.0, 0.0625])
    # 0.3/0.125 = 2.4 -> 2; 1.0 -> 8 clamps to 7 (top of range is one step below xmax);
    # -1 -> -8; 0.0625/0.125 = 0.5 -> 0 (half to even)
    np.testing.assert_array_equal(quantize(x, scale, zero, 4), [2, 7, -8, 0])
    np.testing.assert_array_equal(fake_quant(x, scale, zero, 4), [0.25, 0.875, -1.0, 0.0])


def test_asymmetric_range_2bit_by_hand():
    scale, zero = affine_params(np.array([0.0]), np.array([3.0]), 2)
    assert scale[0] == np.float32(0.75)
    assert zero[0] == -2
    x = np.array([0.0, 1.0, 3.0])
    np.testing.assert_array_equal(quantize(x, scale, zero, 2), [-2, -1, 1])
    np.testing.assert_allclose(fake_quant(x, scale, zero, 2), [0.0, 0.75, 2.25])


def test_constant_channel_is_reproduced():
    # RPTQ clamps s to 1e-4 and loses constant channels; rptq widens the range instead.
    for value in (5.0, -5.0, 0.0, 1e-3):
        scale, zero = affine_params(np.array([value]), np.array([value]), 4)
        got = fake_quant(np.array([value]), scale, zero, 4)[0]
        assert abs(got - value) <= float(scale[0]), (value, got)
        assert abs(int(zero[0])) <= 32767


@settings(max_examples=200, deadline=None)
@given(
    lo=st.floats(-1e3, 1e3),
    width=st.floats(1e-3, 1e3),
    bits=st.sampled_from([2, 3, 4, 8]),
    frac=st.floats(0, 1),
)
def test_values_inside_range_are_within_one_and_a_half_steps(lo, width, bits, frac):
    hi = lo + width
    scale, zero = affine_params(np.array([lo]), np.array([hi]), bits)
    x = np.array([lo + frac * width])
    err = abs(fake_quant(x, scale, zero, bits)[0] - x[0])
    # The grid covers [(qmin - z) s, (qmax - z) s]: one step is lost at the top (step is
    # range / 2^b) and rounding z shifts the grid by up to half a step, so 1.5 steps at worst.
    assert err <= 1.5 * scale[0] * (1 + 1e-5) + 1e-6 * max(1.0, abs(x[0]))
    assert abs(int(zero[0])) <= 32767


def test_container_bits():
    assert container_bits(np.array([-8, 7]), 4) == 4
    assert container_bits(np.array([8]), 4) == 8
    assert container_bits(np.array([0]), 8) == 8
    assert container_bits(np.array([-300]), 8) == 16


def test_quantize_rows_matches_per_row_params():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 16)).astype(np.float32)
    codes, scale, zero = quantize_rows(w, 4)
    assert codes.dtype == np.int8
    assert codes.shape == w.shape
    for r in range(5):
        s, z = affine_params(w[r].min(keepdims=True), w[r].max(keepdims=True), 4)
        assert scale[r] == s[0]
        assert zero[r] == z[0]
        np.testing.assert_array_equal(codes[r], quantize(w[r], s, z, 4))


def test_cluster_range_floor_widens_only_ranges_below_it():
    """floor_cluster_ranges: ranges whose scale is >= the widest range / 2^16 come back bit for
    bit; a dead one (and a near-dead one) is widened about its midpoint to exactly that."""
    lo = np.array([-1.3, 0.0, 0.0, 0.01, 0.2])
    hi = np.array([2.1, 0.0, 1e-3, 0.03, 0.2 + 3.4 / 200])
    for bits, floored in ((8, [1, 2]), (4, [1])):
        new_lo, new_hi = floor_cluster_ranges(lo, hi, bits)
        floor = 3.4 * 2**bits / 2**16
        live = [i for i in range(5) if i not in floored]
        np.testing.assert_array_equal(new_lo[live], lo[live])
        np.testing.assert_array_equal(new_hi[live], hi[live])
        np.testing.assert_allclose(new_hi[floored] - new_lo[floored], floor, rtol=1e-12)
        np.testing.assert_allclose((new_hi + new_lo)[floored], (hi + lo)[floored], atol=1e-15)
        scale, _ = affine_params(new_lo, new_hi, bits)
        assert scale.min() >= 3.4 / 2**16 * (1 - 1e-6)
    one_lo, one_hi = floor_cluster_ranges(lo[:1], hi[:1], 4)  # per tensor: unchanged
    assert one_lo[0] == lo[0]
    assert one_hi[0] == hi[0]
