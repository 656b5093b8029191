"""Export one decoder layer at a time: memory bound by one layer, not by the model.

The graph is cut at the residual stream into fragments (rptq.exporter.opt: prologue, each
decoder layer, head). Each fragment is built from that layer's weights alone, transformed by
the same passes as the whole graph with the plan restricted to that layer (every pass edits
only the layer it is given a plan for), laid out canonically (rptq.exporter.parts), and its
initializers are streamed to the external data file before the next layer is read. Only the
nodes and the small initializers of the whole graph stay in memory.

The result is byte-identical to building the whole graph, running the passes on it and saving
it with `save_onnx(canonical_model(...))` (tests/graph/test_stream_export.py).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx

from rptq.exporter.opt import (
    ExportDtype,
    head_fragment,
    layer_fragment,
    prologue_fragment,
)
from rptq.exporter.parts import layout_part, merge_records
from rptq.exporter.save import OnnxWriter, copy_fields
from rptq.model.load import LoadedModel
from rptq.plan import QuantPlan

# progress(parts done, parts in all, bytes in the data file so far)
Progress = Callable[[int, int, int], None]


@dataclass(frozen=True)
class StreamedExport:
    """The written files (data file first) and the graph's op counts."""

    files: list[Path]
    op_counts: dict[str, int]


def plan_for_layer(plan: QuantPlan, layer: int | None) -> QuantPlan:
    """`plan` with only what belongs to decoder layer `layer` (nothing for None)."""
    from rptq.passes.context import linear_of

    return dataclasses.replace(
        plan,
        sites=tuple(site for site in plan.sites if site.layer == layer),
        acts=tuple(quant for quant in plan.acts if quant.layer == layer),
        weights=tuple(w for w in plan.weights if linear_of(plan, w.fqn)[0] == layer),
    )


def _fragments(
    model: LoadedModel, dtype: ExportDtype, opset: int
) -> Iterator[tuple[int | None, Callable[[], onnx.ModelProto]]]:
    """(layer or None, builder) for each fragment in graph order; built only when called."""
    yield None, lambda: prologue_fragment(model, dtype, opset)
    for index in range(model.shape.num_layers):
        yield index, lambda index=index: layer_fragment(model, index, dtype, opset)  # type: ignore[misc]
    yield None, lambda: head_fragment(model, dtype, opset)


def export_streamed(
    model: LoadedModel,
    plan: QuantPlan | None,
    output: Path,
    dtype: ExportDtype = "float32",
    opset: int = 21,
    force: bool = False,
    target: str = "ort",
    int4_block_size: int = 0,
    external_data: bool | None = None,
    progress: Progress | None = None,
) -> StreamedExport:
    """Build, transform and write the model fragment by fragment (see the module docstring).

    Raises what the exporter and the passes raise (ConfigError, GraphPatternError, PlanError)
    before anything is at `output`, and OutputError for unwritable outputs.
    """
    from rptq.passes.context import PassContext
    from rptq.passes.pipeline import run_passes

    total = model.shape.num_layers + 2
    counts: Counter[str] = Counter()
    docs: list[str] = []
    header = onnx.ModelProto()
    with OnnxWriter(Path(output), force, external_data) as writer:
        for done, (layer, build) in enumerate(_fragments(model, dtype, opset), start=1):
            fragment = build()
            if plan is not None:
                ctx = PassContext(
                    plan=plan_for_layer(plan, layer),
                    target=target,  # type: ignore[arg-type]
                    opset=opset,
                    int4_block_size=int4_block_size,
                )
                fragment, _ = run_passes(fragment, ctx)
            graph = fragment.graph
            if done == 1:
                copy_fields(fragment, header, skip=("graph",))
                header.graph.name = graph.name
                header.graph.input.extend(graph.input)
            if done == total:
                header.graph.output.extend(graph.output)
            crossing = {out.name for out in graph.output}
            part = layout_part(graph.node, graph.initializer, graph.value_info, crossing)
            writer.add(part.nodes, part.initializers, part.value_info)
            counts.update(node.op_type for node in part.nodes)
            docs.append(graph.doc_string)
            del fragment, graph, part
            if progress is not None:
                progress(done, total, writer.bytes_written)
        files = writer.finish(header, merge_records(docs))
    return StreamedExport(files, dict(counts))
