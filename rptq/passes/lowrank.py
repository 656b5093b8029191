"""LoRC branches: `x -> MatMul(V̂) -> MatMul(Ûᵀ) -> Add` beside each compensated linear's MatMul.

The branch reads the main MatMul's own input (after activation Q/DQ, so it sees exactly what the
main path sees) and is added to the MatMul output before the bias Add, so the linear computes
x (Ŵ + Û V̂ᵀ)ᵀ + b as the reference does (reassociated: equal up to float rounding). V̂ [in, R]
has its rows in the graph's input order and Ûᵀ [R, out] its columns in the graph's output order
(the same permutations fold_reorder applied to the weight). 8-bit factors are stored as integer
codes with a per-row DequantizeLinear (axis 0 for V̂, axis 1 for Ûᵀ).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from numpy.typing import NDArray

from rptq import names
from rptq.errors import GraphPatternError, PlanError
from rptq.passes.binary_weights import graph_order
from rptq.passes.context import PassContext, PassResult
from rptq.passes.graph_ops import GraphIndex, add_dequantize, packed_nbytes
from rptq.plan import QuantPlan, WeightQuant
from rptq.plan_weights import LowRankFactor
from rptq.quant.qparams import container_bits

LINEAR_PATTERN = "MatMul(x, <module>.weight) -> Add(., <module>.bias) (docs/graph.md)"
_CONTAINERS: dict[int, type] = {8: np.int8, 16: np.int16}


def _factor(
    graph: gs.Graph,
    n: dict[str, str],
    which: str,
    factor: LowRankFactor,
    order: NDArray[np.int64],
    transpose: bool,
    dtype: np.dtype,
    row_factor: NDArray[np.float64] | None = None,
) -> tuple[gs.Tensor, int]:
    """The factor's tensor in graph layout (a Constant, or a DequantizeLinear output) and bytes.

    Rows of the stored factor are channels; `order` picks them in the graph's channel order.
    `transpose` gives Ûᵀ [R, out], whose per-channel scales then lie on axis 1. `row_factor`
    (graph order) multiplies each channel: the float values, or the int8 rows' scales.
    """
    axis = 1 if transpose else 0
    values = factor.values[order]
    if factor.scale is None or factor.zero is None:
        if row_factor is not None:
            values = np.asarray(values, np.float64) * row_factor[:, None]
        values = values.T if transpose else values
        array = np.ascontiguousarray(values, dtype=dtype)
        return gs.Constant(n[which], array), array.nbytes
    values = values.T if transpose else values
    container = _CONTAINERS[max(8, container_bits(factor.zero, factor.bits))]
    codes: NDArray[np.generic] = np.ascontiguousarray(values).astype(container)
    scale = np.asarray(factor.scale[order], np.float64)
    if row_factor is not None:
        scale = scale * row_factor
    scale = np.ascontiguousarray(scale, dtype=dtype)
    zero: NDArray[np.generic] = np.ascontiguousarray(factor.zero[order]).astype(container)
    output = add_dequantize(
        graph,
        n[f"{which}_dq_node"],
        n[f"{which}_dequantized"],
        (n[f"{which}_quantized"], codes),
        (n[f"{which}_scale"], scale),
        (n[f"{which}_zero_point"], zero),
        {"axis": axis},
    )
    nbytes = sum(packed_nbytes(a.dtype, a.size) for a in (codes, scale, zero))
    return output, nbytes


def _check(index: GraphIndex, plan: QuantPlan, quant: WeightQuant) -> tuple[gs.Node, gs.Node]:
    """The linear's MatMul and bias Add, wired as docs/graph.md says, with no branch yet."""
    n = names.lorc(quant.fqn)
    if n["add_node"] in index.nodes:
        raise GraphPatternError(f"node {n['add_node']} already exists: LoRC branch already added")
    # not graph_ops.find_linear: the MatMul's weight is a DequantizeLinear output by now
    matmul = index.node(names.node(quant.fqn, "MatMul"), "MatMul", LINEAR_PATTERN)
    add = index.node(names.node(quant.fqn, "Add"), "Add", LINEAR_PATTERN)
    # a GPTQT linear's Add reads its sum of plane products (binary_weights) instead
    planes_sum = names.binary_weight(quant.fqn, 1)["offset_output"]
    if add.inputs[0] is not matmul.outputs[0] and add.inputs[0].name != planes_sum:
        raise GraphPatternError(f"node {add.name} does not read {matmul.name}; {LINEAR_PATTERN}")
    index.constant_input(add, 1, names.bias(quant.fqn), 1, LINEAR_PATTERN)
    assert quant.lorc is not None
    out_ch, in_ch = quant.codes.shape
    if quant.lorc.u.values.shape[0] != out_ch or quant.lorc.v.values.shape[0] != in_ch:
        raise PlanError(f"plan weight {quant.fqn}: LoRC factors do not match [{out_ch}, {in_ch}]")
    return matmul, add


