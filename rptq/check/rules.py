"""Static TensorRT rule checker: what TensorRT's ONNX parser and builder reject, without TensorRT.

TensorRT cannot be installed where rptq is developed and tested, so its Q/DQ and operator rules
are encoded here and checked on the ONNX file itself. Each rule is one small read-only function
`(ModelView) -> Iterator[Violation]`; `RULES` lists them with their source in TensorRT's
documentation (docs/tensorrt-rules.md is the same list for readers). Nothing here edits a graph.

The view works on an `onnx.ModelProto` loaded *without* external data: only scale and zero-point
values are read, one tensor at a time, so a 6.7B model is checked in seconds and little memory.
Subgraphs (If/Loop bodies) are not inspected: rptq never emits them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto

from rptq.check.view import ModelView
from rptq.errors import ConfigError
from rptq.plan import Target

Severity = Literal["error", "warning"]

MIN_OPSET, MAX_OPSET = 21, 25  # INT4/blocked Q/DQ need 21; TensorRT 11's parser reads up to 25
TRT_QUANT_TYPES = {
    TensorProto.INT8,
    TensorProto.FLOAT8E4M3FN,
    TensorProto.INT4,
    TensorProto.FLOAT4E2M1,
}
WEIGHT_ONLY_TYPES = {TensorProto.INT4, TensorProto.FLOAT4E2M1}
BLOCK_TYPES = {TensorProto.INT4, TensorProto.FLOAT4E2M1, TensorProto.FLOAT8E4M3FN}
INT4_BLOCK_SIZES = (64, 128)
UNSUPPORTED_OPS = {
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "ConvInteger",
    "QLinearMatMul",
    "QLinearConv",
}
HALF_TYPES = {TensorProto.FLOAT16, TensorProto.BFLOAT16}
MAX_TENSOR_ELEMENTS = 2**31 - 1
STANDARD_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken rule at one node (or tensor); errors fail `check`, warnings are advice."""

    rule_id: str
    node: str
    message: str
    severity: Severity = "error"

    def line(self) -> str:
        """The one-line form the CLI prints."""
        return f"{self.rule_id} ({self.severity}) {self.node}: {self.message}"

    def as_dict(self) -> dict[str, str]:
        """The violation as a JSON object (`check --json`)."""
        return {
            "rule": self.rule_id,
            "severity": self.severity,
            "node": self.node,
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class Rule:
    """A rule's id, what it demands, where TensorRT documents it, and its check."""

    rule_id: str
    summary: str
    source: str
    check: Callable[[ModelView], Iterator[Violation]]


def _type_name(elem_type: int | None) -> str:
    return "unknown" if elem_type is None else TensorProto.DataType.Name(elem_type)


# --- the rules --------------------------------------------------------------------------------


def check_opset(view: ModelView) -> Iterator[Violation]:
    """Opset 21..25: INT4 and blocked Q/DQ need 21, TensorRT 11's parser stops at 25."""
    opset = view.opset
    if opset is None or not MIN_OPSET <= opset <= MAX_OPSET:
        yield Violation(
            "TRT-OPSET",
            "model",
            f"default-domain opset {opset} is outside {MIN_OPSET}..{MAX_OPSET}; export with "
            f"--opset 21 (TensorRT 10.x parses up to 24, 11.x up to 25)",
        )


def check_domains(view: ModelView) -> Iterator[Violation]:
    """Only standard ONNX ops: TensorRT's parser has no com.microsoft ops such as MatMulNBits."""
    for node in view.nodes:
        if node.domain not in STANDARD_DOMAINS:
            yield Violation(
                "TRT-DOMAIN",
                node.name,
                f"{node.domain}.{node.op_type} is not a standard ONNX op; TensorRT's parser "
                "does not know it (use DequantizeLinear + MatMul)",
            )


def check_unsupported_ops(view: ModelView) -> Iterator[Violation]:
    """Dynamic and QOperator-format quantization ops have no TensorRT parser importer."""
    for node in view.nodes:
        if node.domain in STANDARD_DOMAINS and node.op_type in UNSUPPORTED_OPS:
            yield Violation(
                "TRT-UNSUPPORTED-OP",
                node.name,
                f"{node.op_type} is not supported by TensorRT's ONNX parser; use static "
                "QuantizeLinear/DequantizeLinear pairs (QDQ format)",
            )


def check_quant_types(view: ModelView) -> Iterator[Violation]:
    """Q/DQ data types TensorRT has: INT8, FP8 E4M3, INT4, FP4 E2M1 (no UINT8, INT16, UINT4)."""
    for node in view.qdq_nodes():
        elem = view.quantized_type(node)
        if elem not in TRT_QUANT_TYPES:
            yield Violation(
                "TRT-QDQ-TYPE",
                node.name,
                f"{node.op_type} uses {_type_name(elem)}; TensorRT quantizes to INT8, FP8 E4M3, "
                "INT4 or FP4 only",
            )


def check_weight_only_types(view: ModelView) -> Iterator[Violation]:
    """INT4/FP4 are weight-only: an activation Q/DQ must be INT8 or FP8."""
    for node in view.qdq_nodes():
        elem = view.quantized_type(node)
        if elem in WEIGHT_ONLY_TYPES and not view.is_constant(node.input[0]):
            yield Violation(
                "TRT-WEIGHT-ONLY-TYPE",
                node.name,
                f"{_type_name(elem)} on activation {node.input[0]}; TensorRT uses INT4/FP4 for "
                "weights only (activations: INT8 or FP8; A4 = INT8 Q/DQ on a clamped 4-bit grid)",
            )


def check_activation_per_tensor(view: ModelView) -> Iterator[Violation]:
    """Activations are quantized per tensor: a non-scalar scale needs data rooted at a constant."""
    for node in view.qdq_nodes():
        rank = view.rank(view.input(node, 1))  # None: unknown, reported by TRT-QPARAM-CONST
        if rank is not None and rank != 0 and not view.is_constant(node.input[0]):
            yield Violation(
                "TRT-ACT-PER-TENSOR",
                node.name,
                f"activation {node.input[0]} has a rank-{rank} scale; TensorRT accepts per-channel "
                "or block scales only on weights (fold per-channel scales into the producer)",
            )


def check_int4_blocks(view: ModelView) -> Iterator[Violation]:
    """INT4 needs block scales, block size 64 or 128, on one of the last two dimensions."""
    for node in view.qdq_nodes():
        if view.quantized_type(node) != TensorProto.INT4:
            continue
        block = view.attr_int(node, "block_size", 0)
        rank = view.rank(node.input[0])
        axis = view.attr_int(node, "axis", 1)
        if rank is not None and axis < 0:
            axis += rank
        problem = None
        if block not in INT4_BLOCK_SIZES:
            problem = f"block_size {block or 'none (per-channel/per-tensor)'}"
        elif rank is not None and axis not in (rank - 1, rank - 2):
            problem = f"block axis {axis} of a rank-{rank} tensor"
        if problem is not None:
            yield Violation(
                "TRT-INT4-BLOCK",
                node.name,
                f"INT4 with {problem}; TensorRT needs block scales with block_size 64 or 128 on "
                "one of the last two dimensions",
            )


def check_block_quantization(view: ModelView) -> Iterator[Violation]:
    """Block quantization only for INT4/FP4/FP8 weights, with scales of rank <= 2."""
    for node in view.qdq_nodes():
        elem = view.quantized_type(node)
        scale_rank = view.rank(view.input(node, 1))
        if scale_rank is not None and scale_rank > 2:
            yield Violation(
                "TRT-BLOCK",
                node.name,
                f"scale has rank {scale_rank}; TensorRT takes scalar, 1-D or 2-D (block) scales",
            )
        elif view.attr_int(node, "block_size", 0) > 0 and elem not in BLOCK_TYPES:
            yield Violation(
                "TRT-BLOCK",
                node.name,
                f"block quantization of {_type_name(elem)}; TensorRT blocks only INT4, FP4 and FP8",
            )


def check_constant_qparams(view: ModelView) -> Iterator[Violation]:
    """Scale and zero point are build-time constants (initializer, Constant, Constant -> Cast)."""
    for node in view.qdq_nodes():
        for slot, what in ((1, "scale"), (2, "zero point")):
            name = view.input(node, slot)
            if name and not view.is_constant(name):
                yield Violation(
                    "TRT-QPARAM-CONST",
                    node.name,
                    f"{what} {name} is computed at run time; TensorRT needs a build-time constant",
                )


def check_zero_points(view: ModelView) -> Iterator[Violation]:
    """Symmetric only: every zero-point coefficient is 0."""
    for node in view.qdq_nodes():
        name = view.input(node, 2)
        values = view.values(name) if name else None
        if values is None:
            continue
        nonzero = int(np.count_nonzero(values))
        if nonzero:
            yield Violation(
                "TRT-ZERO-POINT",
                node.name,
                f"zero point {name} has {nonzero} non-zero of {values.size} values; TensorRT "
                "supports symmetric quantization only (move the offset into a float Sub/bias)",
            )


def check_scale_values(view: ModelView) -> Iterator[Violation]:
    """Every scale coefficient is finite and strictly positive."""
    for node in view.qdq_nodes():
        values = view.values(view.input(node, 1))
        if values is None:
            continue
        bad = int(np.count_nonzero(~np.isfinite(values) | (values <= 0)))
        if bad:
            yield Violation(
                "TRT-SCALE-VALUE",
                node.name,
                f"scale {node.input[1]} has {bad} zero, negative or non-finite values; TensorRT "
                "needs strictly positive finite scales",
            )


def check_scale_dtype(view: ModelView) -> Iterator[Violation]:
    """Strong typing: a half/bfloat16 scale must have the same type as the float side."""
    for node in view.qdq_nodes():
        scale_type = view.elem_type(view.input(node, 1))
        if scale_type not in HALF_TYPES:
            continue
        if node.op_type == "QuantizeLinear":
            float_type, side = view.elem_type(node.input[0]), "input"
        else:
            float_type, side = view.attr_int(node, "output_dtype", 0) or scale_type, "output"
        if float_type is not None and float_type != scale_type:
            yield Violation(
                "TRT-SCALE-DTYPE",
                node.name,
                f"scale is {_type_name(scale_type)} but the {side} is {_type_name(float_type)}; "
                "strongly typed TensorRT needs a half scale to match the float tensor",
            )


def check_layernorm_outputs(view: ModelView) -> Iterator[Violation]:
    """LayerNormalization with only its first output Y (no Mean/InvStdDev)."""
    for node in view.nodes:
        if node.op_type == "LayerNormalization" and any(node.output[1:]):
            yield Violation(
                "TRT-LAYERNORM-OUTPUTS",
                node.name,
                "LayerNormalization declares Mean/InvStdDev outputs; TensorRT supports only Y",
            )


def check_cumsum(view: ModelView) -> Iterator[Violation]:
    """CumSum on FP32/FP16 with a constant axis (cast integer counts to float first)."""
    for node in view.nodes:
        if node.op_type != "CumSum":
            continue
        elem = view.elem_type(node.input[0])
        if elem not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            yield Violation(
                "TRT-CUMSUM",
                node.name,
                f"CumSum of {_type_name(elem)}; TensorRT's CumSum takes FP32/FP16 only "
                "(Cast to float and back)",
            )
        if not view.is_constant(view.input(node, 1)):
            yield Violation("TRT-CUMSUM", node.name, "CumSum axis is not a build-time constant")


def check_attention(view: ModelView) -> Iterator[Violation]:
    """ONNX Attention without past_key/past_value inputs or present/qk outputs."""
    for node in view.nodes:
        if node.op_type != "Attention" or node.domain not in STANDARD_DOMAINS:
            continue
        if any(node.input[4:]) or any(node.output[1:]):
            yield Violation(
                "TRT-ATTENTION-KV",
                node.name,
                "Attention with past_key/past_value/nonpad_kv_seqlen inputs or present/qk "
                "outputs; TensorRT's parser supports only Q, K, V, attn_mask -> Y",
            )


def check_tensor_sizes(view: ModelView) -> Iterator[Violation]:
    """No initializer above 2^31 - 1 elements (TensorRT's per-tensor volume limit)."""
    for tensor in view.model.graph.initializer:
        elements = math.prod(tensor.dims)
        if elements > MAX_TENSOR_ELEMENTS:
            yield Violation(
                "TRT-TENSOR-SIZE",
                tensor.name,
                f"{elements} elements exceed TensorRT's limit of {MAX_TENSOR_ELEMENTS}",
            )


def check_fp16_compute(view: ModelView) -> Iterator[Violation]:
    """Strongly typed TensorRT runs the dtypes written in the ONNX: fp32 graphs stay fp32."""
    if not view.float_types() & HALF_TYPES:
        yield Violation(
            "TRT-FP16",
            "model",
            "the graph carries no float16/bfloat16 tensors, so TensorRT (strongly typed) runs it "
            "in FP32; export with --dtype float16 for FP16 compute",
            severity="warning",
        )


TRT_DOCS = "https://docs.nvidia.com/deeplearning/tensorrt/latest"
QUANT_TYPES_DOC = f"{TRT_DOCS}/inference-library/quantized-types-schemes.html"
OPERATORS_MD = "onnx/onnx-tensorrt docs/operators.md"
NVINFER_H = "NVIDIA/TensorRT include/NvInfer.h (IQuantizeLayer, IDequantizeLayer)"

RULES: tuple[Rule, ...] = (
    Rule(
        "TRT-OPSET",
        "default-domain opset 21..25",
        f"{TRT_DOCS}/reference/onnx-opset-guide.html; {OPERATORS_MD}; ONNX 1.16 release notes",
        check_opset,
    ),
    Rule("TRT-DOMAIN", "standard ONNX domain only", OPERATORS_MD, check_domains),
    Rule(
        "TRT-UNSUPPORTED-OP",
        "no DynamicQuantizeLinear / QOperator ops",
        OPERATORS_MD,
        check_unsupported_ops,
    ),
    Rule("TRT-QDQ-TYPE", "Q/DQ types INT8, FP8, INT4, FP4", QUANT_TYPES_DOC, check_quant_types),
    Rule(
        "TRT-WEIGHT-ONLY-TYPE",
        "INT4/FP4 only on weights",
        QUANT_TYPES_DOC,
        check_weight_only_types,
    ),
    Rule(
        "TRT-ACT-PER-TENSOR",
        "activations per tensor; per-channel/block scales only on constants",
        NVINFER_H,
        check_activation_per_tensor,
    ),
    Rule(
        "TRT-INT4-BLOCK",
        "INT4 blocked, block_size 64/128, last two dims",
        QUANT_TYPES_DOC,
        check_int4_blocks,
    ),
    Rule(
        "TRT-BLOCK",
        "block quantization only INT4/FP4/FP8, scale rank <= 2",
        NVINFER_H,
        check_block_quantization,
    ),
    Rule(
        "TRT-QPARAM-CONST",
        "scale and zero point are build-time constants",
        NVINFER_H,
        check_constant_qparams,
    ),
    Rule("TRT-ZERO-POINT", "zero points all 0", f"{NVINFER_H}; {OPERATORS_MD}", check_zero_points),
    Rule("TRT-SCALE-VALUE", "scales finite and > 0", NVINFER_H, check_scale_values),
    Rule(
        "TRT-SCALE-DTYPE",
        "half/bf16 scale matches the float tensor (strong typing)",
        NVINFER_H,
        check_scale_dtype,
    ),
    Rule(
        "TRT-LAYERNORM-OUTPUTS",
        "LayerNormalization has one output",
        f"{OPERATORS_MD}; NVIDIA/TensorRT#3457",
        check_layernorm_outputs,
    ),
    Rule("TRT-CUMSUM", "CumSum on FP32/FP16, constant axis", OPERATORS_MD, check_cumsum),
    Rule(
        "TRT-ATTENTION-KV",
        "Attention without past/present tensors",
        OPERATORS_MD,
        check_attention,
    ),
    Rule(
        "TRT-TENSOR-SIZE",
        "tensors below 2^31 elements",
        "NVIDIA/TensorRT#1348",
        check_tensor_sizes,
    ),
    Rule(
        "TRT-FP16",
        "graph carries FP16 compute (warning)",
        f"{TRT_DOCS}/api/migration/tensorrt-10x-to-11x-python-api-reference.html",
        check_fp16_compute,
    ),
)


def _onnx_checker(model: onnx.ModelProto | Path) -> Iterator[Violation]:
    """onnx.checker with full (shape-inference) checking; a path handles external data."""
    try:
        source = str(model) if isinstance(model, Path) else model
        onnx.checker.check_model(source, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        message = " ".join(str(exc).split())
        yield Violation("ONNX-CHECKER", "model", message[:500])


def check_model(
    model: onnx.ModelProto,
    target: Target = Target.TRT,
    base_dir: Path | None = None,
    path: Path | None = None,
) -> list[Violation]:
    """Every violation of `target`'s rules; `ort` is the ONNX checker alone.

    `base_dir` is where external data lives (the model file's directory); `path`, when given,
    lets the ONNX checker read a model over 2 GiB from disk instead of from memory.
    """
    if target not in {t.value for t in Target}:
        raise ValueError(f"unknown check target {target!r}")
    violations = list(_onnx_checker(path if path is not None else model))
    if target == Target.TRT:
        view = ModelView(model, base_dir)
        for rule in RULES:
            violations.extend(rule.check(view))
    return violations


def check_file(path: Path, target: Target = Target.TRT) -> list[Violation]:
    """Check an ONNX file; weights stay on disk, scales and zero points are read one by one."""
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (OSError, DecodeError) as exc:
        raise ConfigError(f"{path} is not a readable ONNX model ({type(exc).__name__})") from None
    return check_model(model, target, base_dir=path.parent, path=path)


def errors(violations: list[Violation]) -> list[Violation]:
    """The violations that fail a check (warnings excluded)."""
    return [v for v in violations if v.severity == "error"]
