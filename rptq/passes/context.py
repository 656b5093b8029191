"""What every pass receives and returns.

A pass is a module-level function `(graph, ctx) -> PassResult` (the `Pass` protocol): no base
class and no registry, so `pipeline.PASSES` is just an ordered tuple and debug flags find a pass
by `__name__`. The context is frozen so that a pass cannot leak state into the next one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol, get_args

import numpy as np
import onnx_graphsurgeon as gs
from numpy.typing import NDArray

from rptq.errors import ConfigError, GraphPatternError
from rptq.plan import ActQuantForm, KvCacheDtype, QuantPlan, ReorderSite, Target
from rptq.quant.trt_weights import DEFAULT_WEIGHT_GROUPS

OPSET = 21  # INT4/INT16 Q/DQ and per-axis activation scales need opset 21
INT4_BLOCK_SIZES = (64, 128)  # TensorRT's INT4 weight blocks (docs/tensorrt-rules.md)


@dataclass(frozen=True)
class PassContext:
    """The plan to apply and the runtime the graph is meant for.

    Building one checks that the plan's weights were calibrated for this target
    (QuantPlan.check_target), so every pass, run alone or in the pipeline, can rely on it.
    """

    plan: QuantPlan
    target: Target = Target.ORT
    opset: int = OPSET
    # target "trt" only: 0 stores weights as INT8 per output channel; 64 or 128 as INT4 with
    # that block size along the input dim (TensorRT's weight-only INT4 kernels)
    int4_block_size: int = 0
    # with-past graphs: "int8"/"uint8" store the cache as the plan's K/V codes
    # (rptq.passes.kv_cache); "float" (and every prefill graph) leaves the cache float
    kv_cache_dtype: KvCacheDtype = "float"
    # target "trt" only: scale groups of a weight re-quantized with a folded activation scale
    # (rptq.quant.trt_weights.scale_groups: one GEMM per group; 1 = one scale per output row)
    trt_weight_groups: int = DEFAULT_WEIGHT_GROUPS
    # target "ort": how a per-cluster activation quantizer is written (rptq.plan.ActQuantForm;
    # "auto": by the graph's float type; the TensorRT variant always writes per-tensor Q/DQ)
    act_quant_form: ActQuantForm = "auto"

    def __post_init__(self) -> None:
        if self.target not in {t.value for t in Target}:
            raise ConfigError(f"target must be 'ort' or 'trt', got {self.target!r}")
        object.__setattr__(self, "target", Target(self.target))
        if self.int4_block_size and (
            self.target is not Target.TRT or self.int4_block_size not in INT4_BLOCK_SIZES
        ):
            raise ConfigError(
                f"--int4-block {self.int4_block_size} needs --target tensorrt and a block size "
                f"of {' or '.join(map(str, INT4_BLOCK_SIZES))}"
            )
        if self.trt_weight_groups < 1:
            raise ConfigError(f"--trt-weight-groups must be >= 1, got {self.trt_weight_groups}")
        if self.opset < OPSET:
            raise ConfigError(
                f"opset {self.opset} is too old: INT4/INT16 Q/DQ need opset {OPSET} or newer"
            )
        if self.kv_cache_dtype not in get_args(KvCacheDtype):
            raise ConfigError(
                f"--kv-cache-dtype {self.kv_cache_dtype} is not supported; use float, int8 or uint8"
            )
        if self.kv_cache_dtype != "float" and self.target is Target.TRT:
            raise ConfigError(
                f"--kv-cache-dtype {self.kv_cache_dtype} is for the ONNX Runtime target only; "
                "use --kv-cache-dtype float with --target tensorrt"
            )
        if self.act_quant_form not in get_args(ActQuantForm):
            raise ConfigError(
                f"--act-quant-form {self.act_quant_form} is not supported; use auto, "
                "elementwise or qdq"
            )
        self.plan.check_target(self.target)


@dataclass(frozen=True)
class PassResult:
    """What a pass did: counts (nodes added, bytes, ...) and the names it touched."""

    name: str
    counts: dict[str, int] = field(default_factory=dict)
    touched: tuple[str, ...] = ()


class Pass(Protocol):
    """A graph transform: checks all its preconditions, then edits `graph` in place."""

    __name__: str

    def __call__(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Transform `graph`; raise GraphPatternError before any change if it does not fit."""
        ...


# --- fold records shared by the passes (graph lookups: rptq.passes.graph_ops) ---------------

FOLD_RECORD_PREFIX = "rptq.folded:"


def perm_digest(perm: NDArray[np.integer]) -> str:
    """Short fingerprint of a permutation, to tell whether a graph was folded with this one."""
    data = np.ascontiguousarray(perm, dtype=np.int64).tobytes()
    return hashlib.sha256(data).hexdigest()[:12]


def check_site_folded(site: ReorderSite, tensor: str, folded: dict[str, str], before: str) -> None:
    """Clusters are contiguous only in the channel order fold_reorder gave the graph: `site` must
    be folded into it (unless its permutation is the identity), and with this permutation.

    `folded` is `folded_sites(graph)`; `before` names the pass that needs the fold.
    """
    identity = bool(np.array_equal(site.perm, np.arange(site.perm.shape[0])))
    if not identity and site.key not in folded:
        raise GraphPatternError(
            f"tensor {tensor}: reorder site {site.key} is not folded into this graph; run "
            f"fold_reorder before {before}"
        )
    if site.key in folded and folded[site.key] != perm_digest(site.perm):
        raise GraphPatternError(
            f"tensor {tensor}: the graph was folded with another permutation for {site.key} "
            "than this plan's; fold the FP graph with this plan"
        )


def folded_sites(graph: gs.Graph) -> dict[str, str]:
    """Site key (`layers.3.R2`) -> perm_digest of every site fold_reorder folded into `graph`.

    R2, R3 and R5 leave no node behind (only permuted weights), so fold_reorder records what it
    did in the graph's doc_string, which survives ONNX export and import.
    """
    for line in graph.doc_string.splitlines():
        if line.startswith(FOLD_RECORD_PREFIX):
            entries = (item.split("=", 1) for item in line[len(FOLD_RECORD_PREFIX) :].split())
            return {key: digest for key, digest in entries}
    return {}


def record_folded(graph: gs.Graph, sites: dict[str, str]) -> None:
    """Write the folded sites (key -> perm_digest) into the graph's doc_string."""
    line = FOLD_RECORD_PREFIX + " ".join(f"{key}={digest}" for key, digest in sites.items())
    graph.doc_string = f"{graph.doc_string}\n{line}" if graph.doc_string else line
