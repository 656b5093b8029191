"""Run exported graphs in ONNX Runtime and return logits as torch tensors.

ORT is the parity reference for every graph rptq writes (CPU in CI, CUDA on the lent GPU), so
this stays small: one session factory and one callable with the same signature as the PyTorch
forward, so evaluation code can take either.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort

from rptq import names
from rptq.errors import ConfigError, MissingDependencyError

if TYPE_CHECKING:  # torch is imported where logits are returned: `generate` starts without it
    import torch

_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_INSTALL_HINT = {
    "CUDAExecutionProvider": "pip install onnxruntime-gpu",
    "TensorrtExecutionProvider": "pip install onnxruntime-gpu and TensorRT",
}


def resolve_providers(providers: Sequence[str] | None) -> list[str]:
    """Map short names ("cpu", "cuda") to ORT providers; CPU is always the last fallback.

    A requested GPU provider that this onnxruntime build lacks is an error, not a silent CPU
    run: timings and fp16 behaviour would otherwise be reported for the wrong device.
    """
    available = ort.get_available_providers()
    resolved: list[str] = []
    for requested in providers or ["cpu"]:
        provider = _PROVIDERS.get(requested.lower(), requested)
        if provider not in _PROVIDERS.values() and provider not in available:
            raise ConfigError(
                f"unknown ONNX Runtime provider {requested!r}; use one of {sorted(_PROVIDERS)}"
            )
        if provider not in available:
            hint = _INSTALL_HINT.get(provider, "install an onnxruntime build that has it")
            raise MissingDependencyError(
                f"ONNX Runtime provider {provider} is not available here (have: "
                f"{', '.join(available)}); {hint}"
            )
        if provider not in resolved:
            resolved.append(provider)
    if "CPUExecutionProvider" not in resolved:
        resolved.append("CPUExecutionProvider")
    return resolved


def make_session(
    path_or_model: str | Path | onnx.ModelProto,
    providers: Sequence[str] | None = None,
    optimize: bool = True,
) -> ort.InferenceSession:
    """An InferenceSession; `optimize=False` (ORT_DISABLE_ALL) runs the graph as written.

    Parity tests run both ways: without optimisation to check the graph itself, with it to
    check what users get. Models over 2 GiB must be given as a path (external data).
    """
    options = session_options(optimize)
    source: str | bytes
    if isinstance(path_or_model, onnx.ModelProto):
        source = path_or_model.SerializeToString()
    else:
        source = str(path_or_model)
    return ort.InferenceSession(source, options, providers=resolve_providers(providers))


def session_options(optimize: bool = True) -> ort.SessionOptions:
    """The options every rptq session uses (make_session; rptq.runtime.ort_kernels reads the
    optimized graph with the same ones, so it sees the kernels users get)."""
    options = ort.SessionOptions()
    # ORT rewrites DequantizeLinear(int4 weight) + MatMul into MatMulNBits, whose default
    # accuracy level 4 quantizes the *activations* to int8 on the fly: a lossy change to the
    # graph's meaning (about 37 dB logit SQNR on W4A16). Level 1 keeps fp32 activations.
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return options


class OrtLogits:
    """`(input_ids [B, T], attention_mask [B, T] | None) -> float32 logits [B, T, V]`.

    Takes the prefill graph and the decoder-with-past graph alike: the latter is run as one
    prefill step over an empty cache (rptq.runtime.decode), so perplexity scores both.
    """

    def __init__(self, session: ort.InferenceSession) -> None:
        """Wrap a session over an rptq graph (inputs input_ids/attention_mask, output logits)."""
        from rptq.runtime.decode import DecoderSession, is_with_past

        self.session = session
        self._decoder = DecoderSession(session) if is_with_past(session) else None

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run the graph; the mask defaults to all ones (no padding)."""
        import torch

        ids = input_ids.detach().cpu().numpy().astype(np.int64, copy=False)
        if attention_mask is None:
            mask = np.ones_like(ids)
        else:
            mask = attention_mask.detach().cpu().numpy().astype(np.int64, copy=False)
        if self._decoder is not None:
            logits, _ = self._decoder.step(ids, mask, self._decoder.empty_cache(ids.shape[0]))
            return torch.from_numpy(np.asarray(logits, dtype=np.float32))
        (logits,) = self.session.run(
            [names.GRAPH_LOGITS],
            {names.GRAPH_INPUT_IDS: ids, names.GRAPH_ATTENTION_MASK: mask},
        )
        return torch.from_numpy(np.asarray(logits, dtype=np.float32))
