"""Fold every reorder permutation of the plan into the FP graph, leaving its function unchanged.

After this pass each reordered activation is produced in cluster order, so its clusters are
contiguous and per-axis Q/DQ can use per-cluster parameters repeated by cluster size
(docs/algorithms.md §2.11). The algebra is in rptq.quant.fold; which tensor each reorder point
touches is read from rptq.points (LAYERNORM_SITE, LINEAR_INPUT_SITE, LINEAR_OUTPUT_SITE), so
this module only finds nodes and swaps arrays. See docs/graph.md, "After the passes".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from rptq import names
from rptq.errors import GraphPatternError, PlanError
from rptq.passes.context import PassContext, PassResult, folded_sites, perm_digest, record_folded
from rptq.passes.graph_ops import LINEAR_PATTERN, GraphIndex, find_linear, graph_float_dtype
from rptq.plan import QuantPlan, ReorderSite
from rptq.points import LAYERNORM_SITE, LINEAR_INPUT_SITE, LINEAR_OUTPUT_SITE, REORDERS, Reorder
from rptq.quant.clusters import is_block_diagonal, is_permutation
from rptq.quant.fold import permute_layernorm, permute_matmul_cols, permute_matmul_rows

LN_PATTERN = "LayerNormalization(h, <ln>.weight, <ln>.bias) (docs/graph.md)"

Edit = Callable[[], None]


@dataclass(frozen=True)
class _Layout:
    """Channel widths the plan promises, to check initializer shapes against."""

    hidden: int
    ffn: int
    head_dim: int

    @classmethod
    def of(cls, plan: QuantPlan) -> _Layout:
        shape = plan.model.shape
        hidden = shape["hidden_size"]
        return cls(hidden, shape["ffn_dim"], hidden // shape["num_heads"])

    def width(self, point: Reorder) -> int:
        return self.ffn if REORDERS[point].width == "ffn" else self.hidden


def fold_reorder(graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Gather LayerNorm inputs and permute gamma/beta and linear weights for every plan site.

    All preconditions (every node and initializer, every shape, not already folded) are checked
    before the first change, so a GraphPatternError leaves the graph as it was.
    """
    plan = ctx.plan
    if not plan.sites:
        return PassResult(fold_reorder.__name__)
    index = GraphIndex(graph)
    layout = _Layout.of(plan)
    already = folded_sites(graph)
    edits: list[Edit] = []
    touched: list[str] = []
    gathers = 0
    for site in plan.sites:
        if site.key in already:
            raise GraphPatternError(
                f"reorder site {site.key} is already folded into this graph; run fold_reorder "
                "once, on the unfolded graph"
            )
        _check_site_perm(site, layout)
        for ln_name, point in LAYERNORM_SITE.items():
            if point == site.point:
                edits.append(_plan_layernorm(graph, index, site, ln_name, layout, touched))
                gathers += 1
        for linear, point in LINEAR_INPUT_SITE.items():
            if point == site.point:
                edits.append(_plan_rows(index, site, linear, layout, touched))
        for linear, point in LINEAR_OUTPUT_SITE.items():
            if point == site.point:
                edits.append(_plan_cols(index, site, linear, layout, touched))
    for edit in edits:
        edit()
    record_folded(graph, {site.key: perm_digest(site.perm) for site in plan.sites})
    return PassResult(
        fold_reorder.__name__,
        counts={"sites": len(plan.sites), "gathers": gathers, "arrays_permuted": len(touched)},
        touched=tuple(touched),
    )


def _check_site_perm(site: ReorderSite, layout: _Layout) -> None:
    width = layout.width(site.point)
    if not is_permutation(site.perm, width):
        raise PlanError(f"plan site {site.key}: perm is not a permutation of {width} channels")
    if REORDERS[site.point].per_head and not is_block_diagonal(site.perm, layout.head_dim):
        # The attention reshape assigns channel c to head c // head_dim; a fold across heads
        # would change the function (docs/algorithms.md §1.1).
        raise PlanError(f"plan site {site.key}: perm moves channels across heads")


