"""Statistic-aware comparison of two backends (Polygraphy style): SQNR and errors in steps."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def sqnr_db(reference: torch.Tensor | np.ndarray, test: torch.Tensor | np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of `test` against `reference`, in dB (inf if equal)."""
    ref = torch.as_tensor(reference, dtype=torch.float64)
    noise = (torch.as_tensor(test, dtype=torch.float64) - ref).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise)


@dataclass(frozen=True)
class Comparison:
    """How far `test` is from `reference`, with where the worst element sits."""

    sqnr_db: float
    max_abs: float
    argmax: tuple[int, ...]

    def describe(self) -> str:
        """One line for failure messages: SQNR, the largest difference and where."""
        return f"SQNR {self.sqnr_db:.1f} dB, max |diff| {self.max_abs:.3g} at {self.argmax}"


def compare(reference: torch.Tensor, test: torch.Tensor) -> Comparison:
    """SQNR plus the largest absolute difference and its index."""
    diff = (test.double() - reference.double()).abs()
    flat = int(diff.argmax())
    index = tuple(int(i) for i in np.unravel_index(flat, tuple(diff.shape)))
    return Comparison(sqnr_db(reference, test), float(diff.max()), index)


def steps_apart(
    reference: torch.Tensor, test: torch.Tensor, scale: torch.Tensor
) -> tuple[float, float]:
    """(max difference in quantization steps, fraction of elements not on the same code).

    Two fake-quantized tensors on the same grid differ by whole steps; a code that flips
    because float rounding lands on the other side of a tie shows up as exactly one step.
    """
    steps = ((test.double() - reference.double()) / scale.double()).abs()
    return float(steps.max()), float((steps > 0.5).double().mean())
