"""Store the KV cache of a with-past graph as the plan's K/V codes (1 byte per element).

After insert_act_qdq, each layer's new keys and values already pass through the plan's
per-cluster quantizer before they are reshaped into heads and appended to the cache (docs/graph.md,
"Decoder with past"). This pass moves the cache to the integer side of that quantizer. Behind
the elementwise form (rptq.passes.elementwise_quant) the codes are already on RPTQ's grid: an Add
of the zero point (+128 for uint8) and a Cast write them in the cache's type. Behind a per-axis
Q/DQ pair, a QuantizeLinear with the same scales writes them (zero point shifted likewise) and a
Clip keeps them on the bits-wide grid. The Reshape/Transpose/Concat then carry codes, so
`past_key_values.*` and `present.*` are int8/uint8, and right after the Concat the whole cache is
dequantized: Cast -> Sub(zero point) -> Mul(scale).

The dequantization is written out rather than a DequantizeLinear because ONNX's per-axis
DequantizeLinear takes a 1-D scale on one axis, while in the cache layout [B, H, P, hd] a
channel's cluster depends on two axes (head and head dim): the scale and zero point are
stored as [H, 1, hd] float initializers (`names.kv_cache`), which clients can read. The values
equal the float graph's exactly: code and zero point are small integers, exact in float, so
(code - z) * s is one rounding, as in DequantizeLinear.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from numpy.typing import NDArray

from rptq import names
from rptq.errors import ConfigError, GraphPatternError
from rptq.passes.context import PassContext, PassResult
from rptq.passes.graph_ops import (
    GraphIndex,
    add_cast,
    graph_float_dtype,
    onnx_type,
    rewire_consumers,
)
from rptq.plan import ActQuant, QuantPlan
from rptq.points import Act
from rptq.quant.qparams import grid_bounds

CACHE_TYPES: dict[str, type[np.integer]] = {"int8": np.int8, "uint8": np.uint8}
# uint8 codes are the signed grid's codes plus 128 (zero point likewise)
CODE_SHIFT = {"int8": 0, "uint8": 128}
_ACTS = ((Act.K, "k"), (Act.V, "v"))
_PATTERN = (
    "<act>/QuantizeLinear -> DequantizeLinear [-> Max -> Min] (or <act>/Div -> Round -> Max -> "
    "Min -> Mul) -> <attn>/{r}_reshape -> {r}_transpose -> {r}_concat (with the past input) -> "
    "present (docs/graph.md)"
)


@dataclass(frozen=True)
class CacheEdit:
    """One layer's key or value cache: the nodes found and the constants to add."""

    act_name: str
    # the float activation the plan's QuantizeLinear reads, or the elementwise quantizer's codes
    source: gs.Variable
    scale: gs.Constant  # per-channel, graph (folded) order, the plan's Q/DQ scale
    reshape: gs.Node
    transpose: gs.Node
    concat: gs.Node
    past: gs.Variable
    present: gs.Variable
    quantize_zero: NDArray[np.integer]  # the cache Q's zero point, per channel
    clip: tuple[NDArray[np.integer], NDArray[np.integer]] | None
    offset: NDArray[np.float32] | None  # elementwise form: codes + offset are the cache's codes
    cache_scale: NDArray[np.floating]  # [H, 1, hd]
    cache_zero: NDArray[np.floating]  # [H, 1, hd]


def cache_layers(graph: gs.Graph) -> list[int]:
    """Decoder layers whose cache is a graph input here (all of them, or a fragment's one)."""
    prefix, suffix = names.PAST_PREFIX, ".key"
    found = [
        t.name[len(prefix) : -len(suffix)]
        for t in graph.inputs
        if t.name.startswith(prefix) and t.name.endswith(suffix)
    ]
    return sorted(int(i) for i in found if i.isdigit())


def check_cache_plan(plan: QuantPlan | None, kv_cache_dtype: str, num_layers: int) -> None:
    """An integer cache stores the plan's K/V codes: every layer must quantize K and V to at
    most 8 bits. Checked before the export starts (the pass checks again per layer)."""
    if kv_cache_dtype == "float":
        return
    for layer in range(num_layers):
        for act, _ in _ACTS:
            _plan_quant(plan, layer, act, kv_cache_dtype)


