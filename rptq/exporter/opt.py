"""Build the FP graph of an OPT model directly from its weights (docs/graph.md): the prefill
graph, or the decoder-with-past graph that serves prefill and decode with a KV cache.

The graph is written with onnx.helper rather than traced with torch.onnx.export: tracing emits
different graphs per torch version (Gemm vs MatMul, weight Transposes, extra LayerNorm outputs,
lost initializer names), while the passes need one fixed structure with Hugging Face names. Each
decoder layer is read in fp32, converted to the export dtype and dropped before the next one, so
peak memory is the graph plus one fp32 layer. The graph reproduces rptq.model.forward op for op.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import numpy as np
import onnx
import torch
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

import rptq
from rptq import names
from rptq.errors import ConfigError
from rptq.exporter.graph_io import (
    ONNX_DTYPES,
    PREFILL_INPUTS,
    cache_dtype,
    cache_infos,
    hidden_info,
    logits_info,
    mask_info,
    token_inputs,
)
from rptq.exporter.options import ExportDtype
from rptq.model.forward import LN_EPS, POSITION_OFFSET, LayerWeights, read_layer
from rptq.model.load import LoadedModel
from rptq.model.shape import OptShape
from rptq.model.weights import EMBED_POSITIONS, EMBED_TOKENS, FINAL_LN, LM_HEAD
from rptq.plan import KvCacheDtype
from rptq.points import Act

MIN_OPSET, MAX_OPSET = 21, 25  # Q/DQ with INT4/INT16 needs 21; TensorRT 11 parses up to 25
_NP_DTYPES: dict[str, type[np.floating[Any]]] = {"float32": np.float32, "float16": np.float16}


# metadata_props keys written on every exported model
META_VERSION = "rptq.version"
META_DTYPE = "rptq.dtype"
META_NUM_LAYERS = "rptq.num_layers"
META_SHAPE = "rptq.shape"
META_CONFIG_HASH = "rptq.config_hash"
# written on with-past graphs only (prefill exports keep their bytes)
META_PAST = "rptq.past"
META_KV_CACHE_DTYPE = "rptq.kv_cache_dtype"


def output_name(module_path: str, role: str) -> str:
    """Tensor written by node `<module>/<role>` when it is not a named activation or output.

    docs/naming.md lists these intermediates (e.g. the attention scores are
    `output_name(L.self_attn, "scores")`). Passes must not import this module (it imports torch):
    they spell it `names.tensor(module, f"{role}_output")`.
    """
    return names.tensor(module_path, f"{role}_output")


class _GraphBuilder:
    """Collects nodes and initializers and refuses duplicate names (an exporter bug)."""

    def __init__(
        self,
        dtype: ExportDtype,
        inputs: tuple[str, ...] = PREFILL_INPUTS,
    ) -> None:
        self.np_dtype = _NP_DTYPES[dtype]
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._node_names: set[str] = set()
        self._tensor_names: set[str] = set(inputs)

    def _claim_tensor(self, name: str) -> None:
        assert name not in self._tensor_names, f"tensor {name} defined twice"
        self._tensor_names.add(name)

    def constant(self, name: str, array: NDArray[Any]) -> str:
        """Add an initializer (already in its final dtype and layout); returns its name."""
        self._claim_tensor(name)
        self.initializers.append(numpy_helper.from_array(np.asarray(array, order="C"), name))
        return name

    def float_constant(self, name: str, array: NDArray[Any] | torch.Tensor | float) -> str:
        """Add a float initializer converted to the export dtype."""
        if isinstance(array, torch.Tensor):
            array = array.detach().to(torch.float32).numpy()
        return self.constant(name, np.asarray(array, dtype=np.float32).astype(self.np_dtype))

    def op(
        self,
        op_type: str,
        inputs: list[str],
        module_path: str,
        role: str | None = None,
        output: str | None = None,
        **attrs: Any,
    ) -> str:
        """Add node `<module>/<role or op_type>`; its output defaults to `output_name(...)`."""
        role = role or op_type
        node_name = names.node(module_path, role)
        assert node_name not in self._node_names, f"node {node_name} defined twice"
        self._node_names.add(node_name)
        out = output or output_name(module_path, role)
        self._claim_tensor(out)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=node_name, **attrs))
        return out


def _linear(
    g: _GraphBuilder, x: str, module_path: str, w: torch.Tensor, b: torch.Tensor, output: str
) -> str:
    """`MatMul(x, W^T)` then `Add(bias)`: the weight is stored [in, out] so no Transpose."""
    weight = g.float_constant(names.weight(module_path), w.T)
    bias = g.float_constant(names.bias(module_path), b)
    y = g.op("MatMul", [x, weight], module_path)
    return g.op("Add", [y, bias], module_path, output=output)


def _layer_norm(
    g: _GraphBuilder, x: str, module_path: str, gamma: torch.Tensor, beta: torch.Tensor, output: str
) -> str:
    """LayerNormalization with one output: TensorRT rejects the Mean/InvStdDev outputs."""
    scale = g.float_constant(names.weight(module_path), gamma)
    shift = g.float_constant(names.bias(module_path), beta)
    return g.op(
        "LayerNormalization",
        [x, scale, shift],
        module_path,
        output=output,
        axis=-1,
        epsilon=LN_EPS,
        stash_type=1,
    )


def _embeddings(g: _GraphBuilder, model: LoadedModel, past: bool = False) -> str:
    """Token plus learned position embeddings; positions count only unmasked tokens.

    The prefill graph counts them from the mask; the with-past graph reads `position_ids`
    (the mask covers the past too, so its count would need slicing) as optimum feeds them.
    """
    tokens_module, positions_module = names.EMBED_TOKENS, names.EMBED_POSITIONS
    table = g.float_constant(names.weight(tokens_module), model.weights.get(EMBED_TOKENS))
    tokens = g.op(
        "Gather",
        [table, names.GRAPH_INPUT_IDS],
        tokens_module,
        axis=0,
        output=names.tensor(tokens_module, "output"),
    )

    mask = names.GRAPH_ATTENTION_MASK
    if past:
        count = names.GRAPH_POSITION_IDS
    else:
        axis = g.constant(names.tensor(positions_module, "cumsum_axis"), np.array(1, np.int64))
        one = g.constant(names.tensor(positions_module, "one"), np.array(1, np.int64))
    offset = g.constant(
        names.tensor(positions_module, "offset"), np.array(POSITION_OFFSET, np.int64)
    )
    if not past:
        # TensorRT's CumSum takes float only; float32 counts exactly up to 2**24 tokens
        count = g.op("Cast", [mask], positions_module, "mask_float", to=TensorProto.FLOAT)
        count = g.op("CumSum", [count, axis], positions_module)
        count = g.op("Cast", [count], positions_module, "count_int", to=TensorProto.INT64)
        count = g.op("Mul", [count, mask], positions_module)
        count = g.op("Sub", [count, one], positions_module)
    positions = g.op(
        "Add", [count, offset], positions_module, output=names.tensor(positions_module, "positions")
    )
    position_table = g.float_constant(
        names.weight(positions_module), model.weights.get(EMBED_POSITIONS)
    )
    position_embeds = g.op(
        "Gather",
        [position_table, positions],
        positions_module,
        axis=0,
        output=names.tensor(positions_module, "output"),
    )
    return g.op("Add", [tokens, position_embeds], names.DECODER, "embed_add")


def _additive_mask(g: _GraphBuilder, past: bool = False) -> str:
    """[B, 1, S, T] additive mask: 0 where a query may attend, the dtype's lowest elsewhere.

    Same values as rptq.model.forward.causal_mask: causal (lower-triangular ones) AND the key
    is not padding. Prefill: S = T. With past, query i sits at position P + i of the T = P + S
    keys (P cached), so the triangle is shifted right by P (Trilu's k).
    """
    module_path, mask = names.MASK_MODULE, names.GRAPH_ATTENTION_MASK
    length = g.op("Shape", [mask], module_path, start=1, end=2)  # [T]
    queries = length
    if past:
        queries = g.op(
            "Shape", [names.GRAPH_INPUT_IDS], module_path, "query_length", start=1, end=2
        )  # [S]
    square = g.op("Concat", [queries, length], module_path, axis=0)  # [S, T]
    ones = g.op(
        "ConstantOfShape",
        [square],
        module_path,
        value=numpy_helper.from_array(np.array([True]), "value"),
    )
    if past:
        shift = g.op("Sub", [length, queries], module_path, "past_length")  # [P]
        axes = g.constant(names.tensor(module_path, "squeeze_axes"), np.array([0], np.int64))
        shift = g.op("Squeeze", [shift, axes], module_path)  # scalar P
        causal = g.op("Trilu", [ones, shift], module_path, upper=0)
    else:
        causal = g.op("Trilu", [ones], module_path, upper=0)
    keep = g.op("Cast", [mask], module_path, to=TensorProto.BOOL)
    axes = g.constant(names.tensor(module_path, "unsqueeze_axes"), np.array([1, 2], np.int64))
    keys = g.op("Unsqueeze", [keep, axes], module_path)  # [B, 1, 1, T]
    allowed = g.op("And", [causal, keys], module_path)  # [B, 1, T, T]
    zero = g.float_constant(names.tensor(module_path, "attend"), 0.0)
    lowest = g.constant(
        names.tensor(module_path, "masked"), np.array(np.finfo(g.np_dtype).min, g.np_dtype)
    )
    return g.op(
        "Where", [allowed, zero, lowest], module_path, output=names.tensor(module_path, "output")
    )


def _attention(
    g: _GraphBuilder,
    index: int,
    a: str,
    w: LayerWeights,
    mask: str,
    shape: OptShape,
    past: bool = False,
) -> str:
    """Eager multi-head attention of one layer; returns the out_proj input (heads merged).

    With `past`, this step's keys and values (after their activation Q/DQ, which the passes put
    on `k`/`v` before the Reshape) are appended to the cache inputs along the sequence axis;
    the Concats write the `present` outputs, and attention reads the whole cache.
    """
    attn = names.module(index, "self_attn")
    heads, head_dim = shape.num_heads, shape.head_dim

    def proj(name: str, output: str) -> str:
        path = names.module(index, name)
        return _linear(g, a, path, w[f"{name}.weight"], w[f"{name}.bias"], output)

    q_proj = proj("self_attn.q_proj", names.act_tensor(index, Act.Q_PROJ_OUT))
    scaling = g.float_constant(names.tensor(attn, "q_scale_factor"), head_dim**-0.5)
    q = g.op("Mul", [q_proj, scaling], attn, "q_scale", output=names.act_tensor(index, Act.Q))
    k = proj("self_attn.k_proj", names.act_tensor(index, Act.K))
    v = proj("self_attn.v_proj", names.act_tensor(index, Act.V))

    # 0 copies the input dim, so the Reshapes work for any batch and sequence length
    split = g.constant(
        names.tensor(attn, "split_heads_shape"), np.array([0, 0, heads, head_dim], np.int64)
    )
    merge = g.constant(
        names.tensor(attn, "merge_heads_shape"), np.array([0, 0, shape.hidden_size], np.int64)
    )

    def heads_of(x: str, name: str, perm: list[int]) -> str:
        x = g.op("Reshape", [x, split], attn, f"{name}_reshape")
        return g.op("Transpose", [x], attn, f"{name}_transpose", perm=perm)

    q_heads = heads_of(q, "q", [0, 2, 1, 3])  # [B, H, T, hd]
    if past:
        k_new = heads_of(k, "k", [0, 2, 1, 3])  # [B, H, S, hd]
        v_new = heads_of(v, "v", [0, 2, 1, 3])
        keys = g.op(
            "Concat",
            [names.past_key(index), k_new],
            attn,
            "k_concat",
            output=names.present_key(index),
            axis=2,
        )  # [B, H, P + S, hd]
        v_heads = g.op(
            "Concat",
            [names.past_value(index), v_new],
            attn,
            "v_concat",
            output=names.present_value(index),
            axis=2,
        )
        k_heads_t = g.op("Transpose", [keys], attn, "k_cache_transpose", perm=[0, 1, 3, 2])
    else:
        k_heads_t = heads_of(k, "k", [0, 2, 3, 1])  # [B, H, hd, T]
        v_heads = heads_of(v, "v", [0, 2, 1, 3])  # [B, H, T, hd]
    scores = g.op("MatMul", [q_heads, k_heads_t], attn, "scores")
    scores = g.op("Add", [scores, mask], attn, "mask_add")
    probs = g.op("Softmax", [scores], attn, axis=-1, output=names.act_tensor(index, Act.ATTN_PROBS))
    context = g.op("MatMul", [probs, v_heads], attn, "context")  # [B, H, T, hd]
    context = g.op("Transpose", [context], attn, "context_transpose", perm=[0, 2, 1, 3])
    return g.op(
        "Reshape",
        [context, merge],
        attn,
        "context_reshape",
        output=names.act_tensor(index, Act.OUT_PROJ_IN),
    )


def _decoder_layer(
    g: _GraphBuilder,
    index: int,
    hidden: str,
    w: LayerWeights,
    mask: str,
    shape: OptShape,
    past: bool = False,
) -> str:
    """Pre-LN OPT decoder layer (docs/graph.md, "Decoder layer L")."""
    layer = names.layer(index)

    def linear(name: str, x: str, output: str) -> str:
        path = names.module(index, name)
        return _linear(g, x, path, w[f"{name}.weight"], w[f"{name}.bias"], output)

    a = _layer_norm(
        g,
        hidden,
        names.module(index, "self_attn_layer_norm"),
        w["self_attn_layer_norm.weight"],
        w["self_attn_layer_norm.bias"],
        names.act_tensor(index, Act.ATTN_LN_OUT),
    )
    o = _attention(g, index, a, w, mask, shape, past)
    o = linear(
        "self_attn.out_proj", o, names.tensor(names.module(index, "self_attn.out_proj"), "output")
    )
    hidden = g.op("Add", [hidden, o], layer, "attn_residual")

    c = _layer_norm(
        g,
        hidden,
        names.module(index, "final_layer_norm"),
        w["final_layer_norm.weight"],
        w["final_layer_norm.bias"],
        names.act_tensor(index, Act.FFN_LN_OUT),
    )
    r = linear("fc1", c, names.tensor(names.module(index, "fc1"), "output"))
    r = g.op(
        "Relu",
        [r],
        names.module(index, "activation_fn"),
        output=names.act_tensor(index, Act.FC2_IN),
    )
    r = linear("fc2", r, names.tensor(names.module(index, "fc2"), "output"))
    return g.op("Add", [hidden, r], layer, "ffn_residual", output=names.tensor(layer, "output"))


def _head(g: _GraphBuilder, model: LoadedModel, hidden: str) -> str:
    """Final LayerNorm and the LM head, which reuses the token embedding when tied."""
    ln = names.FINAL_LAYER_NORM
    hidden = _layer_norm(
        g,
        hidden,
        ln,
        model.weights.get(f"{FINAL_LN}.weight"),
        model.weights.get(f"{FINAL_LN}.bias"),
        names.tensor(ln, "output"),
    )
    table = names.weight(names.EMBED_TOKENS)
    if LM_HEAD in set(model.weights.names()):
        head = model.weights.get(LM_HEAD)
        if not torch.equal(head, model.weights.get(EMBED_TOKENS)):
            # untied head (no OPT checkpoint has one): stored [V, d] like the embedding
            table = g.float_constant(names.weight(names.LM_HEAD), head)
    head_t = g.op("Transpose", [table], names.LM_HEAD, perm=[1, 0])  # [d, V]
    return g.op("MatMul", [hidden, head_t], names.LM_HEAD, output=names.GRAPH_LOGITS)


def _check_args(model: LoadedModel, dtype: str, opset: int) -> None:
    if dtype not in _NP_DTYPES:
        raise ConfigError(f"export dtype {dtype!r} is not supported; use float32 or float16")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConfigError(
            f"opset {opset} is outside {MIN_OPSET}..{MAX_OPSET} (Q/DQ needs 21, TensorRT 11 "
            f"parses up to 25); pass --opset between {MIN_OPSET} and {MAX_OPSET}"
        )


def layer_input(index: int) -> str:
    """The hidden state entering decoder layer `index` (the embeddings' sum for layer 0)."""
    if index == 0:
        return output_name(names.DECODER, "embed_add")
    return names.tensor(names.layer(index - 1), "output")


def _model_proto(
    g: _GraphBuilder,
    model: LoadedModel,
    dtype: ExportDtype,
    opset: int,
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    kv_cache_dtype: KvCacheDtype | None = None,
) -> onnx.ModelProto:
    """Wrap the builder's nodes in a model with rptq's opset, producer and metadata.

    `kv_cache_dtype` None: the prefill graph; otherwise the with-past graph, whose metadata
    says so (`rptq.past`, `rptq.kv_cache_dtype`: what the finished export stores, even though
    the FP graph's cache is float until the integer-cache pass runs).
    """
    shape = model.shape
    # filled in place: helper.make_graph + make_model would copy every weight twice
    opsets = [helper.make_opsetid("", opset)]
    proto = onnx.ModelProto(
        ir_version=helper.find_min_ir_version_for(opsets),
        producer_name="rptq",
        producer_version=rptq.__version__,
    )
    proto.opset_import.extend(opsets)
    graph = proto.graph
    kind = "prefill" if kv_cache_dtype is None else "with-past"
    graph.name = f"rptq-{model.name}-{kind}"
    graph.node.extend(g.nodes)
    graph.input.extend(inputs)
    graph.output.extend(outputs)
    for i, tensor in enumerate(g.initializers):
        graph.initializer.append(tensor)
        g.initializers[i] = None  # type: ignore[call-overload]  # the copy in `graph` remains
    props = {
        META_VERSION: rptq.__version__,
        META_DTYPE: dtype,
        META_NUM_LAYERS: str(shape.num_layers),
        META_SHAPE: json.dumps(asdict(shape), sort_keys=True),
        META_CONFIG_HASH: shape.config_hash(),
    }
    if kv_cache_dtype is not None:
        props[META_PAST] = "1"
        props[META_KV_CACHE_DTYPE] = kv_cache_dtype
    helper.set_model_props(proto, props)
    return proto


def build_fp_graph(
    model: LoadedModel,
    dtype: ExportDtype = "float32",
    opset: int = 21,
    past: bool = False,
    kv_cache_dtype: KvCacheDtype = "float",
) -> onnx.ModelProto:
    """The FP graph of docs/graph.md: prefill (input_ids, attention_mask -> logits), or with
    `past` the decoder-with-past graph (plus position_ids and the cache in, present out).

    float16 makes every float tensor float16, Softmax included (the functional forward runs
    softmax in fp32; ORT and TensorRT accumulate fp16 softmax in fp32 internally, and
    LayerNormalization uses stash_type=1, i.e. fp32 statistics). `kv_cache_dtype` is only
    recorded in the metadata here: the integer cache is made by a pass (rptq.passes.kv_cache).
    """
    _check_args(model, dtype, opset)
    cache = cache_dtype(past, kv_cache_dtype)
    shape = model.shape
    inputs, outputs = token_inputs(past), [logits_info(dtype, shape, past)]
    for index in range(shape.num_layers if past else 0):
        past_infos, present_infos = cache_infos(index, dtype, shape)
        inputs += past_infos
        outputs += present_infos
    g = _GraphBuilder(dtype, tuple(info.name for info in inputs))
    hidden = _embeddings(g, model, past)
    mask = _additive_mask(g, past)
    for index in range(shape.num_layers):
        weights = read_layer(model.weights, index, dtype=torch.float32)
        hidden = _decoder_layer(g, index, hidden, weights, mask, shape, past)
        del weights
    _head(g, model, hidden)
    return _model_proto(g, model, dtype, opset, inputs, outputs, cache)


# --- fragments: the same graph cut at the residual stream, for the streamed export ------------
# Each fragment is a valid model whose inputs and outputs carry the whole graph's tensor names,
# so that joining the fragments' nodes gives back build_fp_graph (rptq.exporter.stream). With
# past, each layer fragment also has its layer's cache inputs and present outputs: graph inputs
# and outputs of the whole graph, which the streamed export collects in build_fp_graph's order.


def prologue_fragment(
    model: LoadedModel,
    dtype: ExportDtype = "float32",
    opset: int = 21,
    past: bool = False,
    kv_cache_dtype: KvCacheDtype = "float",
) -> onnx.ModelProto:
    """Embeddings and the additive mask: input_ids, attention_mask -> hidden, mask."""
    _check_args(model, dtype, opset)
    cache = cache_dtype(past, kv_cache_dtype)
    inputs = token_inputs(past)
    g = _GraphBuilder(dtype, tuple(info.name for info in inputs))
    hidden = _embeddings(g, model, past)
    _additive_mask(g, past)
    outputs = [hidden_info(hidden, dtype, model.shape, past), mask_info(dtype, past)]
    return _model_proto(g, model, dtype, opset, inputs, outputs, cache)


def layer_fragment(
    model: LoadedModel,
    index: int,
    dtype: ExportDtype = "float32",
    opset: int = 21,
    past: bool = False,
    kv_cache_dtype: KvCacheDtype = "float",
) -> onnx.ModelProto:
    """Decoder layer `index` alone: its input hidden state and the mask (and its cache) -> its
    output (and its present)."""
    _check_args(model, dtype, opset)
    cache = cache_dtype(past, kv_cache_dtype)
    shape = model.shape
    mask = mask_info(dtype, past)
    inputs = [hidden_info(layer_input(index), dtype, shape, past), mask]
    past_infos, present_infos = cache_infos(index, dtype, shape) if past else ([], [])
    inputs += past_infos
    g = _GraphBuilder(dtype, inputs=tuple(info.name for info in inputs))
    weights = read_layer(model.weights, index, dtype=torch.float32)
    hidden = _decoder_layer(g, index, layer_input(index), weights, mask.name, shape, past)
    del weights
    outputs = [hidden_info(hidden, dtype, shape, past), *present_infos]
    return _model_proto(g, model, dtype, opset, inputs, outputs, cache)


def head_fragment(
    model: LoadedModel,
    dtype: ExportDtype = "float32",
    opset: int = 21,
    past: bool = False,
    kv_cache_dtype: KvCacheDtype = "float",
) -> onnx.ModelProto:
    """Final LayerNorm and LM head: the last layer's output -> logits."""
    _check_args(model, dtype, opset)
    cache = cache_dtype(past, kv_cache_dtype)
    shape = model.shape
    hidden = layer_input(shape.num_layers)
    # a tied head reads the prologue's token embedding: an input of this fragment
    table = helper.make_tensor_value_info(
        names.weight(names.EMBED_TOKENS),
        ONNX_DTYPES[dtype],
        [shape.vocab_size, shape.hidden_size],
    )
    g = _GraphBuilder(dtype, inputs=(hidden, table.name))
    _head(g, model, hidden)
    inputs = [hidden_info(hidden, dtype, shape, past)]
    if any(table.name in node.input for node in g.nodes):
        inputs.append(table)
    outputs = [logits_info(dtype, shape, past)]
    return _model_proto(g, model, dtype, opset, inputs, outputs, cache)
