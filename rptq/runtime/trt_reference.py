"""The PyTorch reference of the TensorRT variant: what `--target tensorrt` graphs compute.

Activations are fake-quantized exactly as in the default reference (the variant only moves
each cluster's scale and zero point out of the Q/DQ, which changes no value in real
arithmetic). Weights differ: a linear whose input activation is quantized multiplies by the
folded weight diag(s)·W re-quantized symmetrically per output channel, mapped back to the
model's domain (codes·scale / s); the others keep the plan's own codes. Both come from
rptq.quant.trt_weights.trt_weight, the function the export passes call, so the graph and this
reference hold the same integer codes.
"""

from __future__ import annotations

import numpy as np
import torch

from rptq.model.fakequant import FakeQuantTap
from rptq.model.forward import LayerWeights, Tap, read_layer
from rptq.model.load import LoadedModel
from rptq.model.weights import layer_prefix
from rptq.passes.trt_acts import LINEAR_INPUT_ACT, check_trt_plan
from rptq.plan import QuantPlan
from rptq.points import LINEARS, SITE_OF
from rptq.quant.clusters import expand_to_channels
from rptq.quant.trt_weights import trt_weight
from rptq.runtime.reference import ReferenceModel


def _identity(act: object, x: torch.Tensor) -> torch.Tensor:
    return x


def input_scale(plan: QuantPlan, layer: int, linear: str) -> np.ndarray | None:
    """Per-channel scale (model channel order) of the quantized activation a linear reads."""
    quant = plan.act(layer, LINEAR_INPUT_ACT[linear])
    if quant is None:
        return None
    site = plan.site(layer, SITE_OF[quant.act])
    return expand_to_channels(quant.scale.astype(np.float32), site.perm, site.sizes)


def trt_layer_weights(weights: LayerWeights, plan: QuantPlan, layer: int) -> LayerWeights:
    """One layer's weights as the TensorRT variant multiplies by them ([out, in], float32)."""
    out = dict(weights)
    prefix = layer_prefix(layer)
    for linear in LINEARS:
        quant = plan.weight(f"{prefix}.{linear}")
        if quant is None:
            continue  # float weight: the folds change no value
        key = f"{linear}.weight"
        original = weights[key]
        symmetric = trt_weight(
            original.detach().to(torch.float32).cpu().numpy(),
            quant.codes,
            quant.scale,
            quant.zero,
            quant.bits,
            input_scale(plan, layer, linear),
        )
        out[key] = torch.from_numpy(symmetric.values()).to(original.device, original.dtype)
    return out


class TrtReferenceModel(ReferenceModel):
    """Callable ids [B, T] -> logits [B, T, V] of the TensorRT variant (see the module doc)."""

    def __init__(self, model: LoadedModel, plan: QuantPlan | None = None) -> None:
        if plan is not None:
            check_trt_plan(plan)
        super().__init__(model, plan)

    def layer(self, index: int) -> tuple[LayerWeights, Tap]:
        """Layer `index`'s variant weights and its (unchanged) activation fake-quant tap."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        weights = read_layer(self.model.weights, index)
        tap: Tap = _identity
        if self.plan is not None:
            weights = trt_layer_weights(weights, self.plan, index)
            tap = FakeQuantTap.from_plan(self.plan, index)
        if self._cache is not None:
            self._cache[index] = (weights, tap)
        return weights, tap
