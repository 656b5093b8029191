"""The ordered passes that turn the FP graph into the quantized graph, and their runner.

No registry: PASSES is the order, and `stop_after` (the CLI's --stop-after / --dump-after)
finds a pass by its `__name__`. The runner owns import/export so that every pass sees a
onnx-graphsurgeon graph and the model-level fields gs drops (metadata_props) survive.
"""

from __future__ import annotations

import logging
import time

import onnx
import onnx_graphsurgeon as gs

from rptq.errors import ConfigError, GraphPatternError, PlanError
from rptq.passes.binary_weights import binary_weights
from rptq.passes.context import Pass, PassContext, PassResult
from rptq.passes.fold_reorder import fold_reorder
from rptq.passes.graph_ops import wrap_packed_constants
from rptq.passes.insert_qdq import insert_act_qdq
from rptq.passes.kv_cache import quantize_kv_cache
from rptq.passes.lowrank import lowrank_branches
from rptq.passes.quantize_weights import quantize_weights
from rptq.passes.tensorrt.fold import trt_fold
from rptq.passes.tensorrt.qdq import trt_insert_qdq
from rptq.plan import Target

logger = logging.getLogger(__name__)

PASSES: tuple[Pass, ...] = (
    fold_reorder,
    insert_act_qdq,
    quantize_kv_cache,  # a no-op unless a with-past graph stores an integer cache
    quantize_weights,
    binary_weights,
    lowrank_branches,
)
# The TensorRT variant (docs/tensorrt-rules.md, "Implementation"): per-cluster scales and zero
# points folded into producers/consumers, per-tensor symmetric INT8 Q/DQ, symmetric weights.
TRT_PASSES: tuple[Pass, ...] = (fold_reorder, trt_fold, trt_insert_qdq)
META_CONFIG_HASH = "rptq.config_hash"  # written by rptq.exporter.opt


def passes_for(target: Target) -> tuple[Pass, ...]:
    """The ordered passes of a target ("ort": PASSES, "trt": TRT_PASSES)."""
    return TRT_PASSES if target is Target.TRT else PASSES


def pass_names(target: Target = Target.ORT) -> tuple[str, ...]:
    """Names accepted by `stop_after`, in order."""
    return tuple(p.__name__ for p in passes_for(target))


def _default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise GraphPatternError("model has no default-domain opset_import; expected an ONNX model")


def _check_model(model: onnx.ModelProto, ctx: PassContext) -> None:
    """The model must be new enough for INT4/INT16 Q/DQ and belong to the plan's model."""
    opset = _default_opset(model)
    if opset < ctx.opset:
        raise GraphPatternError(
            f"model opset {opset} is older than {ctx.opset}; export with --opset {ctx.opset}"
        )
    meta = {p.key: p.value for p in model.metadata_props}
    got = meta.get(META_CONFIG_HASH)
    if got is not None and got != ctx.plan.model.config_hash:
        raise PlanError(
            f"plan for {ctx.plan.model.name} does not match the exported model (config hash "
            f"{got}); calibrate a plan for this model"
        )


def _check_invariants(graph: gs.Graph, after: str) -> None:
    """Cheap checks after every pass: names unique and non-empty (names.py makes them all)."""
    seen: set[str] = set()
    for node in graph.nodes:
        if not node.name or node.name in seen:
            raise AssertionError(f"after {after}: node name {node.name!r} is empty or repeated")
        seen.add(node.name)


def export_graph(graph: gs.Graph, like: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """gs export that packs INT4 constants and keeps `like`'s opset, IR version and metadata."""
    wrap_packed_constants(graph)
    model = gs.export_onnx(graph, do_type_check=True)
    if like is None:
        return model
    del model.opset_import[:]
    model.opset_import.extend(like.opset_import)
    model.ir_version = like.ir_version
    model.producer_name = like.producer_name
    model.producer_version = like.producer_version
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    return model


def run_passes(
    model: onnx.ModelProto, ctx: PassContext, stop_after: str | None = None
) -> tuple[onnx.ModelProto, list[PassResult]]:
    """Run the target's passes in order (up to and including `stop_after`); the input model is
    not changed.

    Every pass checks its own preconditions before editing; the runner cleans up and sorts the
    graph after each one, as onnx-graphsurgeon transforms expect.
    """
    graph, results = transform_graph(model, ctx, stop_after)
    return export_graph(graph, model), results


def transform_graph(
    model: onnx.ModelProto, ctx: PassContext, stop_after: str | None = None
) -> tuple[gs.Graph, list[PassResult]]:
    """`run_passes` without the final export: the transformed onnx-graphsurgeon graph.

    The streamed export writes this graph's tensors one at a time instead of building a
    ModelProto (which would copy every weight twice more).
    """
    names = pass_names(ctx.target)
    if stop_after is not None and stop_after not in names:
        raise ConfigError(
            f"unknown pass {stop_after!r} for --stop-after; choose one of {', '.join(names)}"
        )
    _check_model(model, ctx)
    graph = gs.import_onnx(model)
    results: list[PassResult] = []
    for step in passes_for(ctx.target):
        start = time.perf_counter()
        result = step(graph, ctx)
        graph.cleanup().toposort()
        _check_invariants(graph, step.__name__)
        logger.debug("%s: %s (%.2f s)", step.__name__, result.counts, time.perf_counter() - start)
        results.append(result)
        if step.__name__ == stop_after:
            break
    return graph, results
