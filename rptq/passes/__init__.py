"""Graph passes: FP graph + QuantPlan -> folded, Q/DQ-annotated graph (docs/graph.md).

Passes import numpy, onnx and onnx-graphsurgeon only (never torch), so exporting a plan needs
no deep-learning framework. Each pass is a plain function `(graph, ctx) -> PassResult`.
"""

from rptq.passes.context import Pass, PassContext, PassResult
from rptq.passes.fold_reorder import fold_reorder
from rptq.passes.insert_qdq import insert_act_qdq
from rptq.passes.pipeline import PASSES, run_passes
from rptq.passes.quantize_weights import quantize_weights

__all__ = [
    "PASSES",
    "Pass",
    "PassContext",
    "PassResult",
    "fold_reorder",
    "insert_act_qdq",
    "quantize_weights",
    "run_passes",
]
