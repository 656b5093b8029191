"""rptq.quant.fold: each fold against the direct formula it stands for (docs/algorithms.md §1.1)."""

from __future__ import annotations

import numpy as np
import pytest

from rptq.quant.clusters import inverse_permutation
from rptq.quant.fold import (
    permute_layernorm,
    permute_matmul_cols,
    permute_matmul_rows,
    permute_weight_codes,
)
from rptq.quant.qparams import dequantize, quantize_rows

RTOL = 1e-6  # tests/README: float folds use rtol=1e-6 (the folds only reorder sums)
ATOL = 1e-6
ONES3 = np.ones(3)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _layernorm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * gamma + beta


def test_permute_layernorm_matches_gathered_input(rng: np.random.Generator) -> None:
    x = rng.standard_normal((5, 32))
    gamma, beta = rng.standard_normal(32), rng.standard_normal(32)
    perm = rng.permutation(32)
    g2, b2 = permute_layernorm(gamma, beta, perm)
    np.testing.assert_allclose(
        _layernorm(x[:, perm], g2, b2), _layernorm(x, gamma, beta)[:, perm], rtol=RTOL, atol=ATOL
    )


def test_permute_matmul_rows_cancels_input_permutation(rng: np.random.Generator) -> None:
    x, w = rng.standard_normal((7, 24)), rng.standard_normal((24, 40))
    perm = rng.permutation(24)
    folded = x[:, perm] @ permute_matmul_rows(w, perm)
    np.testing.assert_allclose(folded, x @ w, rtol=RTOL, atol=ATOL)


def test_permute_matmul_cols_permutes_output(rng: np.random.Generator) -> None:
    x, w, b = rng.standard_normal((7, 24)), rng.standard_normal((24, 40)), rng.standard_normal(40)
    perm = rng.permutation(40)
    w2, b2 = permute_matmul_cols(w, b, perm)
    np.testing.assert_allclose(x @ w2 + b2, (x @ w + b)[:, perm], rtol=RTOL, atol=ATOL)


def test_chained_folds_are_exact_through_relu(rng: np.random.Generator) -> None:
    """fc1 columns and fc2 rows by the same perm (R5): ReLU is elementwise, so it commutes."""
    x = rng.standard_normal((6, 16))
    w1, b1 = rng.standard_normal((16, 64)), rng.standard_normal(64)
    w2 = rng.standard_normal((64, 16))
    perm = rng.permutation(64)
    w1p, b1p = permute_matmul_cols(w1, b1, perm)
    folded = np.maximum(x @ w1p + b1p, 0) @ permute_matmul_rows(w2, perm)
    np.testing.assert_allclose(folded, np.maximum(x @ w1 + b1, 0) @ w2, rtol=RTOL, atol=ATOL)


def test_inverse_undoes_fold(rng: np.random.Generator) -> None:
    w = rng.standard_normal((12, 9))
    perm = rng.permutation(12)
    restored = permute_matmul_rows(permute_matmul_rows(w, perm), inverse_permutation(perm))
    np.testing.assert_array_equal(restored, w)


def test_folds_never_write_into_arguments(rng: np.random.Generator) -> None:
    """Graph.copy shares arrays, so a fold must return new ones."""
    w, b = rng.standard_normal((8, 8)), rng.standard_normal(8)
    w0, b0 = w.copy(), b.copy()
    perm = rng.permutation(8)
    outs = [permute_matmul_rows(w, perm), *permute_matmul_cols(w, b, perm)]
    outs += list(permute_layernorm(b, b, perm))
    for out in outs:
        assert not np.shares_memory(out, w)
        assert not np.shares_memory(out, b)
    np.testing.assert_array_equal(w, w0)
    np.testing.assert_array_equal(b, b0)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_permute_weight_codes_matches_folded_float_weight(
    rng: np.random.Generator, bits: int
) -> None:
    """DQ(codes') on axis 1 equals the folded dequantized weight, with exact integer codes."""
    weight = rng.standard_normal((24, 16)).astype(np.float32)  # [out, in]
    codes, scale, zero = quantize_rows(weight, bits)
    in_perm, out_perm = rng.permutation(16), rng.permutation(24)
    codes_t, scale_t, zero_t = permute_weight_codes(codes, scale, zero, in_perm, out_perm)
    assert codes_t.shape == (16, 24)
    assert codes_t.dtype == codes.dtype
    np.testing.assert_array_equal(codes_t, codes.T[in_perm][:, out_perm])
    np.testing.assert_array_equal(zero_t, zero[out_perm])
    np.testing.assert_array_equal(scale_t, scale[out_perm])
    dequant_t = dequantize(codes.T, scale[None, :], zero[None, :])  # [in, out]
    bias = np.zeros(24, np.float32)
    expected, _ = permute_matmul_cols(permute_matmul_rows(dequant_t, in_perm), bias, out_perm)
    np.testing.assert_array_equal(dequantize(codes_t, scale_t[None, :], zero_t[None, :]), expected)


def test_permute_weight_codes_none_is_identity(rng: np.random.Generator) -> None:
    codes = rng.integers(-8, 8, (6, 4)).astype(np.int8)
    scale, zero = rng.uniform(0.1, 1, 6).astype(np.float32), rng.integers(-3, 3, 6)
    codes_t, scale_t, zero_t = permute_weight_codes(codes, scale, zero, None, None)
    np.testing.assert_array_equal(codes_t, codes.T)
    np.testing.assert_array_equal(scale_t, scale)
    np.testing.assert_array_equal(zero_t, zero)
    assert codes_t.flags.c_contiguous


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: permute_layernorm(np.ones(4), np.ones(5), np.arange(4)), "beta shape"),
        (lambda: permute_layernorm(np.ones((2, 2)), np.ones((2, 2)), np.arange(2)), "1-D"),
        (lambda: permute_layernorm(np.ones(4), np.ones(4), np.arange(5)), "permutation of 4"),
        (lambda: permute_layernorm(np.ones(4), np.ones(4), np.array([0, 0, 1, 2])), "permutation"),
        (lambda: permute_matmul_rows(np.ones((4, 3)), np.arange(3)), "permutation of 4"),
        (lambda: permute_matmul_rows(np.ones(4), np.arange(4)), "2-D"),
        (lambda: permute_matmul_rows(np.ones((4, 3)), np.arange(4.0)), "integer"),
        (lambda: permute_matmul_cols(np.ones((4, 3)), np.ones(4), np.arange(3)), "bias has 4"),
        (lambda: permute_matmul_cols(np.ones((4, 3)), ONES3, np.arange(4)), "permutation of 3"),
        (
            lambda: permute_weight_codes(np.ones((3, 4)), np.ones(4), np.ones(3), None, None),
            "one entry per output row",
        ),
        (
            lambda: permute_weight_codes(np.ones((3, 4)), ONES3, ONES3, np.arange(3), None),
            "in_perm",
        ),
        (
            lambda: permute_weight_codes(np.ones((3, 4)), ONES3, ONES3, None, np.arange(4)),
            "out_perm",
        ),
    ],
)
def test_shape_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
