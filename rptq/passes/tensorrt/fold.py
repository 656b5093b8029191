"""Fold every activation's cluster scales and zero points into the graph (TensorRT variant).

After this pass each quantized activation X is produced as U = X/s + z, the integer-grid value
that a per-tensor QuantizeLinear with scale 1 and zero point 0 rounds (trt_qdq inserts it), and
every consumer computes with X̂ = s∘(U − z). Without Q/DQ the graph therefore computes the FP
model (up to float rounding of the folded constants): that is what tests check after this pass.
docs/tensorrt-rules.md ("Implementation") has the per-activation table:

- LayerNorm outputs: γ/s, β/s + z (exact); q/k/v and fc1 get X̂ in their rows and bias.
- q, k, v: 1/s and z in the projection's columns and bias (q also takes head_dim^-½, and its
  Mul goes); QKᵀ and P·V have no weight, so `Sub z`, `Mul s` restore X̂ before the reshape.
- attn_probs (per tensor, fixed grid): `Sub c` before the Q and `Add c` after, c = −z·s.
- out_proj_in: `Div s`, `Add z` after the head merge; out_proj gets X̂ in its rows and bias.
- fc2_in: 1/s in fc1's columns and bias (it commutes with ReLU), `Add z` after the ReLU (+z
  does not); fc2 gets X̂ in its rows and bias.

Linear weights are folded and quantized by trt_linears.plan_linear. All checks run before the
first edit; arrays are replaced, never written into.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs
from numpy.typing import NDArray

from rptq import names
from rptq.errors import GraphPatternError
from rptq.passes.context import PassContext, PassResult, folded_sites
from rptq.passes.graph_ops import GraphIndex, as_dtype, graph_float_dtype, rewire_consumers
from rptq.passes.tensorrt.acts import (
    CONSUMER_POINTWISE,
    PRODUCER_POINTWISE,
    ActVectors,
    act_digest,
    act_vectors,
    check_act_folded,
    is_trt_folded,
    record_trt_folded,
)
from rptq.passes.tensorrt.linears import LayerFold, plan_linear
from rptq.points import LAYERNORM_OF, LINEARS, Act
from rptq.quant.trt_weights import fold_layernorm_affine

LN_PATTERN = "LayerNormalization(h, <ln>.weight, <ln>.bias) -> <activation> (docs/graph.md)"
Q_SCALE_PATTERN = "q_proj/Add -> Mul(<attn>/q_scale_factor) -> <attn>/q (docs/graph.md)"

Edit = Callable[[], None]


def _variable(index: GraphIndex, name: str, pattern: str) -> gs.Variable:
    tensor = index.tensors.get(name)
    if not isinstance(tensor, gs.Variable) or not tensor.inputs or not tensor.outputs:
        raise GraphPatternError(f"tensor {name} not found with a producer and consumers; {pattern}")
    return tensor


def _pointwise(
    graph: gs.Graph, op: str, node: str, x: gs.Tensor, const: gs.Constant, out: str
) -> gs.Variable:
    output = gs.Variable(out, dtype=x.dtype, shape=x.shape)
    graph.nodes.append(gs.Node(op, name=node, inputs=[x, const], outputs=[output]))
    return output


def _plan_layernorm(index: GraphIndex, vec: ActVectors, dtype: np.dtype) -> Edit:
    """γ' = γ/s, β' = β/s + z: the LayerNorm writes U."""
    layer = vec.quant.layer
    module = names.module(layer, LAYERNORM_OF[vec.quant.act])
    ln = index.node(names.node(module, "LayerNormalization"), "LayerNormalization", LN_PATTERN)
    gamma = index.constant_input(ln, 1, names.weight(module), 1, LN_PATTERN)
    beta = index.constant_input(ln, 2, names.bias(module), 1, LN_PATTERN)
    if ln.outputs[0].name != names.act_tensor(layer, vec.quant.act):
        raise GraphPatternError(f"node {ln.name} does not write {vec.quant.act}; {LN_PATTERN}")
    if tuple(gamma.shape) != vec.scale.shape:
        raise GraphPatternError(
            f"node {ln.name}: gamma has {list(gamma.shape)} channels, {vec.quant.key} has "
            f"{vec.scale.shape[0]}"
        )
    new_gamma: NDArray[np.floating]
    new_beta: NDArray[np.floating]
    new_gamma, new_beta = fold_layernorm_affine(
        np.asarray(gamma.values, np.float32),
        np.asarray(beta.values, np.float32),
        vec.scale,
        vec.zero,
    )
    new_gamma = as_dtype(new_gamma, dtype, ln.name)
    new_beta = as_dtype(new_beta, dtype, ln.name)

    def edit() -> None:
        gamma.values, beta.values = new_gamma, new_beta

    return edit


def _plan_q_scale(index: GraphIndex, layer: int) -> tuple[Edit, float]:
    """Remove q's `Mul(head_dim^-½)` (q_proj's columns take it); returns it for the fold."""
    attn = names.module(layer, "self_attn")
    mul = index.node(names.node(attn, "q_scale"), "Mul", Q_SCALE_PATTERN)
    q_proj = names.module(layer, "self_attn.q_proj")
    add = index.node(names.node(q_proj, "Add"), "Add", Q_SCALE_PATTERN)
    factor = mul.inputs[1] if len(mul.inputs) == 2 else None
    q_proj_out = add.outputs[0]
    if (
        not isinstance(factor, gs.Constant)
        or factor.name != names.tensor(attn, "q_scale_factor")
        or factor.values.size != 1
        or mul.inputs[0] is not q_proj_out
        or len(q_proj_out.outputs) != 1
        or mul.outputs[0].name != names.act_tensor(layer, Act.Q)
    ):
        raise GraphPatternError(f"node {mul.name} does not match {Q_SCALE_PATTERN}")
    q = mul.outputs[0]

    def edit() -> None:
        mul.inputs.clear()
        mul.outputs.clear()  # cleanup() drops the node, its constant and q_proj's old output
        add.outputs[0] = q

    return edit, float(np.asarray(factor.values, np.float64).reshape(()))


def _probs_offset(vec: ActVectors, dtype: np.dtype, name: str) -> np.ndarray:
    """c = −z·s of a per-tensor activation: U = X − c lies on its scale's grid with zero 0."""
    if not vec.per_tensor:
        return np.zeros((), dtype)  # unused: cluster activations restore with Sub z, Mul s
    return as_dtype(-vec.zero.astype(np.float64) * vec.scale, dtype, name).reshape(())


