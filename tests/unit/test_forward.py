"""The functional forward reproduces Hugging Face's OPT (the basis of every reference)."""

import torch

from rptq.model.forward import causal_mask, decoder_layer, embed, final_logits, read_layer


def functional_logits(loaded, ids, mask):
    hidden = embed(ids, mask, loaded.weights)
    additive = causal_mask(mask, hidden.dtype)
    for i in range(loaded.shape.num_layers):
        hidden = decoder_layer(hidden, read_layer(loaded.weights, i), additive, loaded.shape)
    return final_logits(hidden, loaded.weights)


def test_functional_forward_equals_hf(tiny_model, tiny_loaded):
    torch.manual_seed(1)
    ids = torch.randint(0, 512, (2, 17))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding exercises positions and the padding mask
    with torch.no_grad():
        want = tiny_model(input_ids=ids, attention_mask=mask).logits
        got = functional_logits(tiny_loaded, ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=0, atol=1e-6)
