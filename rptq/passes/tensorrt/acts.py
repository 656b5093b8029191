"""What the TensorRT variant's passes share: which activation folds where, and its parameters.

docs/tensorrt-rules.md ("Implementation") is the specification. Every quantized activation X
(per-channel scale s and integer zero point z after fold_reorder, clusters contiguous) is
carried as U = X/s + z, quantized per tensor with scale 1 and zero point 0, and restored as
X̂ = s∘(C − z) inside the consumer. These tables say where each half of that goes; they are
read by trt_fold (the folds), trt_linears (the weights) and trt_qdq (the Q/DQ).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from numpy.typing import NDArray

from rptq import names
from rptq.errors import PlanError
from rptq.passes.context import check_site_folded
from rptq.plan import ActQuant, QuantPlan
from rptq.points import SITE_OF, Act
from rptq.quant.clusters import expand_to_positions

# LayerNorms whose affine folds U = X/s + z exactly (γ/s, β/s + z): points.LAYERNORM_OF.
# Each linear's input activation (points.LINEAR_INPUT_ACT): X̂ = s∘(C − z) folds into its rows
# and bias. The activation each linear produces (points.LINEAR_OUTPUT_ACT): 1/s (and z, except
# through fc1's ReLU) fold into its columns and bias. q also takes head_dim^-½, so its Mul goes.
# +z does not commute with ReLU, so fc2_in gets its offset after the ReLU, not in fc1's bias.
OFFSET_AFTER_PRODUCER: frozenset[Act] = frozenset({Act.FC2_IN})
# Producer side computed pointwise (no affine producer): out_proj_in (P·V, Transpose,
# Reshape: Div s, Add z), fc2_in (Add z after ReLU), attn_probs (Sub c, per tensor).
PRODUCER_POINTWISE: frozenset[Act] = frozenset({Act.OUT_PROJ_IN, Act.FC2_IN, Act.ATTN_PROBS})
# Consumer side computed pointwise: QKᵀ and P·V have no weight to fold into.
CONSUMER_POINTWISE: frozenset[Act] = frozenset({Act.Q, Act.K, Act.V, Act.ATTN_PROBS})

TRT_RECORD_PREFIX = "rptq.trt_folded:"
_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


@dataclass(frozen=True)
class ActVectors:
    """One activation's parameters in the graph's channel order (positions after the fold)."""

    quant: ActQuant
    scale: NDArray[np.float32]  # [C], or [1] for a per-tensor activation
    zero: NDArray[np.int64]
    per_tensor: bool


def act_vectors(plan: QuantPlan, quant: ActQuant) -> ActVectors:
    """Per-cluster parameters repeated over the cluster's contiguous positions."""
    if quant.act not in SITE_OF:
        if quant.scale.shape != (1,) or quant.zero.shape != (1,):
            raise PlanError(f"plan {quant.key}: per-tensor activation needs one scale and zero")
        return ActVectors(
            quant, quant.scale.astype(np.float32), quant.zero.astype(np.int64), per_tensor=True
        )
    try:
        site = plan.site(quant.layer, SITE_OF[quant.act])
    except KeyError:
        raise PlanError(
            f"plan quantizes {quant.key} per cluster but has no site "
            f"layers.{quant.layer}.{SITE_OF[quant.act]}; recalibrate"
        ) from None
    if quant.scale.shape != site.sizes.shape or quant.zero.shape != site.sizes.shape:
        raise PlanError(
            f"plan {quant.key}: {quant.scale.shape[0]} scales for {site.sizes.shape[0]} clusters "
            f"of {site.key}; recalibrate"
        )
    scale = expand_to_positions(quant.scale.astype(np.float32), site.sizes)
    zero = expand_to_positions(quant.zero.astype(np.int64), site.sizes)
    return ActVectors(quant, scale, zero, per_tensor=False)


def check_act_folded(plan: QuantPlan, quant: ActQuant, folded: dict[str, str]) -> None:
    """An activation with a reorder site needs that site folded (context.check_site_folded)."""
    if quant.act in SITE_OF:
        site = plan.site(quant.layer, SITE_OF[quant.act])
        name = names.act_tensor(quant.layer, quant.act)
        check_site_folded(site, name, folded, "trt_fold")


def quantized_input_name(layer: int, act: Act) -> str:
    """The tensor holding U (what the INT8 QuantizeLinear reads) after trt_fold."""
    name = names.act_tensor(layer, act)
    return names.trt_act(name)["folded"] if act in PRODUCER_POINTWISE else name


def act_digest(quant: ActQuant) -> str:
    """Fingerprint of an activation's scales and zero points, recorded by trt_fold."""
    data = np.ascontiguousarray(quant.scale, np.float32).tobytes()
    data += np.ascontiguousarray(quant.zero, np.int64).tobytes()
    return hashlib.sha256(data).hexdigest()[:12]


def trt_folded(graph: gs.Graph) -> dict[str, str]:
    """Activation key (`layers.1.act.q`) -> act_digest of every activation trt_fold folded."""
    for line in graph.doc_string.splitlines():
        if line.startswith(TRT_RECORD_PREFIX):
            entries = (item.split("=", 1) for item in line[len(TRT_RECORD_PREFIX) :].split())
            return {key: digest for key, digest in entries}
    return {}


def is_trt_folded(graph: gs.Graph) -> bool:
    """Whether trt_fold has run on this graph (its record line is present)."""
    return any(line.startswith(TRT_RECORD_PREFIX) for line in graph.doc_string.splitlines())


def record_trt_folded(graph: gs.Graph, acts: dict[str, str]) -> None:
    """Write what trt_fold folded into the graph's doc_string (it survives export/import)."""
    line = TRT_RECORD_PREFIX + " ".join(f"{key}={digest}" for key, digest in acts.items())
    graph.doc_string = f"{graph.doc_string}\n{line}" if graph.doc_string else line
