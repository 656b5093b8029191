"""Run a decoder-with-past graph step by step in ONNX Runtime, as optimum and genai do.

numpy only (no torch): `generate` imports this and should start in well under a second. The
graph's interface is docs/graph.md, "Decoder with past": input_ids [B, S], attention_mask
[B, P + S], position_ids [B, S], past_key_values.{i}.key/.value [B, H, P, hd] in; logits
[B, S, V] and present.{i}.key/.value [B, H, P + S, hd] out. A step's `present` is the next
step's past, unchanged (float or integer codes alike).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray

from rptq import names
from rptq.errors import ConfigError

# one (key, value) pair per decoder layer, in the graph's dtype and channel order
Cache = list[tuple[NDArray[Any], NDArray[Any]]]

_ORT_TYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
}


def is_with_past(source: ort.InferenceSession | onnx.ModelProto | str | Path) -> bool:
    """True for a decoder-with-past graph (it has `past_key_values.0.key` as an input).

    A path is read without its weights (external data stays on disk).
    """
    if isinstance(source, ort.InferenceSession):
        inputs = [i.name for i in source.get_inputs()]
    else:
        model = (
            source
            if isinstance(source, onnx.ModelProto)
            else onnx.load(str(source), load_external_data=False)
        )
        inputs = [i.name for i in model.graph.input]
    return names.past_key(0) in inputs


def position_ids(attention_mask: NDArray[np.int64], length: int) -> NDArray[np.int64]:
    """OPT positions of the last `length` tokens, as optimum computes them: the count of
    unmasked tokens so far minus one, and 1 on padding (those rows are masked anyway)."""
    mask = np.asarray(attention_mask, dtype=np.int64)
    positions = np.cumsum(mask, axis=1) - 1
    positions = np.where(mask == 0, 1, positions)
    return np.ascontiguousarray(positions[:, mask.shape[1] - length :])


class DecoderSession:
    """A with-past rptq graph in an ORT session (rptq.runtime.ort.make_session).

    Attributes read from the graph: `num_layers`, `num_heads`, `head_dim`, `cache_dtype` (the
    numpy dtype of past/present: the export's float type, or int8/uint8 codes) and
    `cache_bytes_per_token` (keys and values of every layer, per sequence).
    """

    def __init__(self, session: ort.InferenceSession) -> None:
        """Check that `session` runs a with-past graph and read its cache layout."""
        if not is_with_past(session):
            raise ConfigError(
                "this ONNX graph has no KV cache (prefill-only); export it again without --no-cache"
            )
        self.session = session
        inputs = {i.name: i for i in session.get_inputs()}
        layers = 0
        while names.past_key(layers) in inputs:
            layers += 1
        self.num_layers = layers
        first = inputs[names.past_key(0)]
        _, heads, _, head_dim = first.shape
        if not isinstance(heads, int) or not isinstance(head_dim, int):
            raise ConfigError(
                f"input {first.name} has shape {first.shape}; expected [batch, heads, past, "
                "head_dim] with fixed heads and head_dim (an rptq with-past graph)"
            )
        self.num_heads, self.head_dim = heads, head_dim
        if first.type not in _ORT_TYPES:
            raise ConfigError(f"input {first.name} has unsupported type {first.type}")
        self.cache_dtype = np.dtype(_ORT_TYPES[first.type])
        self.cache_bytes_per_token = 2 * layers * heads * head_dim * self.cache_dtype.itemsize
        self._outputs = [names.GRAPH_LOGITS]
        for i in range(layers):
            self._outputs += [names.present_key(i), names.present_value(i)]

    is_with_past = staticmethod(is_with_past)

    def empty_cache(self, batch: int) -> Cache:
        """The cache before the first step: P = 0 for every layer."""
        shape = (batch, self.num_heads, 0, self.head_dim)
        return [
            (np.zeros(shape, self.cache_dtype), np.zeros(shape, self.cache_dtype))
            for _ in range(self.num_layers)
        ]

    def step(
        self,
        input_ids: NDArray[np.int64],
        attention_mask: NDArray[np.int64],
        past: Cache,
        positions: NDArray[np.int64] | None = None,
    ) -> tuple[NDArray[Any], Cache]:
        """Run S new tokens on top of `past` (P tokens); `attention_mask` covers all P + S.

        Returns the logits [B, S, V] and the present cache (P + S tokens). `positions` defaults
        to optimum's (`position_ids`); tests pass others to show the graph uses them.
        """
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        if len(past) != self.num_layers:
            raise ValueError(f"cache has {len(past)} layers, the graph {self.num_layers}")
        if ids.ndim != 2 or mask.shape != (ids.shape[0], past[0][0].shape[2] + ids.shape[1]):
            raise ValueError(
                f"attention_mask {mask.shape} must be [batch, past + new] for input_ids "
                f"{ids.shape} and {past[0][0].shape[2]} cached tokens"
            )
        feeds: dict[str, NDArray[Any]] = {
            names.GRAPH_INPUT_IDS: ids,
            names.GRAPH_ATTENTION_MASK: mask,
            names.GRAPH_POSITION_IDS: (
                position_ids(mask, ids.shape[1])
                if positions is None
                else np.ascontiguousarray(positions, dtype=np.int64)
            ),
        }
        for i, (key, value) in enumerate(past):
            feeds[names.past_key(i)] = key
            feeds[names.past_value(i)] = value
        out = self.session.run(self._outputs, feeds)
        present = [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(self.num_layers)]
        return out[0], present


def greedy(
    session: DecoderSession,
    input_ids: NDArray[np.int64],
    attention_mask: NDArray[np.int64] | None,
    max_new_tokens: int,
) -> NDArray[np.int64]:
    """Greedy decoding with the cache: the prompt in one step, then one token per step.

    Returns the new tokens [B, max_new_tokens] (no end-of-sequence stop: tests compare
    fixed-length runs). Left padding is handled by the mask and position_ids.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
    cache = session.empty_cache(ids.shape[0])
    tokens: list[NDArray[np.int64]] = []
    step_ids = ids
    for _ in range(max_new_tokens):
        logits, cache = session.step(step_ids, mask, cache)
        step_ids = np.argmax(logits[:, -1, :], axis=-1).astype(np.int64)[:, None]
        tokens.append(step_ids)
        mask = np.concatenate([mask, np.ones_like(step_ids)], axis=1)
    if not tokens:
        return np.zeros((ids.shape[0], 0), np.int64)
    return np.concatenate(tokens, axis=1)