def _plan_quant(plan: QuantPlan | None, layer: int, act: Act, kv_cache_dtype: str) -> ActQuant:
    quant = None if plan is None else plan.act(layer, act)
    if quant is None or quant.bits > 8:
        raise ConfigError(
            f"--kv-cache-dtype {kv_cache_dtype} stores the plan's K/V codes, but layer {layer}'s "
            f"{act} is not quantized to 8 bits or fewer; quantize K/V (--abits 8 or lower, or "
            "--only-quant-kv) or use --kv-cache-dtype float"
        )
    return quant


def _only_consumer(tensor: gs.Tensor, op: str, name: str, pattern: str) -> gs.Node:
    consumers = list(tensor.outputs)
    if len(consumers) != 1 or consumers[0].op != op or consumers[0].name != name:
        found = ", ".join(f"{n.name} ({n.op})" for n in consumers) or "nothing"
        raise GraphPatternError(f"tensor {tensor.name} feeds {found}; expected {pattern}")
    return consumers[0]


def _prepare(
    index: GraphIndex, ctx: PassContext, layer: int, act: Act, role: str, heads: int
) -> CacheEdit:
    """Check one cache and compute its constants (no graph edits)."""
    kind = ctx.kv_cache_dtype
    quant = _plan_quant(ctx.plan, layer, act, kind)
    act_name = names.act_tensor(layer, act)
    qdq = names.qdq(act_name)
    attn = names.module(layer, "self_attn")
    pattern = _PATTERN.format(r=role)
    cache_names = names.kv_cache(act_name)
    for key in ("quantize", "offset_node"):
        if cache_names[key] in index.nodes:
            raise GraphPatternError(f"node {cache_names[key]} exists already")
    if qdq["quantize"] in index.nodes:
        quantize = index.node(qdq["quantize"], "QuantizeLinear", pattern)
        source, scale, zero = quantize.inputs[0], quantize.inputs[1], quantize.inputs[2]
        if not isinstance(source, gs.Variable) or not isinstance(scale, gs.Constant):
            raise GraphPatternError(f"node {quantize.name} does not read {act_name}; {pattern}")
        if not isinstance(zero, gs.Constant):
            raise GraphPatternError(f"node {quantize.name} has no constant zero point; {pattern}")
        zero_values = np.asarray(zero.values).astype(np.int64)
        codes = None
    else:
        codes, scale, zero_values = _elementwise_codes(index, act_name, quant.bits, pattern)
        source = codes
    dequantized = index.tensors.get(qdq["dequantized"])
    if dequantized is None:
        raise GraphPatternError(f"tensor {qdq['dequantized']} not found; expected {pattern}")
    reshape = _only_consumer(dequantized, "Reshape", names.node(attn, f"{role}_reshape"), pattern)
    transpose = _only_consumer(
        reshape.outputs[0], "Transpose", names.node(attn, f"{role}_transpose"), pattern
    )
    concat = _only_consumer(
        transpose.outputs[0], "Concat", names.node(attn, f"{role}_concat"), pattern
    )
    past_name = names.past_key(layer) if act is Act.K else names.past_value(layer)
    present_name = names.present_key(layer) if act is Act.K else names.present_value(layer)
    past, present = concat.inputs[0], concat.outputs[0]
    if past.name != past_name or present.name != present_name:
        raise GraphPatternError(
            f"node {concat.name} joins {past.name} -> {present.name}; expected {past_name} -> "
            f"{present_name}"
        )
    assert isinstance(past, gs.Variable)
    assert isinstance(present, gs.Variable)
    shift = CODE_SHIFT[kind]
    qmin, qmax = grid_bounds(quant.bits)
    width = zero_values.shape[0] if zero_values.ndim == 1 else 0
    if width == 0 or width % heads:
        raise GraphPatternError(
            f"quantizer of {act_name} has zero point shape {list(zero_values.shape)}; expected "
            f"one per channel ({heads} heads)"
        )
    info = np.iinfo(CACHE_TYPES[kind])
    shifted = zero_values + shift
    container = (
        CACHE_TYPES[kind]
        if shifted.min() >= info.min and shifted.max() <= info.max
        else np.int16  # the zero point lies outside the cache type; the codes never do
    )
    bounds = (qmin + shift, qmax + shift)
    clip = None
    if bounds != (np.iinfo(container).min, np.iinfo(container).max):
        # ORT's CPU Clip has no int16 kernel (it would expand Clip into a Where, which has
        # none either): int16 codes are clipped as int32
        clip_type = np.int32 if container == np.int16 else container
        clip = (np.array(bounds[0], clip_type), np.array(bounds[1], clip_type))
    dtype = graph_float_dtype(index.graph)
    head_dim = width // heads
    scale_values = np.asarray(scale.values, dtype=np.float32).reshape(heads, 1, head_dim)
    return CacheEdit(
        act_name=act_name,
        source=source,
        scale=scale,
        reshape=reshape,
        transpose=transpose,
        concat=concat,
        past=past,
        present=present,
        quantize_zero=shifted.astype(container),
        clip=clip,
        offset=None if codes is None else shifted.astype(np.float32),
        cache_scale=scale_values.astype(dtype),
        cache_zero=shifted.reshape(heads, 1, head_dim).astype(dtype),
    )