def _plan_producer(graph: gs.Graph, index: GraphIndex, vec: ActVectors, dtype: np.dtype) -> Edit:
    """Pointwise U = X/s + z (out_proj_in), X + z (fc2_in, X already divided), X − c (probs)."""
    act, layer = vec.quant.act, vec.quant.layer
    name = names.act_tensor(layer, act)
    n = names.trt_act(name)
    x = _variable(index, name, f"activation {name} (docs/graph.md)")
    if n["folded"] in index.tensors:
        raise GraphPatternError(f"tensor {n['folded']} already exists: already folded")
    scale = as_dtype(vec.scale, dtype, name)
    zero = as_dtype(vec.zero, dtype, name)
    offset = _probs_offset(vec, dtype, name)

    def edit() -> None:
        folded = gs.Variable(n["folded"], dtype=x.dtype, shape=x.shape)
        rewire_consumers(list(x.outputs), x, folded)
        if act is Act.ATTN_PROBS:
            graph.nodes.append(
                gs.Node(
                    "Sub",
                    name=n["offset_node"],
                    inputs=[x, gs.Constant(n["offset"], offset)],
                    outputs=[folded],
                )
            )
            return
        source: gs.Tensor = x
        if act is Act.OUT_PROJ_IN:
            divisor = gs.Constant(n["div_scale"], scale)
            source = _pointwise(graph, "Div", n["div_node"], x, divisor, n["divided"])
        graph.nodes.append(
            gs.Node(
                "Add",
                name=n["shift_node"],
                inputs=[source, gs.Constant(n["shift"], zero)],
                outputs=[folded],
            )
        )

    return edit


