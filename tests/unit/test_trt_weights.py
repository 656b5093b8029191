"""rptq.quant.trt_weights: the TensorRT variant's fold and weight maths on seeded tensors."""

import numpy as np
import pytest

from rptq.quant.qparams import dequantize, quantize_rows
from rptq.quant.trt_weights import (
    fold_bias,
    fold_float_rows,
    fold_layernorm_affine,
    int4_block_scales,
    requantize_folded,
    scale_groups,
    shift_plan_codes,
    symmetric_max,
    trt_weight,
)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_requantized_codes_are_symmetric_and_within_half_a_step(rng, bits):
    weight = rng.normal(size=(16, 32)).astype(np.float32)
    in_scale = rng.uniform(0.01, 1.0, 32).astype(np.float32)
    codes, scale = requantize_folded(weight, in_scale, bits)
    qmax = symmetric_max(bits)
    assert codes.dtype == np.int8
    assert codes.min() >= -qmax
    assert codes.max() <= qmax
    assert np.all(np.abs(codes).max(axis=1) == qmax)  # the row maximum uses the whole grid
    folded = weight * in_scale[None, :]
    error = np.abs(codes * scale[:, None] - folded) / scale[:, None]
    assert error.max() <= 0.5 + 1e-5


def test_requantization_does_not_depend_on_channel_order(rng):
    """The graph quantizes in folded order, the reference in the model's: same codes."""
    weight = rng.normal(size=(12, 20)).astype(np.float32)
    in_scale = rng.uniform(0.01, 1.0, 20).astype(np.float32)
    rows, cols = rng.permutation(12), rng.permutation(20)
    codes, scale = requantize_folded(weight, in_scale, 4)
    codes_p, scale_p = requantize_folded(weight[np.ix_(rows, cols)], in_scale[cols], 4)
    np.testing.assert_array_equal(codes_p, codes[np.ix_(rows, cols)])
    np.testing.assert_array_equal(scale_p, scale[rows])


def test_an_all_zero_row_gets_a_positive_scale():
    codes, scale = requantize_folded(np.zeros((2, 4), np.float32), None, 4)
    assert not codes.any()
    assert np.all(scale > 0)


def test_shifted_plan_codes_are_the_plan_weight_exactly(rng):
    weight = rng.normal(size=(8, 16)).astype(np.float32) + 0.3
    codes, scale, zero = quantize_rows(weight, 4)
    shifted = shift_plan_codes(codes, zero)
    assert shifted is not None
    np.testing.assert_array_equal(
        shifted.astype(np.float32) * scale[:, None],
        dequantize(codes, scale[:, None], zero[:, None]),
    )


def test_shifted_codes_outside_int8_are_refused():
    codes = np.zeros((1, 4), np.int8)
    assert shift_plan_codes(codes, np.array([200], np.int32)) is None


def test_trt_weight_keeps_plan_codes_without_an_input_fold(rng):
    weight = rng.normal(size=(8, 16)).astype(np.float32)
    codes, scale, zero = quantize_rows(weight, 4)
    symmetric = trt_weight(weight, codes, scale, zero, 4, None)
    assert not symmetric.requantized
    np.testing.assert_array_equal(
        symmetric.values(), dequantize(codes, scale[:, None], zero[:, None])
    )


def test_trt_weight_requantizes_the_folded_weight(rng):
    weight = rng.normal(size=(8, 16)).astype(np.float32)
    codes, scale, zero = quantize_rows(weight, 4)
    in_scale = rng.uniform(0.01, 1.0, 16).astype(np.float32)
    symmetric = trt_weight(weight, codes, scale, zero, 4, in_scale, groups=1)
    assert symmetric.requantized
    assert symmetric.group_of is None
    np.testing.assert_allclose(
        symmetric.values() * in_scale[None, :], symmetric.folded_values(), rtol=1e-6
    )
    np.testing.assert_array_equal(symmetric.codes, requantize_folded(weight, in_scale, 4)[0])


