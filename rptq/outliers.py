"""Random OPT models with OPT-like outlier channels: RPTQ's problem on a model we can build.

Real OPT checkpoints have a handful of hidden dimensions whose LayerNorm outputs span ranges
10-100x wider than the other channels, in the same dimensions in every layer:

- Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale" (2022),
  section 4: "emergent" outlier features of magnitude up to about 20x the rest (they use a
  threshold of 6.0 against typical magnitudes below 1; values reach about 60 in OPT-6.7B and
  larger), concentrated in about 6 hidden dimensions that are shared by all layers, and set by
  the LayerNorm's parameters and the residual stream.
- Bondarenko et al., "Understanding and Overcoming the Challenges of Efficient Transformer
  Quantization" (EMNLP 2021): in BERT, a few residual/LayerNorm-output dimensions carry
  structured outliers of large magnitude that per-tensor 8-bit activations cannot hold;
  "Quantizable Transformers: Removing Outliers by Helping Attention Heads Do Nothing"
  (NeurIPS 2023) traces them to attention heads learning a "no-op", and shows them in OPT.
- RPTQ (Yuan et al. 2023, arXiv 2304.01089), figure 1: per-channel (min, max) of an OPT-13B
  LayerNorm output, a few channels out to roughly +-60..100 while most stay within a few units.

(Magnitudes as recalled from the papers, not re-verified against the PDFs here.)

So the helper multiplies the LayerNorm gamma of a few channels (the same channels in every
LayerNorm of every layer) by `gamma_scale` and shifts their beta by `beta_shift`. The defaults,
x25 and +12.5, put those channels' LayerNorm outputs at about 12.5 +- 25 * |normalised value|
(roughly [-60, +90] at 3 sigma), against about [-3, +3] for the others: 20-30x, inside the
10-100x range above, and asymmetric like OPT's (its outlier channels are mostly one-signed). Six
channels follows Dettmers et al.'s count for OPT-6.7B.
"""

from __future__ import annotations

from typing import Any

import torch

DEFAULT_OUTLIER_CHANNELS = 6
DEFAULT_GAMMA_SCALE = 25.0
DEFAULT_BETA_SHIFT = 12.5


def outlier_channels(hidden_size: int, count: int, seed: int) -> list[int]:
    """`count` distinct hidden dimensions, drawn once from `seed` (sorted)."""
    if not 0 < count <= hidden_size:
        raise ValueError(f"outlier channel count must be 1..{hidden_size}, got {count}")
    generator = torch.Generator().manual_seed(seed)
    return sorted(int(c) for c in torch.randperm(hidden_size, generator=generator)[:count])


def add_outlier_channels(
    model: Any,
    count: int = DEFAULT_OUTLIER_CHANNELS,
    gamma_scale: float = DEFAULT_GAMMA_SCALE,
    beta_shift: float = DEFAULT_BETA_SHIFT,
    seed: int = 0,
) -> list[int]:
    """Give `count` channels of every decoder LayerNorm OPT-like outlier ranges, in place.

    Both LayerNorms of each layer (self_attn_layer_norm and final_layer_norm) get the same
    channels, as OPT's outlier dimensions are shared across layers; the final LayerNorm before
    the LM head is left alone (RPTQ does not quantize its output). Returns the channels.
    """
    hidden = int(model.config.hidden_size)
    channels = outlier_channels(hidden, count, seed)
    index = torch.tensor(channels)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".layers." not in name or "layer_norm" not in name:
                continue
            if name.endswith("layer_norm.weight"):
                param[index] = param[index] * gamma_scale
            elif name.endswith("layer_norm.bias"):
                param[index] = param[index] + beta_shift
    return channels


def make_outlier_opt(
    count: int = DEFAULT_OUTLIER_CHANNELS,
    gamma_scale: float = DEFAULT_GAMMA_SCALE,
    beta_shift: float = DEFAULT_BETA_SHIFT,
    **tiny_fields: Any,
) -> Any:
    """`rptq.tiny.make_tiny_opt(**tiny_fields)` with outlier channels (seeded by its seed)."""
    from rptq.tiny import make_tiny_opt

    model = make_tiny_opt(**tiny_fields)
    add_outlier_channels(model, count, gamma_scale, beta_shift, seed=tiny_fields.get("seed", 0))
    return model
