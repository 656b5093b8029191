"""Simulated (fake) quantization in PyTorch, exactly as the plan means it.

The formulas are those of rptq.quant.qparams (the numpy source of truth); this module only
applies them to torch tensors inside the functional forward, through its `tap` hook. The ONNX
graph computes the same thing with QuantizeLinear/DequantizeLinear (plus an exact clamp for
grids narrower than the integer container).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from rptq.plan import ActQuant, QuantPlan, ReorderSite, WeightQuant
from rptq.points import LINEARS, SITE_OF, Act, Reorder
from rptq.quant.clusters import expand_to_channels
from rptq.quant.qparams import grid_bounds


@dataclass(frozen=True)
class ChannelQuant:
    """Per-channel (original channel order) scale/zero of one activation, ready to broadcast."""

    scale: torch.Tensor
    zero: torch.Tensor
    qmin: int
    qmax: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize `x` per channel with the plan's scale and zero point."""
        scale = self.scale.to(device=x.device, dtype=x.dtype)
        zero = self.zero.to(device=x.device, dtype=x.dtype)
        codes = torch.clamp(torch.round(x / scale) + zero, self.qmin, self.qmax)
        return (codes - zero) * scale


def channel_quant(act: ActQuant, site: ReorderSite | None) -> ChannelQuant:
    """Expand per-cluster parameters to per-channel vectors in the model's own channel order.

    The reference never permutes anything: a cluster is just a set of channel indices, so
    quantizing in the original order is numerically what the folded graph does in its order.
    """
    scale: NDArray[np.generic]
    zero: NDArray[np.generic]
    if site is None:  # per-tensor (attn_probs)
        scale, zero = act.scale, act.zero
    else:
        scale = expand_to_channels(act.scale, site.perm, site.sizes)
        zero = expand_to_channels(act.zero, site.perm, site.sizes)
    qmin, qmax = grid_bounds(act.bits)
    return ChannelQuant(
        torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(zero, dtype=np.float32)),
        qmin,
        qmax,
    )


class FakeQuantTap:
    """A forward `tap` that fake-quantizes the activations of one layer and passes the rest."""

    def __init__(self, quantizers: dict[Act, ChannelQuant]) -> None:
        self.quantizers = quantizers

    def __call__(self, act: Act, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize `act` if the plan quantizes it, else return `x`."""
        quantizer = self.quantizers.get(act)
        return x if quantizer is None else quantizer(x)

    @classmethod
    def for_layer(
        cls, acts: list[ActQuant] | tuple[ActQuant, ...], sites: Mapping[Reorder, ReorderSite]
    ) -> FakeQuantTap:
        """Build from one layer's ActQuants and its sites keyed by Reorder point."""
        quantizers = {}
        for act in acts:
            site = sites.get(SITE_OF[act.act]) if act.act in SITE_OF else None
            quantizers[act.act] = channel_quant(act, site)
        return cls(quantizers)

    @classmethod
    def from_plan(cls, plan: QuantPlan, layer: int) -> FakeQuantTap:
        """The tap of decoder layer `layer` of `plan`."""
        acts = [a for a in plan.acts if a.layer == layer]
        sites = {s.point: s for s in plan.sites if s.layer == layer}
        return cls.for_layer(acts, sites)


def dequantized_weight(weight: WeightQuant) -> torch.Tensor:
    """The float weight [out, in] that the plan's codes stand for (GPTQT planes, LoRC included)."""
    return torch.from_numpy(weight.values())


def apply_weights(
    layer_weights: dict[str, torch.Tensor], quants: dict[str, WeightQuant]
) -> dict[str, torch.Tensor]:
    """Replace each linear's float weight by its dequantized codes (keys as in LAYER_TENSORS)."""
    out = dict(layer_weights)
    for linear in LINEARS:
        quant = quants.get(linear)
        if quant is not None:
            original = layer_weights[f"{linear}.weight"]
            out[f"{linear}.weight"] = dequantized_weight(quant).to(original.device, original.dtype)
    return out
