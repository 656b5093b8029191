"""The generation loop on a decoder-with-past graph, with the timings `generate` reports.

The prompt runs as one step (prefill: every prompt token at once, the cache filled), then one
token per step (decode: one token against the cache). The two are timed apart because they
stress different things: prefill is matrix-matrix work, decode reads every weight once per token.
numpy only (rptq.runtime.decode, rptq.runtime.sampling): no torch on this path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from rptq.runtime.decode import DecoderSession
from rptq.runtime.sampling import Sampling, next_tokens


@dataclass(frozen=True)
class Generation:
    """New tokens [B, n] and how long each phase took.

    The first new token comes out of the prefill step, so decode covers `n - 1` tokens.
    `stopped_at_eos`: every row produced the end-of-sequence token before `max_new_tokens`.
    """

    tokens: NDArray[np.int64]
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    cache_bytes_per_token: int
    stopped_at_eos: bool

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens per second of the prefill step (per sequence)."""
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens per second after the first (per sequence); 0 when there was none."""
        decoded = self.tokens.shape[1] - 1
        if decoded <= 0:
            return 0.0
        return decoded / self.decode_s if self.decode_s > 0 else float("inf")


def generate(
    decoder: DecoderSession,
    input_ids: NDArray[np.int64],
    attention_mask: NDArray[np.int64] | None,
    max_new_tokens: int,
    sampling: Sampling | None = None,
    eos_token_id: int | None = None,
) -> Generation:
    """Continue `input_ids` [B, S] (left padding marked by `attention_mask`) by up to
    `max_new_tokens`, stopping once every row has produced `eos_token_id`.

    A finished row keeps receiving `eos_token_id` until the others finish, as transformers'
    `generate()` pads with it, so the rows stay aligned and one cache serves the batch.
    """
    sampling = sampling or Sampling()
    rng = np.random.default_rng(sampling.seed)
    ids = np.ascontiguousarray(input_ids, dtype=np.int64)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
    cache = decoder.empty_cache(ids.shape[0])
    done = np.zeros(ids.shape[0], dtype=bool)
    tokens: list[NDArray[np.int64]] = []
    step_ids = ids
    prefill_s = decode_s = 0.0
    for step in range(max_new_tokens):
        started = time.perf_counter()
        logits, cache = decoder.step(step_ids, mask, cache)
        chosen = next_tokens(logits[:, -1, :], sampling, rng)
        elapsed = time.perf_counter() - started
        if step == 0:
            prefill_s = elapsed
        else:
            decode_s += elapsed
        if eos_token_id is not None:
            chosen = np.where(done, eos_token_id, chosen)
            done |= chosen == eos_token_id
        step_ids = chosen[:, None]
        tokens.append(step_ids)
        mask = np.concatenate([mask, np.ones_like(step_ids)], axis=1)
        if eos_token_id is not None and done.all():
            break
    new = np.concatenate(tokens, axis=1) if tokens else np.zeros((ids.shape[0], 0), np.int64)
    return Generation(
        tokens=new,
        prompt_tokens=int(ids.shape[1]),
        prefill_s=prefill_s,
        decode_s=decode_s,
        cache_bytes_per_token=decoder.cache_bytes_per_token,
        stopped_at_eos=bool(eos_token_id is not None and done.all()),
    )
