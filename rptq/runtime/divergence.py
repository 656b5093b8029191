"""KL divergence of a quantized model's next-token distribution from the FP model's.

Perplexity means little on a random model (its FP perplexity is near the vocabulary size), but
how far quantization moves the predicted distribution does: KL(P_fp || P_q) per position, in
nats, averaged over every predicting position of every window. It is the expected extra
log-loss the quantized model pays on text sampled from the FP model, so it is a perplexity-like
measure that needs no trained model (exp(KL) bounds nothing, but for a model that matches its
data the ppl ratio q/fp tends to exp(KL)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_kl(fp_logits: torch.Tensor, test_logits: torch.Tensor) -> float:
    """Mean KL(softmax(fp) || softmax(test)) over positions, in nats (float64 sums)."""
    if fp_logits.shape != test_logits.shape:
        raise ValueError(
            f"logit shapes differ: {tuple(fp_logits.shape)} vs {tuple(test_logits.shape)}"
        )
    vocab = fp_logits.shape[-1]
    log_p = F.log_softmax(fp_logits.reshape(-1, vocab).double(), dim=-1)
    log_q = F.log_softmax(test_logits.reshape(-1, vocab).double(), dim=-1)
    return float((log_p.exp() * (log_p - log_q)).sum(dim=-1).mean())