def test_scale_groups_cut_at_the_widest_gaps_in_log_scale():
    s = np.array([0.1, 3.0, 0.1, 0.12, 2.5, 0.3, 3.0], np.float32)  # 0.3 -> 2.5: widest
    np.testing.assert_array_equal(scale_groups(s, 2), [0, 1, 0, 0, 1, 0, 1])
    np.testing.assert_array_equal(scale_groups(s, 3), [0, 2, 0, 0, 2, 1, 2])  # then 0.12 -> 0.3
    np.testing.assert_array_equal(scale_groups(s, 1), np.zeros(7))
    np.testing.assert_array_equal(scale_groups(np.full(4, 0.5, np.float32), 2), np.zeros(4))
    perm = np.array([3, 6, 0, 5, 1, 4, 2])  # by value only: any channel order agrees
    np.testing.assert_array_equal(scale_groups(s[perm], 2), scale_groups(s, 2)[perm])


def test_grouped_requantization_scales_each_group_on_its_own(rng):
    """An outlier cluster's columns no longer set the scale of the other columns' codes."""
    weight = rng.normal(size=(8, 16)).astype(np.float32)
    codes, scale, zero = quantize_rows(weight, 4)
    in_scale = np.where(np.arange(16) < 3, 40.0, 1.0).astype(np.float32)  # 3 wide channels
    symmetric = trt_weight(weight, codes, scale, zero, 4, in_scale)  # two distinct scales: 2 groups
    assert symmetric.group_of is not None
    assert symmetric.scale.shape == (2, 8)
    np.testing.assert_array_equal(symmetric.group_of, (np.arange(16) < 3).astype(np.int64))
    narrow = requantize_folded(weight[:, 3:], in_scale[3:], 4)
    np.testing.assert_array_equal(symmetric.codes[:, 3:], narrow[0])
    np.testing.assert_array_equal(symmetric.scale[0], narrow[1])
    one_scale = trt_weight(weight, codes, scale, zero, 4, in_scale, groups=1).values()
    error = np.abs(symmetric.values() - weight)[:, 3:].mean()
    assert error < 0.5 * np.abs(one_scale - weight)[:, 3:].mean()


def test_layernorm_fold_writes_x_over_s_plus_z(rng):
    normed = rng.normal(size=(5, 8))
    gamma, beta = rng.normal(size=8), rng.normal(size=8)
    scale, zero = rng.uniform(0.01, 0.1, 8), rng.integers(-8, 8, 8)
    new_gamma, new_beta = fold_layernorm_affine(gamma, beta, scale, zero)
    np.testing.assert_allclose(
        normed * new_gamma + new_beta, (normed * gamma + beta) / scale + zero, rtol=1e-9
    )


def test_linear_fold_maps_codes_to_the_next_activation(rng):
    """C·(F·c) + b' == ((s∘(C − z))·W + b)·c + z_out: the exact identity of the consumer fold."""
    codes_in = rng.integers(-8, 8, (5, 6)).astype(np.float64)
    weight = rng.normal(size=(6, 4))
    bias = rng.normal(size=4)
    in_scale, in_zero = rng.uniform(0.01, 0.1, 6), rng.integers(-8, 8, 6)
    factor, offset = rng.uniform(1.0, 10.0, 4), rng.integers(-8, 8, 4)
    folded = fold_float_rows(weight, in_scale)
    new_bias = fold_bias(bias, folded, in_zero, factor, offset)
    got = codes_in @ (folded * factor[None, :]) + new_bias
    x_hat = in_scale * (codes_in - in_zero)
    np.testing.assert_allclose(got, (x_hat @ weight + bias) * factor + offset, rtol=1e-9)


def test_int4_block_scales_repeat_the_channel_scale():
    scale = np.arange(1, 4, dtype=np.float32)
    blocks = int4_block_scales(scale, 128, 64)
    assert blocks.shape == (2, 3)
    np.testing.assert_array_equal(blocks[1], scale)
    with pytest.raises(ValueError, match="multiple"):
        int4_block_scales(scale, 100, 64)
