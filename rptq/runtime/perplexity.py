"""Perplexity over non-overlapping windows, as GPTQ's `opt_eval` and RPTQ's `evaluate` compute it.

The loss is defined on logits only, so the same function scores the PyTorch reference, ONNX
Runtime and TensorRT: the backends differ in `logits_fn`, never in the arithmetic. Protocol:
docs/algorithms.md section 4 (each window is an independent sequence, position t predicts token
t+1, ppl = exp of the mean over windows of each window's mean NLL).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from rptq.errors import DataError


@dataclass(frozen=True, slots=True)
class PerplexityResult:
    """ppl with the numbers behind it; `tokens` counts every token of every window (n·T)."""

    ppl: float
    mean_nll: float
    windows: int
    tokens: int


def window_nll(logits: torch.Tensor, window: torch.Tensor) -> float:
    """Mean cross-entropy of positions 0..T-2 predicting tokens 1..T-1 of one window.

    Logits are cast to float32 (fp16 log-softmax over a 50k vocabulary loses digits) and the
    per-position losses are summed in float64, so the result does not depend on the backend's
    output dtype. Accepts logits [1, T, V] or [T, V] and a window [1, T] or [T].
    """
    logits = torch.as_tensor(logits)
    if logits.dim() == 3 and logits.shape[0] == 1:
        logits = logits[0]
    ids = torch.as_tensor(window).reshape(-1)
    if logits.dim() != 2 or logits.shape[0] != ids.numel():
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} do not match a window of {ids.numel()} "
            "tokens: expected [1, T, V] or [T, V]"
        )
    if ids.numel() < 2:
        raise ValueError("a window needs at least 2 tokens to predict one")
    vocab = logits.shape[1]
    targets = ids[1:].to(device=logits.device, dtype=torch.long)
    top = int(targets.max())
    if top >= vocab or int(targets.min()) < 0:
        raise DataError(
            f"token id {top} is outside the model's {vocab} logits: the tokenizer does not "
            "match the model; use the model's own tokenizer"
        )
    nll = F.cross_entropy(logits[:-1].float(), targets, reduction="none")
    return float(nll.double().mean())


def perplexity(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    windows: torch.Tensor,
    desc: str = "ppl",
) -> PerplexityResult:
    """Score each [1, T] window independently with `logits_fn` (no cache, no extra BOS).

    `logits_fn` gets a CPU LongTensor [1, T] and returns logits [1, T, V] on any device; moving
    ids to the device is the backend's business. Windows are fed one at a time because that is
    the reference protocol and it bounds memory for 6.7B-class vocab logits.
    """
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise ValueError(f"windows must be [n >= 1, T], got shape {tuple(windows.shape)}")
    count, seq_len = windows.shape
    nlls: list[float] = []
    with torch.no_grad():
        for row in tqdm(range(count), desc=desc, unit="window", disable=None, leave=False):
            window = windows[row : row + 1]
            nlls.append(window_nll(logits_fn(window), window))
    mean_nll = math.fsum(nlls) / count
    try:
        ppl = math.exp(mean_nll)
    except OverflowError:
        ppl = math.inf
    return PerplexityResult(ppl=ppl, mean_nll=mean_nll, windows=count, tokens=count * seq_len)
