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

With N(0, std) weights, channels that wide carry almost all of each following linear's input
energy (6 channels of mean square ~940 against ~1.3 for each of the others; measured on random
tokens: 86-95 % at hidden 256, 98-99 % at hidden 64). Quantizing the other channels to zero then
costs little, which no trained model allows: per-tensor 8-bit activations, which crush the
ordinary channels, break OPT from 6.7B up (Dettmers et al., section 4), and so does zeroing the
outlier features alone. Both groups carry signal. `outlier_share` models that: it scales the
weight columns that read the outlier channels (q/k/v after self_attn_layer_norm, fc1 after
final_layer_norm) so that the outlier channels carry that share of the linear's input energy
(measured on random tokens), the rest staying with the ordinary channels. The activations keep
their ranges; only what the model does with them changes. None (the default) leaves the
weights as drawn.
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


# the linears each decoder LayerNorm feeds (OPT, pre-LayerNorm)
_READERS = {
    "self_attn_layer_norm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "final_layer_norm": ("fc1",),
}


BALANCE_TOKENS = (8, 32)  # random token windows the readers' input energy is measured on
BALANCE_SEED = 1234


def reader_column_scale(energy: torch.Tensor, channels: list[int], share: float) -> float:
    """The factor for the weight columns reading `channels` that gives them `share` of the
    input energy, from the per-channel mean square `energy` of the input: s^2 * E_out /
    (s^2 * E_out + E_rest) = share."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"outlier_share must be in (0, 1), got {share}")
    energy = energy.double()
    mask = torch.zeros_like(energy, dtype=torch.bool)
    mask[channels] = True
    outlier, rest = float(energy[mask].sum()), float(energy[~mask].sum())
    return (share / (1.0 - share) * rest / outlier) ** 0.5


def _norm_output_energy(model: Any, norm: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Per-channel mean square of `norm`'s output over a forward pass of `tokens`."""
    captured: list[torch.Tensor] = []

    def hook(_module: Any, _inputs: Any, output: torch.Tensor) -> None:
        flat = output.detach().double().reshape(-1, output.shape[-1])  # fc1's input is 2-D
        captured.append(flat.pow(2).mean(dim=0))

    handle = norm.register_forward_hook(hook)
    try:
        model(tokens)
    finally:
        handle.remove()
    return captured[0]


def balance_outlier_readers(
    model: Any, channels: list[int], share: float, tokens: torch.Tensor | None = None
) -> list[float]:
    """Scale, in place, the weight columns that read `channels` in every decoder layer so that
    those channels carry `share` of each linear's input energy (module docstring), measured on
    `tokens` (default: BALANCE_TOKENS random windows, seeded), one LayerNorm at a time in
    forward order, since each balance changes what the later norms see. Returns the factors,
    two per layer (attention inputs, fc1)."""
    if tokens is None:
        generator = torch.Generator().manual_seed(BALANCE_SEED)
        vocab = int(model.config.vocab_size)
        tokens = torch.randint(0, vocab, BALANCE_TOKENS, generator=generator)
    factors = []
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            for norm_name, readers in _READERS.items():
                energy = _norm_output_energy(model, getattr(layer, norm_name), tokens)
                factor = reader_column_scale(energy, channels, share)
                for path in readers:
                    layer.get_submodule(path).weight[:, channels] *= factor
                factors.append(factor)
    return factors


def make_outlier_opt(
    count: int = DEFAULT_OUTLIER_CHANNELS,
    gamma_scale: float = DEFAULT_GAMMA_SCALE,
    beta_shift: float = DEFAULT_BETA_SHIFT,
    outlier_share: float | None = None,
    **tiny_fields: Any,
) -> Any:
    """`rptq.tiny.make_tiny_opt(**tiny_fields)` with outlier channels (seeded by its seed), and
    with `outlier_share` given, their readers balanced (`balance_outlier_readers`)."""
    from rptq.tiny import make_tiny_opt

    model = make_tiny_opt(**tiny_fields)
    seed = tiny_fields.get("seed", 0)
    channels = add_outlier_channels(model, count, gamma_scale, beta_shift, seed=seed)
    if outlier_share is not None:
        balance_outlier_readers(model, channels, outlier_share)
    return model