def _plan_consumer(graph: gs.Graph, index: GraphIndex, vec: ActVectors, dtype: np.dtype) -> Edit:
    """Pointwise X̂ = s∘(U − z) (q, k, v: the BMMs have no weight) or X̂ = U + c (probs)."""
    act, layer = vec.quant.act, vec.quant.layer
    name = names.act_tensor(layer, act)
    n = names.trt_act(name)
    if n["restored"] in index.tensors:
        raise GraphPatternError(f"tensor {n['restored']} already exists: already folded")
    if act is not Act.ATTN_PROBS:
        _variable(index, name, f"activation {name} (docs/graph.md)")
    scale = as_dtype(vec.scale, dtype, name)
    zero = as_dtype(vec.zero, dtype, name)
    offset = _probs_offset(vec, dtype, name)

    def edit() -> None:
        # probs: the producer edit (run first) made <act>/folded
        source = graph.tensors()[n["folded"] if act is Act.ATTN_PROBS else name]
        restored = gs.Variable(n["restored"], dtype=source.dtype, shape=source.shape)
        rewire_consumers(list(source.outputs), source, restored)
        if act is Act.ATTN_PROBS:
            graph.nodes.append(
                gs.Node(
                    "Add",
                    name=n["unoffset_node"],
                    inputs=[source, gs.Constant(n["unoffset"], offset)],
                    outputs=[restored],
                )
            )
            return
        centered = _pointwise(
            graph, "Sub", n["unshift_node"], source, gs.Constant(n["unshift"], zero), n["centered"]
        )
        graph.nodes.append(
            gs.Node(
                "Mul",
                name=n["rescale_node"],
                inputs=[centered, gs.Constant(n["rescale"], scale)],
                outputs=[restored],
            )
        )

    return edit


def trt_fold(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Fold each plan activation's scale and zero point into producers and consumers.

    Preconditions, checked for every layer before the first edit: the plan uses only what the
    variant expresses (no GPTQT planes, no LoRC), every reordered site was folded with the
    plan's permutation, this pass has not run yet, and every node and initializer it touches
    matches docs/graph.md.
    """
    plan = ctx.plan  # its weights fit this target: PassContext checked (QuantPlan.check_target)
    if not plan.acts and not plan.weights:
        return PassResult(trt_fold.__name__)
    if is_trt_folded(graph):
        raise GraphPatternError("the graph is already folded by trt_fold; run it once")
    index = GraphIndex(graph)
    dtype = graph_float_dtype(graph)
    folded = folded_sites(graph)
    edits: list[Edit] = []
    counts = {"layernorms": 0, "pointwise_nodes": 0, "linears": 0, "weight_bytes_after": 0}
    for layer in plan.layers():
        vectors: dict[Act, ActVectors] = {}
        for quant in plan.acts:
            if quant.layer == layer:
                check_act_folded(plan, quant, folded)
                vectors[quant.act] = act_vectors(plan, quant)
        head_factor = None
        if Act.Q in vectors:
            edit, head_factor = _plan_q_scale(index, layer)
            edits.append(edit)
        for act, vec in vectors.items():
            if act in LAYERNORM_OF:
                edits.append(_plan_layernorm(index, vec, dtype))
                counts["layernorms"] += 1
            if act in PRODUCER_POINTWISE:
                edits.append(_plan_producer(graph, index, vec, dtype))
                counts["pointwise_nodes"] += 2 if act is Act.OUT_PROJ_IN else 1
            if act in CONSUMER_POINTWISE:
                edits.append(_plan_consumer(graph, index, vec, dtype))
                counts["pointwise_nodes"] += 1 if act is Act.ATTN_PROBS else 2
        fold = LayerFold(
            graph,
            index,
            plan,
            layer,
            vectors,
            head_factor,
            ctx.int4_block_size,
            ctx.trt_weight_groups,
        )
        for linear in LINEARS:
            planned = plan_linear(fold, linear)
            if planned is not None:
                edits.append(planned[0])
                counts["linears"] += 1
                counts["weight_bytes_after"] += planned[1]
    for edit in edits:
        edit()
    record_trt_folded(graph, {quant.key: act_digest(quant) for quant in plan.acts})
    counts["activations"] = len(plan.acts)
    return PassResult(trt_fold.__name__, counts=counts, touched=tuple(q.key for q in plan.acts))
