"""Perplexity arithmetic on hand-checkable logits; window cutting."""

from __future__ import annotations

import math

import pytest
import torch

from rptq.data import eval_windows
from rptq.errors import DataError
from rptq.runtime.perplexity import PerplexityResult, perplexity, window_nll


def test_uniform_logits_give_vocab_size():
    vocab = 50272
    windows = torch.randint(0, vocab, (3, 17), generator=torch.Generator().manual_seed(0))

    def uniform(ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(1, ids.shape[1], vocab, dtype=torch.float16)

    result = perplexity(uniform, windows)
    assert result.ppl == pytest.approx(vocab, rel=1e-6)
    assert result.windows == 3
    assert result.tokens == 3 * 17


def test_hand_computed_two_windows():
    # Vocab 2, T = 3. Logits [0, log 3] give p(1) = 3/4, p(0) = 1/4 at every position.
    windows = torch.tensor([[0, 1, 1], [1, 0, 1]])
    logits = torch.tensor([0.0, math.log(3.0)]).expand(1, 3, 2)
    # Window 0 predicts 1, 1 -> NLL log(4/3) each. Window 1 predicts 0, 1 -> log 4, log(4/3).
    nll_0 = math.log(4 / 3)
    nll_1 = (math.log(4) + math.log(4 / 3)) / 2
    assert window_nll(logits, windows[0]) == pytest.approx(nll_0, rel=1e-6)
    assert window_nll(logits[0], windows[1:2]) == pytest.approx(nll_1, rel=1e-6)
    result = perplexity(lambda ids: logits, windows, desc="test")
    assert isinstance(result, PerplexityResult)
    assert result.mean_nll == pytest.approx((nll_0 + nll_1) / 2, rel=1e-6)
    assert result.ppl == pytest.approx(math.exp((nll_0 + nll_1) / 2), rel=1e-6)


def test_first_token_is_never_predicted():
    # Logits at the last position are ignored, and so is the first token of the window.
    windows = torch.tensor([[1, 0, 0]])
    logits = torch.full((1, 3, 2), -1e4)
    logits[0, :2, 0] = 0.0  # positions 0 and 1 are certain of token 0
    assert window_nll(logits, windows) == pytest.approx(0.0, abs=1e-6)


def test_logits_shape_mismatch_is_a_bug():
    with pytest.raises(ValueError, match="do not match"):
        window_nll(torch.zeros(1, 4, 8), torch.zeros(5, dtype=torch.long))


def test_token_outside_vocab_is_a_user_error():
    with pytest.raises(DataError) as excinfo:
        window_nll(torch.zeros(1, 3, 8), torch.tensor([0, 9, 1]))
    assert "\n" not in str(excinfo.value)


def test_eval_windows_drop_the_tail():
    windows = eval_windows(torch.arange(10), 4)
    assert windows.shape == (2, 4)
    assert torch.equal(windows, torch.arange(8).view(2, 4))
    assert eval_windows(torch.arange(8), 4).shape == (2, 4)
