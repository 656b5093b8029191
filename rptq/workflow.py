"""The steps the CLI, the demo and the benchmarks share: calibrate, export, evaluate.

Each step takes plain objects (a LoadedModel, token windows, a plan) so that callers with
their own data, such as the demo's embedded corpus, reuse them unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch

from rptq.calib.runner import calibrate
from rptq.exporter.options import ExportDtype, ExportOptions
from rptq.log import Progress
from rptq.model.load import LoadedModel
from rptq.plan import ActQuantForm, KvCacheDtype, QuantPlan, Recipe, Target
from rptq.quant.trt_weights import DEFAULT_WEIGHT_GROUPS
from rptq.runtime.perplexity import PerplexityResult, perplexity

log = logging.getLogger(__name__)

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def calibrate_windows(
    model: LoadedModel,
    windows: torch.Tensor,
    recipe: Recipe,
    device: str | Sequence[str | torch.device] = "cpu",
) -> QuantPlan:
    """Calibrate with progress over decoder layers (a bar on a terminal, else log lines) and a
    time estimate once the first layer is done."""
    import time

    from rptq.defaults import estimate_after_first_layer

    started = time.perf_counter()
    with Progress(model.shape.num_layers, "calibrate", "layers") as bar:

        def advance(done: int, total: int) -> None:
            if done == 1 and total > 1:
                estimate_after_first_layer(time.perf_counter() - started, total)
            bar.update(done)

        return calibrate(model, windows, recipe, device=device, progress=advance)


@dataclass(frozen=True)
class ExportSummary:
    """What an export produced, for the CLI summary and the benchmarks."""

    files: list[tuple[Path, int]]
    label: str
    op_counts: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        """Bytes of every file written."""
        return sum(size for _, size in self.files)

    @property
    def qdq_nodes(self) -> int:
        """QuantizeLinear plus DequantizeLinear nodes in the graph."""
        return self.op_counts.get("QuantizeLinear", 0) + self.op_counts.get("DequantizeLinear", 0)


def quantized_graph(
    model: LoadedModel,
    plan: QuantPlan | None,
    dtype: ExportDtype = "float32",
    opset: int = 21,
    target: Target = Target.ORT,
    int4_block_size: int = 0,
    past: bool = False,
    kv_cache_dtype: KvCacheDtype = "float",
    trt_weight_groups: int = DEFAULT_WEIGHT_GROUPS,
    act_quant_form: ActQuantForm = "auto",
) -> onnx.ModelProto:
    """The whole graph in memory, with the plan's reorders folded and its Q/DQ inserted (FP if
    no plan), in the canonical layout (rptq.exporter.parts) that `export_onnx` writes.

    `past` builds the decoder-with-past graph; `kv_cache_dtype` int8/uint8 stores its cache as
    the plan's K/V codes (ExportOptions checks the combination). `act_quant_form` ("ort" only)
    writes per-cluster activation quantizers as elementwise ops or per-axis Q/DQ pairs.

    `target` "trt" writes the TensorRT variant (docs/tensorrt-rules.md, "Implementation");
    `int4_block_size` (64/128, "trt" only) stores its weights as blocked INT4 and
    `trt_weight_groups` ("trt" only) sets the scale groups of its re-quantized folded weights
    (rptq.quant.trt_weights.scale_groups). Holds the whole
    model (about 3x its size at peak): `export_onnx` streams instead.
    """
    from rptq.exporter.opt import build_fp_graph
    from rptq.exporter.parts import canonical_model
    from rptq.passes.context import PassContext
    from rptq.passes.kv_cache import check_cache_plan
    from rptq.passes.pipeline import run_passes

    ExportOptions(
        dtype,
        opset,
        target,
        int4_block_size,
        past=past,
        kv_cache_dtype=kv_cache_dtype,
        act_quant_form=act_quant_form,
    )
    check_cache_plan(plan, kv_cache_dtype, model.shape.num_layers)
    graph = build_fp_graph(model, dtype, opset, past, kv_cache_dtype)
    if plan is not None:
        ctx = PassContext(
            plan=plan,
            opset=opset,
            target=target,
            int4_block_size=int4_block_size,
            kv_cache_dtype=kv_cache_dtype,
            trt_weight_groups=trt_weight_groups,
            act_quant_form=act_quant_form,
        )
        graph, results = run_passes(graph, ctx)
        for result in results:
            log.debug("pass %s: %s", result.name, dict(result.counts))
    return canonical_model(graph)


def export_onnx(
    model: LoadedModel,
    plan: QuantPlan | None,
    output: Path,
    options: ExportOptions | None = None,
) -> ExportSummary:
    """Export layer by layer (rptq.exporter.stream) with a progress bar; report files, sizes
    and op counts. Peak memory is about one decoder layer plus the graph's nodes."""
    from rptq.exporter.stream import export_streamed

    total = model.shape.num_layers + 2
    with Progress(total, "export", "parts (embeddings, layers, head)") as bar:

        def advance(done: int, parts: int, data_bytes: int) -> None:
            bar.update(done, f"{data_bytes / 2**20:,.0f} MiB written")

        result = export_streamed(model, plan, Path(output), options, progress=advance)
    label = plan.recipe.label() if plan is not None else "FP"
    return ExportSummary(
        [(p, p.stat().st_size) for p in result.files], label, dict(result.op_counts)
    )


def evaluate(
    logits_fn: LogitsFn, windows_by_set: dict[str, torch.Tensor], backend: str
) -> dict[str, PerplexityResult]:
    """Perplexity of one backend on each evaluation set's windows."""
    return {
        name: perplexity(logits_fn, windows, desc=f"{backend} {name}")
        for name, windows in windows_by_set.items()
    }


def parse_list(text: str, choices: Sequence[str], what: str) -> list[str]:
    """'a,b' -> ['a', 'b'], each checked against `choices`."""
    from rptq.errors import ConfigError

    items = [t.strip() for t in text.split(",") if t.strip()]
    for item in items:
        if item not in choices:
            raise ConfigError(f"unknown {what} {item!r}; choose from {', '.join(choices)}")
    if not items:
        raise ConfigError(f"no {what} given; choose from {', '.join(choices)}")
    return items
