"""A functional OPT forward pass with taps at every quantizable activation.

Calibration, the fake-quant reference and the FP baseline all run this one function, so the
tensor the statistics see is the tensor the reference quantizes, and both are the tensors the
ONNX graph holds. It follows Hugging Face's eager OPT op for op (q is scaled right after
q_proj, softmax in fp32), so with no taps it reproduces `OPTForCausalLM` logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from rptq.model.shape import OptShape
from rptq.model.weights import (
    EMBED_POSITIONS,
    EMBED_TOKENS,
    FINAL_LN,
    LM_HEAD,
    WeightSource,
    layer_prefix,
)
from rptq.points import Act

# tap(act, tensor) -> tensor: observe (statistics) or replace (fake quantization) an activation.
Tap = Callable[[Act, torch.Tensor], torch.Tensor]
POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding reserves the first two rows
LN_EPS = 1e-5

LAYER_TENSORS: tuple[str, ...] = (
    "self_attn_layer_norm.weight",
    "self_attn_layer_norm.bias",
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.out_proj.weight",
    "self_attn.out_proj.bias",
    "final_layer_norm.weight",
    "final_layer_norm.bias",
    "fc1.weight",
    "fc1.bias",
    "fc2.weight",
    "fc2.bias",
)

LayerWeights = dict[str, torch.Tensor]  # keys: LAYER_TENSORS
# one layer's cached keys and values, [B, H, P, hd] each (heads split, original channel order)
LayerCache = tuple[torch.Tensor, torch.Tensor]


def _no_tap(act: Act, x: torch.Tensor) -> torch.Tensor:
    return x


def read_layer(
    source: WeightSource, index: int, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> LayerWeights:
    """One decoder layer's tensors, converted to `dtype` (the only layer held in that dtype)."""
    prefix = layer_prefix(index)
    return {k: source.get(f"{prefix}.{k}").to(device=device, dtype=dtype) for k in LAYER_TENSORS}


def head_weight(source: WeightSource) -> torch.Tensor:
    """lm_head weight (tied to the token embedding in every OPT checkpoint)."""
    return source.get(LM_HEAD) if LM_HEAD in set(source.names()) else source.get(EMBED_TOKENS)


def embed(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    source: WeightSource,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Token plus learned position embeddings (positions count only unmasked tokens)."""
    tokens = F.embedding(input_ids, source.get(EMBED_TOKENS).to(dtype))
    positions = torch.cumsum(attention_mask, dim=1)
    positions = (positions * attention_mask - 1).long() + POSITION_OFFSET
    return tokens + F.embedding(positions, source.get(EMBED_POSITIONS).to(dtype))


def embed_at(
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    source: WeightSource,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Token plus position embeddings at given OPT positions (counted from 0, as optimum feeds
    them to a with-past graph); `embed` counts them from the mask instead."""
    tokens = F.embedding(input_ids, source.get(EMBED_TOKENS).to(dtype))
    positions = position_ids.long() + POSITION_OFFSET
    return tokens + F.embedding(positions, source.get(EMBED_POSITIONS).to(dtype))


def causal_mask(
    attention_mask: torch.Tensor, dtype: torch.dtype, query_length: int | None = None
) -> torch.Tensor:
    """Additive [B, 1, S, T] mask: 0 where a query may attend, the dtype's minimum elsewhere.

    `attention_mask` covers all T keys; the S queries are the last S of them (S = T without a
    cache), so query i may attend keys up to T - S + i.
    """
    _, length = attention_mask.shape
    queries = length if query_length is None else query_length
    causal = torch.ones(queries, length, dtype=torch.bool, device=attention_mask.device)
    causal = causal.tril(diagonal=length - queries)
    allowed = causal[None, None] & attention_mask[:, None, None, :].bool()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def decoder_layer(
    hidden: torch.Tensor,
    weights: LayerWeights,
    mask: torch.Tensor,
    shape: OptShape,
    tap: Tap = _no_tap,
) -> torch.Tensor:
    """One pre-LN OPT decoder layer; `tap` sees (and may replace) every RPTQ activation."""
    return decoder_layer_cached(hidden, weights, mask, shape, tap)[0]


def decoder_layer_cached(
    hidden: torch.Tensor,
    weights: LayerWeights,
    mask: torch.Tensor,
    shape: OptShape,
    tap: Tap = _no_tap,
    past: LayerCache | None = None,
) -> tuple[torch.Tensor, LayerCache]:
    """`decoder_layer` on top of cached keys/values; returns the output and the present cache.

    The cache holds k and v after their taps (fake-quantized when the plan quantizes K/V), so
    the cached tokens are exactly what a full forward would attend to. `mask` is [B, 1, S, P+S].
    """
    w = weights
    batch, length, hidden_size = hidden.shape
    heads, head_dim = shape.num_heads, shape.head_dim

    a = F.layer_norm(
        hidden,
        (hidden_size,),
        w["self_attn_layer_norm.weight"],
        w["self_attn_layer_norm.bias"],
        LN_EPS,
    )
    a = tap(Act.ATTN_LN_OUT, a)
    q = F.linear(a, w["self_attn.q_proj.weight"], w["self_attn.q_proj.bias"])
    q = tap(Act.Q_PROJ_OUT, q)
    q = tap(Act.Q, q * head_dim**-0.5)
    k = tap(Act.K, F.linear(a, w["self_attn.k_proj.weight"], w["self_attn.k_proj.bias"]))
    v = tap(Act.V, F.linear(a, w["self_attn.v_proj.weight"], w["self_attn.v_proj.bias"]))

    def split_heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, length, heads, head_dim).transpose(1, 2)

    k_heads, v_heads = split_heads(k), split_heads(v)
    if past is not None:
        k_heads = torch.cat([past[0].to(k.dtype), k_heads], dim=2)
        v_heads = torch.cat([past[1].to(v.dtype), v_heads], dim=2)
    scores = torch.matmul(split_heads(q), k_heads.transpose(-1, -2)) + mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = tap(Act.ATTN_PROBS, probs)
    o = torch.matmul(probs, v_heads).transpose(1, 2).reshape(batch, length, hidden_size)
    o = tap(Act.OUT_PROJ_IN, o)
    hidden = hidden + F.linear(o, w["self_attn.out_proj.weight"], w["self_attn.out_proj.bias"])

    c = F.layer_norm(
        hidden, (hidden_size,), w["final_layer_norm.weight"], w["final_layer_norm.bias"], LN_EPS
    )
    c = tap(Act.FFN_LN_OUT, c)
    r = F.relu(F.linear(c, w["fc1.weight"], w["fc1.bias"]))
    r = tap(Act.FC2_IN, r)
    return hidden + F.linear(r, w["fc2.weight"], w["fc2.bias"]), (k_heads, v_heads)


def final_logits(
    hidden: torch.Tensor, source: WeightSource, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Final LayerNorm and the (tied) LM head."""
    hidden = F.layer_norm(
        hidden,
        (hidden.shape[-1],),
        source.get(f"{FINAL_LN}.weight").to(dtype),
        source.get(f"{FINAL_LN}.bias").to(dtype),
        LN_EPS,
    )
    return F.linear(hidden, head_weight(source).to(dtype))
