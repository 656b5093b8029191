"""The graph's inputs and outputs (value infos), prefill or with past (docs/graph.md).

Shared by the whole-graph builder and its fragments (rptq.exporter.opt); torch-free. The
with-past graph spells its dim params as optimum and onnxruntime-genai do.
"""

from __future__ import annotations

from typing import get_args

import onnx
from onnx import TensorProto, helper

from rptq import names
from rptq.errors import ConfigError
from rptq.exporter.options import ExportDtype
from rptq.model.shape import OptShape
from rptq.plan import KvCacheDtype

ONNX_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}

# dim params of the with-past graph, spelled as optimum and onnxruntime-genai spell them
DIM_BATCH = "batch_size"
DIM_SEQUENCE = "sequence_length"
DIM_PAST = "past_sequence_length"
DIM_TOTAL = "total_sequence_length"
PREFILL_INPUTS = (names.GRAPH_INPUT_IDS, names.GRAPH_ATTENTION_MASK)


def dims(past: bool) -> tuple[str, str]:
    """(batch, sequence) dim params: the prefill graph's, or optimum's spelling with past."""
    return (DIM_BATCH, DIM_SEQUENCE) if past else ("batch", "sequence")


def hidden_info(
    name: str, dtype: ExportDtype, shape: OptShape, past: bool = False
) -> onnx.ValueInfoProto:
    """The residual stream [batch, sequence, d] (a fragment's cut point)."""
    return helper.make_tensor_value_info(name, ONNX_DTYPES[dtype], [*dims(past), shape.hidden_size])


def mask_info(dtype: ExportDtype, past: bool = False) -> onnx.ValueInfoProto:
    """The additive mask [batch, 1, S, T] every layer fragment reads."""
    batch, sequence = dims(past)
    return helper.make_tensor_value_info(
        names.tensor(names.MASK_MODULE, "output"),
        ONNX_DTYPES[dtype],
        [batch, 1, sequence, DIM_TOTAL if past else sequence],
    )


def token_inputs(past: bool = False) -> list[onnx.ValueInfoProto]:
    """input_ids and attention_mask (and position_ids with past), int64."""
    if not past:
        return [
            helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
            for name in PREFILL_INPUTS
        ]
    dims = {
        names.GRAPH_INPUT_IDS: [DIM_BATCH, DIM_SEQUENCE],
        names.GRAPH_ATTENTION_MASK: [DIM_BATCH, DIM_TOTAL],
        names.GRAPH_POSITION_IDS: [DIM_BATCH, DIM_SEQUENCE],
    }
    return [helper.make_tensor_value_info(n, TensorProto.INT64, d) for n, d in dims.items()]


def cache_infos(
    index: int, dtype: ExportDtype, shape: OptShape
) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    """(past inputs, present outputs) of decoder layer `index`: key then value, float cache."""
    heads, head_dim = shape.num_heads, shape.head_dim
    elem = ONNX_DTYPES[dtype]

    def info(name: str, length: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, elem, [DIM_BATCH, heads, length, head_dim])

    inputs = [info(names.past_key(index), DIM_PAST), info(names.past_value(index), DIM_PAST)]
    outputs = [
        info(names.present_key(index), DIM_TOTAL),
        info(names.present_value(index), DIM_TOTAL),
    ]
    return inputs, outputs


def logits_info(dtype: ExportDtype, shape: OptShape, past: bool = False) -> onnx.ValueInfoProto:
    """The logits output [batch, sequence, V] in the export dtype."""
    return helper.make_tensor_value_info(
        names.GRAPH_LOGITS, ONNX_DTYPES[dtype], [*dims(past), shape.vocab_size]
    )


def cache_dtype(past: bool, kv_cache_dtype: KvCacheDtype) -> KvCacheDtype | None:
    """The metadata's cache dtype (None: the prefill graph); an int cache needs `past`."""
    if kv_cache_dtype not in get_args(KvCacheDtype):
        raise ConfigError(f"kv cache dtype {kv_cache_dtype!r} is not one of float, int8, uint8")
    if not past and kv_cache_dtype != "float":
        raise ConfigError(
            f"--kv-cache-dtype {kv_cache_dtype} needs the KV-cache graph; drop --no-cache"
        )
    return kv_cache_dtype if past else None
