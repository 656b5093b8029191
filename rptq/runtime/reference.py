"""The PyTorch fake-quant reference: the model as the plan means it.

Every exported graph is compared against this. It runs the functional OPT forward with each
layer's weights replaced by their dequantized codes and each quantized activation passed
through `FakeQuantTap`. With no plan (or a 16/16-bit plan) it is the floating-point model.
"""

from __future__ import annotations

import torch

from rptq.errors import PlanError
from rptq.model.fakequant import FakeQuantTap, apply_weights
from rptq.model.forward import (
    LayerWeights,
    Tap,
    causal_mask,
    decoder_layer,
    embed,
    final_logits,
    read_layer,
)
from rptq.model.load import LoadedModel
from rptq.model.weights import layer_prefix
from rptq.plan import QuantPlan

# Layers are kept in memory between calls below this many fp32 bytes (perplexity runs call the
# model once per window); above it each call re-reads one layer at a time.
CACHE_LIMIT_BYTES = 4 << 30


def _no_tap(act: object, x: torch.Tensor) -> torch.Tensor:
    return x


class ReferenceModel:
    """Callable ids [B, T] -> logits [B, T, V] (float32) of the FP or fake-quantized model."""

    def __init__(self, model: LoadedModel, plan: QuantPlan | None = None) -> None:
        if plan is not None and plan.model.config_hash != model.shape.config_hash():
            raise PlanError(
                f"plan for {plan.model.name} does not match model {model.name}; "
                "calibrate a plan for this model"
            )
        self.model = model
        self.plan = plan
        shape = model.shape
        layer_bytes = 4 * (4 * shape.hidden_size**2 + 2 * shape.hidden_size * shape.ffn_dim)
        self._cache: dict[int, tuple[LayerWeights, Tap]] | None = (
            {} if layer_bytes * shape.num_layers <= CACHE_LIMIT_BYTES else None
        )

    def layer(self, index: int) -> tuple[LayerWeights, Tap]:
        """Layer `index`'s (fake-quantized) weights and its activation tap."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        weights = read_layer(self.model.weights, index)
        tap: Tap = _no_tap
        if self.plan is not None:
            prefix = f"{layer_prefix(index)}."
            quants = {
                w.fqn[len(prefix) :]: w for w in self.plan.weights if w.fqn.startswith(prefix)
            }
            weights = apply_weights(weights, quants)
            tap = FakeQuantTap.from_plan(self.plan, index)
        if self._cache is not None:
            self._cache[index] = (weights, tap)
        return weights, tap

    @torch.no_grad()
    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [B, T, V] of `input_ids` [B, T] (padding positions masked)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = embed(input_ids, attention_mask, self.model.weights)
        additive = causal_mask(attention_mask, hidden.dtype)
        for i in range(self.model.shape.num_layers):
            weights, tap = self.layer(i)
            hidden = decoder_layer(hidden, weights, additive, self.model.shape, tap)
        return final_logits(hidden, self.model.weights)
