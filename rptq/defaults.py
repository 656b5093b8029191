"""What `rptq-export MODEL --abits 4 -o model.onnx` does when no flag says otherwise.

`--device auto` takes the first CUDA GPU when there is one (calibration is GEMM-bound: minutes
instead of hours), else the CPU. Before calibration starts, one line says how much work is
coming (windows x tokens on which device), and after the first decoder layer one line says how
long the rest should take, so nobody waits 25 minutes without knowing it.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

AUTO_DEVICE = "auto"
# the calibration text shipped in the package (rptq/assets/README.md, rptq.calib_text)
BUILTIN_CALIB_DATASET = "c4-builtin"
# RPTQ's and GPTQ's calibration windows; the built-in text's default is capped at what it holds
PAPER_NSAMPLES = 128


def resolve_device(spec: str) -> str:
    """`auto` -> `cuda:0` when torch sees a CUDA device, else `cpu`; other specs unchanged."""
    if spec.strip() != AUTO_DEVICE:
        return spec
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def announce_calibration(rows: int, seq_len: int, devices: str, layers: int, source: str) -> None:
    """The plan, before the first (slow) layer."""
    log.info(
        "      plan: %d windows x %d tokens on %s, %d layers; text: %s",
        rows,
        seq_len,
        devices,
        layers,
        source,
    )


def estimate_after_first_layer(first_layer_s: float, layers: int) -> float:
    """Seconds for all layers, from the first one (every OPT decoder layer has the same shape,
    so each costs about the same; the first also pays one-off warm-up, so this errs long)."""
    total_s = first_layer_s * layers
    log.info(
        "      first layer took %.1f s: calibration should take about %s for %d layers",
        first_layer_s,
        _duration(total_s),
        layers,
    )
    return total_s


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