def _elementwise_codes(
    index: GraphIndex, act_name: str, bits: int, pattern: str
) -> tuple[gs.Variable, gs.Constant, NDArray[np.int64]]:
    """The elementwise quantizer's codes tensor, its scale and its zero points (graph order),
    read back from its code bounds: z = qmin - code_min."""
    n = names.act_quant(act_name)
    clamp = index.node(n["min_node"], "Min", pattern)
    low = index.node(n["max_node"], "Max", pattern)
    divide = index.node(n["div_node"], "Div", pattern)
    codes, scale, code_min = clamp.outputs[0], divide.inputs[1], low.inputs[1]
    if not isinstance(scale, gs.Constant) or not isinstance(code_min, gs.Constant):
        raise GraphPatternError(f"node {divide.name} or {low.name} has no constant; {pattern}")
    assert isinstance(codes, gs.Variable)
    qmin, _ = grid_bounds(bits)
    zero = qmin - np.asarray(code_min.values, dtype=np.float64)
    return codes, scale, np.rint(zero).astype(np.int64)


def _apply(graph: gs.Graph, edit: CacheEdit, cache_type: np.dtype, dtype: np.dtype) -> None:
    if edit.offset is not None:
        _apply_codes(graph, edit, cache_type, dtype)
        return
    n = names.kv_cache(edit.act_name)
    shape = edit.source.shape
    zero = gs.Constant(n["quantize_zero_point"], edit.quantize_zero)
    codes = gs.Variable(n["codes"], dtype=edit.quantize_zero.dtype, shape=shape)
    graph.nodes.append(
        gs.Node(
            "QuantizeLinear",
            name=n["quantize"],
            attrs={"axis": 2},
            inputs=[edit.source, edit.scale, zero],
            outputs=[codes],
        )
    )
    if edit.clip is not None:
        if edit.clip[0].dtype != codes.dtype:
            codes = add_cast(graph, codes, edit.clip[0].dtype, n["widened"], n["widen_node"])
        clipped = gs.Variable(n["clipped"], dtype=codes.dtype, shape=shape)
        low = gs.Constant(n["clip_min"], edit.clip[0])
        high = gs.Constant(n["clip_max"], edit.clip[1])
        graph.nodes.append(
            gs.Node("Clip", name=n["clip"], inputs=[codes, low, high], outputs=[clipped])
        )
        codes = clipped
    if codes.dtype != cache_type:
        codes = add_cast(graph, codes, cache_type, n["narrowed"], n["narrow_node"])
    _carry_codes(graph, edit, codes, cache_type, dtype)


