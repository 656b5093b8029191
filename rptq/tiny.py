"""Tiny random OPT models built from OPTConfig: for tests, the demo and CI (no downloads)."""

from __future__ import annotations

from typing import Any

import torch


def make_tiny_opt(
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    ffn_dim: int = 256,
    vocab_size: int = 512,
    max_positions: int = 128,
    seed: int = 0,
    weight_std: float = 0.1,
) -> Any:
    """A randomly initialised `OPTForCausalLM` in eval mode with eager attention.

    Weights are N(0, weight_std) and LayerNorm gamma/beta are perturbed away from 1/0, so that
    channels have different ranges (what RPTQ's clustering is about) and folds that permute
    gamma/beta wrongly are caught.
    """
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        ffn_dim=ffn_dim,
        num_attention_heads=num_heads,
        max_position_embeddings=max_positions,
        word_embed_proj_dim=hidden_size,
        do_layer_norm_before=True,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        init_std=weight_std,
    )
    config._attn_implementation = "eager"
    model = OPTForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                param.copy_(1.0 + 0.5 * torch.randn_like(param))
            elif name.endswith("layer_norm.bias"):
                param.copy_(0.3 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.05 * torch.randn_like(param))
    return model
