"""Pick the next token from logits: greedy, or temperature + nucleus (top-p) sampling.

numpy only, like rptq.runtime.decode, so `rptq-export generate` starts without torch. Sampling
draws from a seeded `numpy.random.Generator`, so `--seed` makes a run repeatable on any CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from rptq.errors import ConfigError


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen.

    `greedy` takes the arg-max (ties go to the lowest id, as numpy and transformers do);
    otherwise the logits are divided by `temperature` and the token is drawn from the smallest
    set of most likely tokens whose probability reaches `top_p` (Holtzman et al. 2020).
    """

    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"--temperature must be > 0, got {self.temperature}; or use --greedy")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")


def nucleus_probabilities(
    logits: NDArray[np.floating], temperature: float, top_p: float
) -> NDArray[np.float64]:
    """Next-token probabilities [B, V] after temperature and top-p truncation (rows sum to 1).

    The most likely token always stays, so `top_p` near 0 is greedy; float64 keeps the softmax
    of large fp16/fp32 logits exact enough that the kept set does not depend on rounding.
    """
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=-1, keepdims=True)
    probs = np.exp(scaled)
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p >= 1:
        return probs
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_probs = np.take_along_axis(probs, order, axis=-1)
    before = np.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of the tokens ahead of each
    keep_sorted = before < top_p  # the first token has 0 ahead of it: always kept
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    probs = np.where(keep, probs, 0.0)
    return probs / probs.sum(axis=-1, keepdims=True)


def next_tokens(
    logits: NDArray[np.floating], sampling: Sampling, rng: np.random.Generator
) -> NDArray[np.int64]:
    """One token per row of `logits` [B, V]."""
    if sampling.greedy:
        return np.argmax(logits, axis=-1).astype(np.int64)
    probs = nucleus_probabilities(logits, sampling.temperature, sampling.top_p)
    # inverse-CDF draw: one uniform per row, so the stream of draws is fixed by the seed alone
    draws: NDArray[np.float64] = np.asarray(rng.random(size=probs.shape[0]), dtype=np.float64)
    cdf = np.cumsum(probs, axis=-1)
    picked = (cdf < draws[:, None]).sum(axis=-1)
    return np.minimum(picked, probs.shape[-1] - 1).astype(np.int64)
