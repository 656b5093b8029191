"""GPTQ (docs/algorithms.md §3) on RPTQ's grid, and the Hessians it needs.

Per row, the grid (one scale/zero per output row) is fixed from the float row before the sweep,
as RPTQ's own GPTQ does (§2.8: "static groups" semantics), so the codes stay on the grid the
plan stores and the export's DequantizeLinear reads. With weight groups, each group's grid is
fit when the sweep reaches it (GPTQ's default), or fixed up front with act-order (GPTQ's
--static-groups). The sweep is IST-DASLab's: dead inputs zeroed, dampening, the upper Cholesky
factor of H⁻¹, and blocks of `block_size` columns whose error is applied to the remaining
columns in one matrix product (lazy batch updates).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from rptq.points import Act
from rptq.quant.qparams import affine_params

log = logging.getLogger(__name__)

MAX_DAMPING_RETRIES = 4  # each retry multiplies the dampening by 10 if Cholesky fails


class HessianTap:
    """A forward tap that accumulates H = 2 XᵀX / n of selected activations (GPTQ §3.2).

    Owned by the layer-wise runner for one layer: it observes the float layer's linear inputs
    during the activation calibration pass and returns them unchanged. Each call is one
    calibration row; the running mean keeps H's scale independent of the token count (only the
    relative dampening sees the scale). Accumulated in float32 on the activations' device.
    """

    def __init__(self, acts: Iterable[Act]) -> None:
        self.acts = frozenset(acts)
        self.hessians: dict[Act, torch.Tensor] = {}
        self.tokens: dict[Act, int] = {}

    def __call__(self, act: Act, x: torch.Tensor) -> torch.Tensor:
        """Accumulate the Hessian of each linear input `act`; pass `x` through unchanged."""
        if act in self.acts:
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            seen, new = self.tokens.get(act, 0), flat.shape[0]
            update = flat.T @ flat
            if act in self.hessians:
                hessian = self.hessians[act]
                hessian.mul_(seen / (seen + new)).add_(update, alpha=2 / (seen + new))
            else:
                self.hessians[act] = update.mul_(2 / new)
            self.tokens[act] = seen + new
        return x

    def merge(self, other: HessianTap) -> None:
        """Fold in another tap's running means (other rows, any device), weighted by tokens.

        The same H as one tap over all the rows up to float rounding: the sums are grouped by
        tap rather than row by row, so the last bits may differ. Takes over `other`'s tensors.
        """
        for act, hessian in other.hessians.items():
            seen, new = self.tokens.get(act, 0), other.tokens[act]
            if act in self.hessians:
                mine = self.hessians[act]
                mine.mul_(seen / (seen + new))
                mine.add_(hessian.to(mine.device), alpha=new / (seen + new))
            else:
                self.hessians[act] = hessian
            self.tokens[act] = seen + new

    def hessian(self, act: Act) -> torch.Tensor:
        """H of `act`'s channels [C, C] (KeyError if the act was never seen)."""
        return self.hessians[act]


@dataclass(frozen=True)
class GptqResult:
    """Codes [out, in] in the input's column order, and the sweep's loss Σ (w − q)² / U_jj² / 2."""

    codes: torch.Tensor
    loss: float