def _apply_codes(graph: gs.Graph, edit: CacheEdit, cache_type: np.dtype, dtype: np.dtype) -> None:
    """Behind the elementwise quantizer: cache codes = Cast(codes + offset), already on the grid."""
    n = names.kv_cache(edit.act_name)
    assert edit.offset is not None
    shape = edit.source.shape
    shifted = gs.Variable(n["shifted"], dtype=np.float32, shape=shape)
    offset = gs.Constant(n["code_offset"], edit.offset)
    graph.nodes.append(
        gs.Node("Add", name=n["offset_node"], inputs=[edit.source, offset], outputs=[shifted])
    )
    codes = add_cast(graph, shifted, cache_type, n["narrowed"], n["narrow_node"])
    _carry_codes(graph, edit, codes, cache_type, dtype)


def _carry_codes(
    graph: gs.Graph, edit: CacheEdit, codes: gs.Variable, cache_type: np.dtype, dtype: np.dtype
) -> None:
    """Feed `codes` to the cache's Reshape -> Transpose -> Concat and dequantize the Concat's
    output (the whole cache) for the attention that reads it."""
    n = names.kv_cache(edit.act_name)
    edit.reshape.inputs[0] = codes
    for tensor in (edit.reshape.outputs[0], edit.transpose.outputs[0], edit.past, edit.present):
        tensor.dtype = cache_type
    consumers = list(edit.present.outputs)
    wide = gs.Variable(n["cast_codes"], dtype=dtype)
    centered = gs.Variable(n["centered"], dtype=dtype)
    dequantized = gs.Variable(n["dequantized"], dtype=dtype)
    graph.nodes.append(
        gs.Node(
            "Cast",
            name=n["cast_node"],
            attrs={"to": onnx_type(dtype)},
            inputs=[edit.present],
            outputs=[wide],
        )
    )
    graph.nodes.append(
        gs.Node(
            "Sub",
            name=n["sub_node"],
            inputs=[wide, gs.Constant(n["zero_point"], edit.cache_zero)],
            outputs=[centered],
        )
    )
    graph.nodes.append(
        gs.Node(
            "Mul",
            name=n["mul_node"],
            inputs=[centered, gs.Constant(n["scale"], edit.cache_scale)],
            outputs=[dequantized],
        )
    )
    rewire_consumers(consumers, edit.present, dequantized)


def quantize_kv_cache(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """With `ctx.kv_cache_dtype` int8/uint8, make every cache input/output of `graph` integer
    codes (see the module docstring); with "float" (and on prefill graphs) do nothing.

    Preconditions, checked for every layer before the first edit: the plan quantizes the
    layer's K and V to at most 8 bits, insert_act_qdq has run, and the cache path is the
    with-past graph's Reshape -> Transpose -> Concat(past) -> present.
    """
    name = quantize_kv_cache.__name__
    if ctx.kv_cache_dtype == "float":
        return PassResult(name)
    layers = cache_layers(graph)
    if not layers:
        return PassResult(name)  # a streamed fragment without a decoder layer, or prefill
    cache_type = np.dtype(CACHE_TYPES[ctx.kv_cache_dtype])
    index = GraphIndex(graph)
    heads = _heads(graph, layers[0])
    edits = [
        _prepare(index, ctx, layer, act, role, heads) for layer in layers for act, role in _ACTS
    ]
    dtype = graph_float_dtype(graph)
    for edit in edits:
        _apply(graph, edit, cache_type, dtype)
    return PassResult(
        name,
        counts={"layers": len(layers), "caches": len(edits)},
        touched=tuple(edit.present.name for edit in edits),
    )


def _heads(graph: gs.Graph, layer: int) -> int:
    past = next(t for t in graph.inputs if t.name == names.past_key(layer))
    shape = past.shape
    if shape is None or len(shape) != 4 or not isinstance(shape[1], int):
        raise GraphPatternError(
            f"graph input {past.name} has shape {shape}; expected [batch, heads, past, head_dim]"
        )
    return int(shape[1])
