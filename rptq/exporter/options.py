"""How an export is written, as one value: `export_onnx` and `export_streamed` take it whole
instead of a growing parameter list, and the CLI builds it once from its flags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from rptq.errors import ConfigError
from rptq.plan import ActQuantForm, KvCacheDtype, Target
from rptq.quant.trt_weights import DEFAULT_WEIGHT_GROUPS

ExportDtype = Literal["float32", "float16"]


@dataclass(frozen=True)
class ExportOptions:
    """Everything about an export except the model, the plan and the output path.

    `target` "trt" writes the TensorRT variant (docs/tensorrt-rules.md, "Implementation"), and
    `int4_block_size` (64/128, TensorRT only) stores its weights as blocked INT4, and
    `trt_weight_groups` sets the scale groups of its re-quantized folded weights; the passes
    check those against the plan (rptq.passes.context.PassContext). `external_data` None lets
    the writer choose by size (rptq.exporter.save); `force` overwrites existing outputs.

    `past` writes the decoder-with-past graph (docs/graph.md, "Decoder with past"); the library
    default stays the prefill graph, so every existing export keeps its bytes. `kv_cache_dtype`
    int8/uint8 (with `past`, ONNX Runtime target) stores the cache as the plan's K/V codes.
    `act_quant_form` (ONNX Runtime target) writes per-cluster activation quantizers as
    elementwise ops (fast in ORT's CPU provider) or per-axis Q/DQ pairs (portable); "auto" picks
    elementwise for float32 and qdq for float16 (rptq.passes.elementwise_quant).
    """

    dtype: ExportDtype = "float32"
    opset: int = 21
    target: Target = Target.ORT
    int4_block_size: int = 0
    trt_weight_groups: int = DEFAULT_WEIGHT_GROUPS
    external_data: bool | None = None
    force: bool = False
    past: bool = False
    kv_cache_dtype: KvCacheDtype = "float"
    act_quant_form: ActQuantForm = "auto"

    def __post_init__(self) -> None:
        if self.dtype not in get_args(ExportDtype):
            raise ConfigError(f"--dtype {self.dtype} is not supported; use float32 or float16")
        if self.target not in {t.value for t in Target}:
            raise ConfigError(f"target must be 'ort' or 'trt', got {self.target!r}")
        object.__setattr__(self, "target", Target(self.target))
        if self.kv_cache_dtype not in get_args(KvCacheDtype):
            raise ConfigError(
                f"--kv-cache-dtype {self.kv_cache_dtype} is not supported; use float, int8 or uint8"
            )
        if self.kv_cache_dtype != "float" and not self.past:
            raise ConfigError(
                f"--kv-cache-dtype {self.kv_cache_dtype} needs the KV-cache graph; drop "
                "--no-cache or use --kv-cache-dtype float"
            )
        if self.kv_cache_dtype != "float" and self.target is Target.TRT:
            raise ConfigError(
                f"--kv-cache-dtype {self.kv_cache_dtype} is for the ONNX Runtime target only "
                "(TensorRT keeps a float cache); use --kv-cache-dtype float with --target tensorrt"
            )
        if self.act_quant_form not in get_args(ActQuantForm):
            raise ConfigError(
                f"--act-quant-form {self.act_quant_form} is not supported; use auto, "
                "elementwise or qdq"
            )
        if self.trt_weight_groups < 1:
            raise ConfigError(f"--trt-weight-groups must be >= 1, got {self.trt_weight_groups}")
