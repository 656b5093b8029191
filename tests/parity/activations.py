"""Recording every quantized activation of a reference model (shared by the parity tests)."""

from __future__ import annotations

import torch

from rptq.model.forward import causal_mask, decoder_layer, embed
from rptq.plan import QuantPlan


def record_activations(reference, loaded, plan: QuantPlan, ids: torch.Tensor) -> dict:
    """Each quantized activation as `reference` (default or TensorRT variant) computes it.

    `reference.layer(i)` gives layer i's weights and fake-quant tap; the result is keyed by
    (layer, act) and holds the tap's output, i.e. the fake-quantized tensor.
    """
    mask = torch.ones_like(ids)
    record = {}
    with torch.no_grad():
        hidden = embed(ids, mask, loaded.weights)
        additive = causal_mask(mask, hidden.dtype)
        for i in range(loaded.shape.num_layers):
            weights, tap = reference.layer(i)

            def recording(act, x, i=i, tap=tap):
                out = tap(act, x)
                if plan.act(i, act) is not None:
                    record[(i, act)] = out
                return out

            hidden = decoder_layer(hidden, weights, additive, loaded.shape, recording)
    return record
