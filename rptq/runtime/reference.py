"""The PyTorch fake-quant reference: the model as the plan means it.

Every exported graph is compared against this. It runs the functional OPT forward with each
layer's weights replaced by their dequantized codes and each quantized activation passed
through `FakeQuantTap`. With no plan (or a 16/16-bit plan) it is the floating-point model.

`step` is the same forward with a KV cache (the with-past graph's counterpart): it returns
the present cache as the reference computes it, heads split ([B, H, P + S, hd]) and in the
model's **original** channel order, fake-quantized where the plan quantizes K/V. The graph's
cache is in the reorder-folded order (R2 permutes key channels, R3 value channels, inside each
head); `cache_in_graph_order` maps the one to the other.
"""

from __future__ import annotations

import numpy as np
import torch

from rptq.errors import PlanError
from rptq.model.fakequant import FakeQuantTap, apply_weights
from rptq.model.forward import (
    LayerCache,
    LayerWeights,
    Tap,
    causal_mask,
    decoder_layer,
    decoder_layer_cached,
    embed,
    embed_at,
    final_logits,
    read_layer,
)
from rptq.model.load import LoadedModel
from rptq.model.weights import layer_prefix
from rptq.plan import QuantPlan
from rptq.points import Reorder

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

    @torch.no_grad()
    def step(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        past: list[LayerCache] | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[LayerCache]]:
        """Logits [B, S, V] of S new tokens on top of `past` (P tokens each layer), and the
        present cache (P + S tokens, original channel order).

        `attention_mask` [B, P + S] covers past and new tokens; `position_ids` [B, S] default
        to optimum's (count of unmasked tokens minus one, padding at 1).
        """
        batch, length = input_ids.shape
        if position_ids is None:
            counts = torch.cumsum(attention_mask, dim=1) - 1
            position_ids = counts.masked_fill(attention_mask == 0, 1)[:, -length:]
        hidden = embed_at(input_ids, position_ids, self.model.weights)
        additive = causal_mask(attention_mask, hidden.dtype, query_length=length)
        present: list[LayerCache] = []
        for i in range(self.model.shape.num_layers):
            weights, tap = self.layer(i)
            layer_past = None if past is None else past[i]
            hidden, cache = decoder_layer_cached(
                hidden, weights, additive, self.model.shape, tap, layer_past
            )
            present.append(cache)
        return final_logits(hidden, self.model.weights), present


def reference_greedy(
    reference: ReferenceModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding with the reference's cache, as rptq.runtime.decode.greedy runs a graph.

    Returns (new tokens [B, N], the logits of the last position at each step [B, N, V]), so
    tests can tell a real mismatch from a near-tie of the top two logits.
    """
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    cache: list[LayerCache] | None = None
    step_ids = input_ids
    tokens: list[torch.Tensor] = []
    logits_per_step: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        logits, cache = reference.step(step_ids, mask, cache)
        last = logits[:, -1, :]
        step_ids = last.argmax(dim=-1, keepdim=True)
        tokens.append(step_ids)
        logits_per_step.append(last)
        mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
    return torch.cat(tokens, dim=1), torch.stack(logits_per_step, dim=1)


def cache_in_graph_order(
    cache: np.ndarray, plan: QuantPlan | None, layer: int, which: str
) -> np.ndarray:
    """A reference cache tensor [B, H, P, hd] (original order) in the graph's channel order.

    fold_reorder permutes k_proj's output columns by the layer's R2 permutation and v_proj's by
    R3 (graph channel j = original channel perm[j]; per head, so heads stay put). `which` is
    "key" or "value"; without a plan (or without that site) the orders agree.
    """
    if which not in ("key", "value"):
        raise ValueError(f"which must be 'key' or 'value', got {which!r}")
    point = Reorder.R2 if which == "key" else Reorder.R3
    site = None
    if plan is not None:
        site = next((s for s in plan.sites if s.layer == layer and s.point == point), None)
    array = np.asarray(cache)
    if site is None:
        return array
    batch, heads, length, head_dim = array.shape
    channels = array.transpose(0, 2, 1, 3).reshape(batch, length, heads * head_dim)
    channels = channels[..., np.asarray(site.perm)]
    return channels.reshape(batch, length, heads, head_dim).transpose(0, 2, 1, 3)