def inverse_cholesky(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹, λ = percdamp · mean(diag H) (§3.3 steps 3–4).

    A Hessian that is not positive definite even after dampening (numerically rank-deficient
    inputs) is retried with ten times the dampening, up to MAX_DAMPING_RETRIES times.
    """
    size = hessian.shape[0]
    diag = torch.arange(size, device=hessian.device)
    damp = percdamp * float(torch.diag(hessian).mean())
    for attempt in range(MAX_DAMPING_RETRIES + 1):
        damped = hessian.clone()
        damped[diag, diag] += damp
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
        log.warning("GPTQ: Hessian not positive definite, dampening x10 (try %d)", attempt + 1)
        damp *= 10
    raise ValueError("GPTQ: the Hessian stays singular after dampening; use more calibration data")


class ColumnQuantizer(Protocol):
    """Quantizes weight column `index` [out] (caller's column order): (code, value) per row."""

    def __call__(self, column: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize one weight column (Q, dequantized Q) for the sweep's error feedback."""


class GridQuantizer:
    """RPTQ's affine grid, as ONNX QuantizeLinear: clamp(round(w / s) + z), half to even.

    scale/zero are [out] (one grid per row) or [out, in] (a grid per row and column, e.g. the
    static groups of a grouped weight expanded to its columns).
    """

    def __init__(self, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int) -> None:
        self.scale, self.zero = scale.float(), zero.float()
        self.qmin, self.qmax = qmin, qmax

    def refit(self, start: int, values: torch.Tensor, bits: int) -> None:
        """Set the grid of columns [start, start + g) from their current values [out, g].

        GPTQ's (dynamic) groups: the grid of a group is fixed when the sweep reaches it, from
        the weights as the error feedback left them, so later groups absorb earlier errors.
        """
        lo = values.min(dim=1).values.double().cpu().numpy()
        hi = values.max(dim=1).values.double().cpu().numpy()
        scale, zero = affine_params(lo, hi, bits)
        span = slice(start, start + values.shape[1])
        self.scale[:, span] = torch.from_numpy(scale).to(self.scale)[:, None]
        self.zero[:, span] = torch.from_numpy(zero).to(self.zero)[:, None]

    def __call__(self, column: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Round one column on the fixed grid (its group's scale/zero when grouped)."""
        scale = self.scale if self.scale.ndim == 1 else self.scale[:, index]
        zero = self.zero if self.zero.ndim == 1 else self.zero[:, index]
        code = torch.clamp(torch.round(column / scale) + zero, self.qmin, self.qmax)
        return code, (code - zero) * scale


class LevelQuantizer:
    """Nearest of each row's levels [out, K] (ties to the lower index); the code is the index."""

    def __init__(self, levels: torch.Tensor) -> None:
        self.levels = levels.float()

    def __call__(self, column: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Move one column to its nearest BCQ level (GPTQT's second sweep)."""
        nearest = (column[:, None] - self.levels).abs().argmin(dim=1)
        return nearest.float(), self.levels.gather(1, nearest[:, None])[:, 0]


def gptq_sweep(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantizer: ColumnQuantizer,
    percdamp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    regroup: Callable[[int, torch.Tensor], None] | None = None,
    group_size: int = 0,
) -> GptqResult:
    """GPTQ's column sweep (§3.3) of `weight` [out, in] with any per-column quantizer.

    `hessian` [in, in] belongs to the columns in the order given; the caller permutes both when
    the exported graph holds permuted columns, because the sweep's column order changes the
    result. `regroup(start, values)` is called when the sweep reaches a multiple of
    `group_size` with the current values of that group's columns (§3.3 step 7); not with
    act-order, whose groups would not be contiguous columns (use static groups there).
    """
    if regroup is not None and (act_order or group_size < 1):
        raise ValueError("dynamic groups need a group size and no act-order")
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian {tuple(hessian.shape)} does not match {cols} weight columns")
    w = weight.detach().clone().float()
    h = hessian.detach().clone().float().to(w.device)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1  # §3.3 step 1: a never-active input; its column is irrelevant
    w[:, dead] = 0
    order = None
    if act_order:
        order = torch.argsort(torch.diag(h), descending=True, stable=True)
        w, h = w[:, order], h[order][:, order]
    h_inv = inverse_cholesky(h, percdamp)
    codes = torch.zeros_like(w)
    loss = torch.zeros((), dtype=torch.float64, device=w.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        block = w[:, i1:i2].clone()
        errors = torch.zeros_like(block)
        h_block = h_inv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            column = block[:, j]
            position = i1 + j if order is None else int(order[i1 + j])
            if regroup is not None and position % group_size == 0:
                upcoming = torch.cat([block[:, j:], w[:, i2:]], dim=1)[:, :group_size]
                regroup(position, upcoming)
            code, quantized = quantizer(column, position)
            codes[:, i1 + j] = code
            error = (column - quantized) / h_block[j, j]
            loss += (error.double() ** 2).sum() / 2
            block[:, j:] -= error[:, None] @ h_block[j : j + 1, j:]
            errors[:, j] = error
        w[:, i2:] -= errors @ h_inv[i1:i2, i2:]
    if order is not None:
        codes = codes[:, torch.argsort(order)]
    return GptqResult(codes.to(torch.int32), float(loss))


def gptq_codes(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    qmin: int,
    qmax: int,
    percdamp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> GptqResult:
    """GPTQ codes of `weight` [out, in] on a fixed grid: scale/zero [out], or [out, in] for a
    grid per column (static groups: fixed before the sweep, so act-order needs no regrouping).
    """
    if scale.shape not in (weight.shape[:1], weight.shape) or zero.shape != scale.shape:
        raise ValueError(f"scale/zero {tuple(scale.shape)} fit neither [out] nor [out, in]")
    quantizer = GridQuantizer(scale.to(weight.device), zero.to(weight.device), qmin, qmax)
    return gptq_sweep(weight, hessian, quantizer, percdamp, block_size, act_order)


def output_error(
    weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor
) -> torch.Tensor:
    """Per-row tr((W − Ŵ) H (W − Ŵ)ᵀ): ‖WX − ŴX‖² per output channel, up to H's scale.

    float32 products (a search compares these, it needs no more), summed in float64.
    """
    delta = (weight.float() - quantized.float().to(weight.device)).to(hessian.device)
    return ((delta @ hessian.float()) * delta).double().sum(dim=1)
