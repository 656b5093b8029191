"""Export one decoder layer at a time: memory bound by one layer, not by the model.

The graph is cut at the residual stream into fragments (rptq.exporter.opt: prologue, each
decoder layer, head). Each fragment is built from that layer's weights alone, transformed by
the same passes as the whole graph with the plan restricted to that layer (every pass edits
only the layer it is given a plan for), laid out canonically (rptq.exporter.parts), and its
initializers are streamed to the external data file before the next layer is read. Only the
nodes and the small initializers of the whole graph stay in memory.

The result is byte-identical to building the whole graph, running the passes on it and saving
it with `save_onnx(rptq.workflow.quantized_graph(...))` (tests/graph/test_stream_export.py).
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from rptq import names
from rptq.exporter.opt import (
    head_fragment,
    layer_fragment,
    prologue_fragment,
)
from rptq.exporter.options import ExportOptions
from rptq.exporter.parts import Part, layout_part, merge_records
from rptq.exporter.save import OnnxWriter, copy_fields
from rptq.model.load import LoadedModel
from rptq.plan import QuantPlan

# progress(parts done, parts in all, bytes in the data file so far)
ProgressFn = Callable[[int, int, int], None]


@dataclass(frozen=True)
class StreamedExport:
    """The written files (data file first) and the graph's op counts."""

    files: list[Path]
    op_counts: dict[str, int]


def _fragments(
    model: LoadedModel, options: ExportOptions
) -> Iterator[tuple[int | None, Callable[[], onnx.ModelProto]]]:
    """(layer or None, builder) for each fragment in graph order; built only when called."""
    dtype, opset = options.dtype, options.opset
    past, cache = options.past, options.kv_cache_dtype
    yield None, lambda: prologue_fragment(model, dtype, opset, past, cache)
    for index in range(model.shape.num_layers):
        yield (
            index,
            lambda index=index: layer_fragment(model, index, dtype, opset, past, cache),  # type: ignore[misc]
        )
    yield None, lambda: head_fragment(model, dtype, opset, past, cache)


def _is_cache(name: str) -> bool:
    """A layer fragment's past input or present output: also one of the whole graph's."""
    return name.startswith((names.PAST_PREFIX, names.PRESENT_PREFIX))


def _write_graph(graph: gs.Graph, writer: OnnxWriter) -> Part:
    """Export `graph` (a transformed fragment) into `writer`, one initializer at a time.

    The same conversions as onnx-graphsurgeon's export_onnx (which pipeline.export_graph uses
    for the whole graph), minus building a ModelProto: nodes and value_info first, then each
    constant becomes a TensorProto, is streamed to the data file and dropped.
    """
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    from rptq.passes.graph_ops import wrap_packed_constants

    wrap_packed_constants(graph)
    nodes = [OnnxExporter.export_node(node) for node in graph.nodes]
    tensors = graph.tensors()
    boundary = {tensor.name for tensor in graph.inputs + graph.outputs}
    constants = {name: t for name, t in tensors.items() if isinstance(t, gs.Constant)}
    infos = [
        OnnxExporter.export_value_info_proto(tensor, do_type_check=True)
        for name, tensor in tensors.items()
        if name not in boundary
        and isinstance(tensor, gs.Variable)
        and (tensor.dtype is not None or tensor.shape is not None)
    ]
    part = layout_part(nodes, constants, infos, {out.name for out in graph.outputs})
    writer.add(part.nodes, (), part.value_info)
    for constant in part.initializers:
        writer.add((), [OnnxExporter.export_tensor_proto(constant)])
    return part


def _write_proto(model: onnx.ModelProto, writer: OnnxWriter) -> Part:
    """Write an untransformed fragment (FP export) into `writer`."""
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    crossing = {out.name for out in graph.output}
    part = layout_part(graph.node, initializers, graph.value_info, crossing)
    writer.add(part.nodes, part.initializers, part.value_info)
    return part


def export_streamed(
    model: LoadedModel,
    plan: QuantPlan | None,
    output: Path,
    options: ExportOptions | None = None,
    progress: ProgressFn | None = None,
) -> StreamedExport:
    """Build, transform and write the model fragment by fragment (see the module docstring).

    Raises what the exporter and the passes raise (ConfigError, GraphPatternError, PlanError)
    before anything is at `output`, and OutputError for unwritable outputs.
    """
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    from rptq.passes.context import PassContext
    from rptq.passes.kv_cache import check_cache_plan
    from rptq.passes.pipeline import transform_graph

    options = options or ExportOptions()
    check_cache_plan(plan, options.kv_cache_dtype, model.shape.num_layers)
    opset = options.opset
    total = model.shape.num_layers + 2
    counts: Counter[str] = Counter()
    docs: list[str] = []
    # the whole graph's inputs and outputs in build_fp_graph's order: the prologue's inputs,
    # then each layer's past; logits, then each layer's present
    graph_inputs: list[onnx.ValueInfoProto] = []
    cache_outputs: list[onnx.ValueInfoProto] = []
    header = onnx.ModelProto()
    with OnnxWriter(Path(output), options.force, options.external_data) as writer:
        for done, (layer, build) in enumerate(_fragments(model, options), start=1):
            fragment = build()
            if done == 1:
                copy_fields(fragment, header, skip=("graph",))
                header.graph.name = fragment.graph.name
            if plan is None:
                inputs, outputs = list(fragment.graph.input), list(fragment.graph.output)
                docs.append(fragment.graph.doc_string)
                part = _write_proto(fragment, writer)
            else:
                ctx = PassContext(
                    plan=plan.for_layer(layer),
                    target=options.target,
                    opset=opset,
                    int4_block_size=options.int4_block_size,
                    kv_cache_dtype=options.kv_cache_dtype,
                    trt_weight_groups=options.trt_weight_groups,
                    act_quant_form=options.act_quant_form,
                )
                graph, _ = transform_graph(fragment, ctx)
                export = OnnxExporter.export_value_info_proto
                inputs = [export(tensor, do_type_check=True) for tensor in graph.inputs]
                outputs = [export(tensor, do_type_check=True) for tensor in graph.outputs]
                docs.append(graph.doc_string)
                part = _write_graph(graph, writer)
                del graph
            if done == 1:
                graph_inputs.extend(inputs)
            else:
                graph_inputs.extend(info for info in inputs if _is_cache(info.name))
            cache_outputs.extend(info for info in outputs if _is_cache(info.name))
            if done == total:
                header.graph.input.extend(graph_inputs)
                header.graph.output.extend(info for info in outputs if not _is_cache(info.name))
                header.graph.output.extend(cache_outputs)
            counts.update(node.op_type for node in part.nodes)
            del fragment, part
            gc.collect()  # onnx-graphsurgeon graphs are cycles (node <-> tensor): free them now
            if progress is not None:
                progress(done, total, writer.bytes_written)
        files = writer.finish(header, merge_records(docs))
    return StreamedExport(files, dict(counts))