def add_branch(
    graph: gs.Graph,
    quant: WeightQuant,
    x: gs.Tensor,
    main: gs.Tensor,
    rows: NDArray[np.int64],
    cols: NDArray[np.int64],
    dtype: np.dtype,
    column_factor: NDArray[np.float64] | None = None,
) -> tuple[gs.Variable, int]:
    """Add `main + (x V̂) Ûᵀ` to the graph; returns the sum's tensor and the factors' bytes.

    `rows`/`cols` are the graph's input/output channel orders; `column_factor` (graph output
    order) scales Ûᵀ's columns, for a linear whose output the TensorRT variant folds (1/s_out,
    head_dim^-½). `dtype` is the graph's float type.
    """
    assert quant.lorc is not None
    n = names.lorc(quant.fqn)
    v_tensor, v_bytes = _factor(graph, n, "v", quant.lorc.v, rows, False, dtype)
    u_tensor, u_bytes = _factor(graph, n, "u", quant.lorc.u, cols, True, dtype, column_factor)
    down = gs.Variable(n["v_output"], dtype=dtype)
    up = gs.Variable(n["u_output"], dtype=dtype)
    total = gs.Variable(n["output"], dtype=dtype)
    graph.nodes += [
        gs.Node("MatMul", name=n["v_matmul"], inputs=[x, v_tensor], outputs=[down]),
        gs.Node("MatMul", name=n["u_matmul"], inputs=[down, u_tensor], outputs=[up]),
        gs.Node("Add", name=n["add_node"], inputs=[main, up], outputs=[total]),
    ]
    return total, v_bytes + u_bytes


def lowrank_branches(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Add the LoRC branch of every weight the plan compensates (see the module docstring).

    Preconditions, checked for all weights before the first edit: each linear is MatMul ->
    Add(bias) and has no branch yet.
    """
    plan = ctx.plan
    compensated = [quant for quant in plan.weights if quant.lorc is not None]
    if not compensated:
        return PassResult(lowrank_branches.__name__)
    index = GraphIndex(graph)
    items = [(quant, *_check(index, plan, quant)) for quant in compensated]
    added_bytes = 0
    for quant, matmul, add in items:
        layer, linear = quant.layer, quant.linear
        out_ch, in_ch = quant.codes.shape
        rows, cols = graph_order(plan, layer, linear, in_ch, out_ch)
        dtype = np.dtype(add.inputs[1].dtype)
        x, main = matmul.inputs[0], add.inputs[0]
        total, nbytes = add_branch(graph, quant, x, main, rows, cols, dtype)
        added_bytes += nbytes
        add.inputs[0] = total
    return PassResult(
        lowrank_branches.__name__,
        counts={
            "lorc_branches": len(items),
            "lorc_rank_max": max(q.lorc.rank for q in compensated if q.lorc is not None),
            "lorc_bytes": added_bytes,
        },
        touched=tuple(quant.fqn for quant, _, _ in items),
    )