def _plan_layernorm(
    graph: gs.Graph,
    index: GraphIndex,
    site: ReorderSite,
    ln_name: str,
    layout: _Layout,
    touched: list[str],
) -> Edit:
    """Check one LayerNorm and return the edit that gathers its input and permutes gamma/beta."""
    ln_module = names.module(site.layer, ln_name)
    gather_names = names.reorder_gather(ln_module, site.point)
    if gather_names["node"] in index.nodes or gather_names["perm"] in index.tensors:
        raise GraphPatternError(
            f"node {gather_names['node']} already exists: the graph is already folded"
        )
    ln = index.node(names.node(ln_module, "LayerNormalization"), "LayerNormalization", LN_PATTERN)
    gamma = index.constant_input(ln, 1, names.weight(ln_module), 1, LN_PATTERN)
    beta = index.constant_input(ln, 2, names.bias(ln_module), 1, LN_PATTERN)
    width = layout.width(site.point)
    if gamma.shape[0] != width or tuple(beta.shape) != tuple(gamma.shape):
        raise GraphPatternError(
            f"node {ln.name}: gamma/beta shapes {list(gamma.shape)}/{list(beta.shape)} do not "
            f"match the plan's {width} channels"
        )
    if int(ln.attrs.get("axis", -1)) not in (-1, 2):
        raise GraphPatternError(f"node {ln.name} normalizes axis {ln.attrs['axis']}, expected -1")
    source = ln.inputs[0]
    if not isinstance(source, gs.Variable):
        raise GraphPatternError(
            f"node {ln.name} input 0 is not an activation; expected {LN_PATTERN}"
        )
    producer = source.inputs[0] if source.inputs else None
    if producer is not None and producer.op == "Gather" and producer.name.startswith(ln_module):
        raise GraphPatternError(
            f"node {ln.name} already reads Gather {producer.name}: the graph is already folded"
        )
    touched.extend([gamma.name, beta.name, gather_names["node"]])
    float_dtype = graph_float_dtype(graph)

    def edit() -> None:
        gamma.values, beta.values = permute_layernorm(gamma.values, beta.values, site.perm)
        perm = gs.Constant(gather_names["perm"], np.ascontiguousarray(site.perm, dtype=np.int64))
        # the graph's float dtype, not source.dtype: a streamed fragment knows its input's type
        # where the whole graph does not, and both must export the same value_info
        gathered = gs.Variable(gather_names["output"], dtype=float_dtype)
        node = gs.Node(
            "Gather",
            name=gather_names["node"],
            attrs={"axis": -1},
            inputs=[source, perm],
            outputs=[gathered],
        )
        graph.nodes.append(node)
        ln.inputs[0] = gathered

    return edit


def _linear(index: GraphIndex, layer: int, linear: str) -> tuple[str, gs.Node, gs.Constant]:
    module = names.module(layer, linear)
    matmul = index.node(names.node(module, "MatMul"), "MatMul", LINEAR_PATTERN)
    weight = index.constant_input(matmul, 1, names.weight(module), 2, LINEAR_PATTERN)
    return module, matmul, weight


def _plan_rows(
    index: GraphIndex, site: ReorderSite, linear: str, layout: _Layout, touched: list[str]
) -> Edit:
    """Check one linear whose input arrives permuted; return the edit permuting its rows."""
    _, matmul, weight = _linear(index, site.layer, linear)
    width = layout.width(site.point)
    if weight.shape[0] != width:
        raise GraphPatternError(
            f"initializer {weight.name} has {weight.shape[0]} input rows, but {site.key} "
            f"permutes {width} channels (node {matmul.name})"
        )
    touched.append(weight.name)

    def edit() -> None:
        weight.values = permute_matmul_rows(weight.values, site.perm)

    return edit


def _plan_cols(
    index: GraphIndex, site: ReorderSite, linear: str, layout: _Layout, touched: list[str]
) -> Edit:
    """Check one linear whose output must come out permuted; return the edit for columns+bias."""
    found = find_linear(index, names.module(site.layer, linear))
    matmul, weight, bias = found.matmul, found.weight, found.bias
    width = layout.width(site.point)
    if weight.shape[1] != width or bias.shape[0] != width:
        raise GraphPatternError(
            f"initializers {weight.name} {list(weight.shape)} / {bias.name} {list(bias.shape)} "
            f"do not have the {width} output channels {site.key} permutes (node {matmul.name})"
        )
    touched.extend([weight.name, bias.name])

    def edit() -> None:
        weight.values, bias.values = permute_matmul_cols(weight.values, bias.values, site.perm)

    return edit
