"""Next-token choice: greedy, temperature and nucleus (top-p) sampling, seeded."""

import numpy as np
import pytest

from rptq.errors import ConfigError
from rptq.runtime.sampling import Sampling, next_tokens, nucleus_probabilities

PROBS = np.array([0.5, 0.3, 0.15, 0.05])


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    # mass ahead of each token: 0, 0.5, 0.8, 0.95 -> with top_p 0.75 the first two stay
    got = nucleus_probabilities(np.log(PROBS)[None], temperature=1.0, top_p=0.75)
    np.testing.assert_allclose(got[0], [0.625, 0.375, 0.0, 0.0], atol=1e-12)


def test_top_p_near_zero_keeps_only_the_most_likely_token():
    got = nucleus_probabilities(np.log(PROBS[::-1])[None], temperature=1.0, top_p=1e-9)
    np.testing.assert_array_equal(got[0], [0.0, 0.0, 0.0, 1.0])


def test_temperature_divides_the_logits():
    logits = np.log(PROBS)[None]
    got = nucleus_probabilities(logits, temperature=0.5, top_p=1.0)
    want = PROBS**2 / (PROBS**2).sum()
    np.testing.assert_allclose(got[0], want, rtol=1e-12)


def test_greedy_is_the_argmax_per_row():
    logits = np.array([[0.1, 3.0, 2.0], [5.0, -1.0, 4.9]])
    assert next_tokens(logits, Sampling(), np.random.default_rng(0)).tolist() == [1, 0]


def test_sampling_follows_the_nucleus_distribution():
    """20,000 seeded draws: each frequency within 5 binomial standard deviations."""
    rows = 20_000
    logits = np.tile(np.log(PROBS), (rows, 1))
    sampling = Sampling(greedy=False, temperature=1.0, top_p=0.9, seed=7)
    picked = next_tokens(logits, sampling, np.random.default_rng(sampling.seed))
    want = np.array([0.5, 0.3, 0.15, 0.0]) / 0.95
    freq = np.bincount(picked, minlength=4) / rows
    sigma = np.sqrt(want * (1 - want) / rows)
    assert np.all(np.abs(freq - want) <= 5 * sigma + 1e-12), (freq, want)
    assert freq[3] == 0  # outside the nucleus: never drawn


def test_same_seed_same_draws():
    logits = np.random.default_rng(1).normal(size=(64, 50))
    sampling = Sampling(greedy=False, temperature=0.8, top_p=0.9, seed=3)
    first = next_tokens(logits, sampling, np.random.default_rng(3))
    again = next_tokens(logits, sampling, np.random.default_rng(3))
    other = next_tokens(logits, sampling, np.random.default_rng(4))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"temperature": 0.0}, "--temperature must be > 0"),
        ({"top_p": 0.0}, "--top-p must be in (0, 1]"),
        ({"top_p": 1.5}, "--top-p must be in (0, 1]"),
    ],
)
def test_bad_sampling_options_are_config_errors(fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("]", r"\]")):
        Sampling(greedy=False, **fields)
