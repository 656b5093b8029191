"""The optional parts of a plan's weight entries: GPTQT binary codes, LoRC factors, groups,
and the input scale a TensorRT-target weight was calibrated with.

Groups: a grouped weight has one (scale, zero) per output row and group of input channels,
scale/zero [out, groups], and `group_index` [in] names each Hugging Face input channel's
group. Groups are contiguous blocks of `weight_group_size` channels in the exported graph's
input order (after the reorder), so the export is one blocked DequantizeLinear (ONNX opset 21
`block_size`); storing the index rather than the permutation keeps an entry self-contained.

Folded input scale (plans calibrated with `--target tensorrt`): the TensorRT variant folds the
activation scale c of a linear's quantized input into the weight's input channels, so the
weight it quantizes is W' = W·diag(c). Such an entry's codes, scale, binary code and LoRC
factors all stand for W'; `folded_scale` [in] (Hugging Face input order) is c, and the model's
weight is W'·diag(1/c). Storing c keeps the entry self-contained and lets the export check that
the plan's activation scales are the ones the weight was calibrated with.

Kept beside plan.py (which re-exports the types) so that the plan module stays about the
reorder sites and the linear codes. On disk they are extra tensors under the weight's key
(`<fqn>.bcq.alpha|beta`, `<fqn>.lorc.u|v[.scale|.zero]`, `<fqn>.group_index`,
`<fqn>.folded_scale`) and one extra JSON field per weight (`binary_planes`, `lorc_bits`,
`groups`, `folded_input`); plans without them load unchanged (schema version 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from rptq.errors import PlanError
from rptq.quant.bcq import binary_weight, planes_of
from rptq.quant.lowrank import FACTOR_BITS, dequantize_factor, lowrank_product
from rptq.quant.qparams import dequantize, grid_bounds

FIX = "recalibrate with `rptq-export calibrate`"


@dataclass(frozen=True, slots=True)
class BinaryCode:
    """GPTQT's binary coding of a weight whose n-bit codes are `WeightQuant.codes`.

    A code c spells the BCQ index k = c + 2^(n−1) (the signed n-bit grid keeps the plan's
    "codes lie on their grid" check); bit i of k set means plane i is +1, else −1, and the
    weight is Σ_i alpha[r, i] b_i + beta[r] (rptq.quant.bcq.binary_weight). The entry's
    scale/zero then hold the (n+1)-bit linear grid GPTQT started from: provenance only.
    """

    alpha: NDArray[np.float32]  # [out, n]
    beta: NDArray[np.float32]  # [out]

    @property
    def planes(self) -> int:
        """n, the number of binary planes."""
        return int(self.alpha.shape[1])


@dataclass(frozen=True, slots=True)
class LowRankFactor:
    """One LoRC factor [rows, R]: float values (bits 16) or int8 codes with per-row scale/zero."""

    bits: int
    values: NDArray[Any]  # float32 values, or int8 codes when bits == 8
    scale: NDArray[np.float32] | None = None  # [rows], bits == 8 only
    zero: NDArray[np.int32] | None = None  # [rows], bits == 8 only

    def dequantized(self) -> NDArray[np.float32]:
        """The float factor the exported branch multiplies by."""
        if self.scale is None or self.zero is None:
            return np.asarray(self.values, np.float32)
        return dequantize_factor(self.values, self.scale, self.zero)


@dataclass(frozen=True, slots=True)
class LowRank:
    """LoRC correction Û V̂ᵀ of a weight: u [out, R], v [in, R] (Hugging Face orientation)."""

    u: LowRankFactor
    v: LowRankFactor

    @property
    def rank(self) -> int:
        """R, the number of kept singular triplets."""
        return int(self.u.values.shape[1])


def binary_index(codes: NDArray[np.integer], bits: int) -> NDArray[np.int64]:
    """BCQ index [out, in] (bit i: plane i is +1) of a binary weight's signed n-bit codes."""
    return np.asarray(codes, np.int64) + 2 ** (bits - 1)


def group_count(group_index: NDArray[np.integer]) -> int:
    """Number of scale columns a grouped weight has."""
    return int(group_index.max(initial=-1)) + 1


def weight_values(
    codes: NDArray[np.integer],
    scale: NDArray[np.float32],
    zero: NDArray[np.int32],
    bits: int,
    binary: BinaryCode | None,
    lorc: LowRank | None,
    group_index: NDArray[np.integer] | None = None,
    folded_scale: NDArray[np.floating] | None = None,
) -> NDArray[np.float32]:
    """The float weight [out, in] a plan entry stands for, in float32.

    Linear codes dequantize per row; a binary code replaces them by Σ α_i b_i + β; LoRC adds
    Û V̂ᵀ. The export computes the same terms (the branch as a separate MatMul, so its sum is
    reassociated: equal up to float rounding, not bit-equal). With a folded input scale c the
    terms stand for W·diag(c), so the result is divided by c per input channel.
    """
    if binary is None and group_index is not None:
        values = dequantize(codes, scale[:, group_index], zero[:, group_index])
    elif binary is None:
        values = dequantize(codes, scale[:, None], zero[:, None])
    else:
        planes = planes_of(binary_index(codes, bits), bits)
        values = binary_weight(planes, binary.alpha, binary.beta, axis=0)
    if lorc is not None:
        values = values + lowrank_product(lorc.u.dequantized(), lorc.v.dequantized())
    if folded_scale is not None:
        values = values.astype(np.float32) / np.asarray(folded_scale, np.float32)[None, :]
    return values.astype(np.float32)


def check_weight_extras(
    key: str,
    codes_shape: tuple[int, ...],
    bits: int,
    binary: BinaryCode | None,
    lorc: LowRank | None,
    where: str,
    group_index: NDArray[np.integer] | None = None,
    folded_scale: NDArray[np.floating] | None = None,
) -> None:
    """Shapes, ranges and finiteness of a weight's binary code, LoRC factors, groups and
    folded input scale."""
    rows, cols = codes_shape
    if folded_scale is not None and (
        folded_scale.shape != (cols,)
        or not np.all(np.isfinite(folded_scale))
        or np.any(folded_scale <= 0)
    ):
        raise PlanError(
            f"{where}{key}.folded_scale must hold {cols} finite positive input scales; {FIX}"
        )
    if group_index is not None:
        sizes = np.bincount(group_index, minlength=1) if group_index.size else np.zeros(0)
        if group_index.shape != (cols,) or group_index.min(initial=0) < 0 or np.any(sizes == 0):
            raise PlanError(
                f"{where}{key}.group_index must give each of {cols} inputs a group, every group "
                f"used; {FIX}"
            )
        if binary is not None:
            raise PlanError(f"{where}{key}: binary codes have no groups; {FIX}")
    if binary is not None:
        _check_binary(key, rows, bits, binary, where)
    if lorc is not None:
        for name, factor, length in (("u", lorc.u, rows), ("v", lorc.v, cols)):
            _check_factor(f"{where}{key}.lorc.{name}", factor, length, lorc.rank)


def _check_binary(key: str, rows: int, bits: int, binary: BinaryCode, where: str) -> None:
    what = f"{where}{key}.bcq"
    if binary.alpha.shape != (rows, bits) or binary.beta.shape != (rows,):
        raise PlanError(
            f"{what} alpha {list(binary.alpha.shape)} / beta {list(binary.beta.shape)} do not "
            f"match [{rows}, {bits}] / [{rows}]; {FIX}"
        )
    if not (np.all(np.isfinite(binary.alpha)) and np.all(np.isfinite(binary.beta))):
        raise PlanError(f"{what} alpha/beta are not finite; {FIX}")
    if np.any(binary.alpha < 0):
        raise PlanError(f"{what}.alpha must be >= 0; {FIX}")


def _check_factor(what: str, factor: LowRankFactor, length: int, rank: int) -> None:
    if factor.values.ndim != 2 or factor.values.shape != (length, rank) or rank < 1:
        raise PlanError(
            f"{what} has shape {list(factor.values.shape)}, expected [{length}, {rank}] with "
            f"rank >= 1; {FIX}"
        )
    if factor.bits == 16 and factor.scale is None and factor.zero is None:
        if not np.all(np.isfinite(factor.values)):
            raise PlanError(f"{what} has non-finite values; {FIX}")
        return
    if factor.bits != FACTOR_BITS or factor.scale is None or factor.zero is None:
        raise PlanError(f"{what}: factors are float (bits 16) or int8 with scale/zero; {FIX}")
    if factor.scale.shape != (length,) or factor.zero.shape != (length,):
        raise PlanError(f"{what} scale/zero do not match {length} rows; {FIX}")
    qmin, qmax = grid_bounds(FACTOR_BITS)
    if factor.values.size and (int(factor.values.min()) < qmin or int(factor.values.max()) > qmax):
        raise PlanError(f"{what} codes leave the 8-bit grid; {FIX}")
    if not np.all(np.isfinite(factor.scale)) or np.any(factor.scale <= 0):
        raise PlanError(f"{what}.scale has non-finite or non-positive values; {FIX}")


def extra_json(
    binary: BinaryCode | None,
    lorc: LowRank | None,
    group_index: NDArray[np.integer] | None,
    folded_scale: NDArray[np.floating] | None = None,
) -> dict[str, int]:
    """JSON fields of a weight entry that say which extra tensors it has."""
    entry = {}
    if folded_scale is not None:
        entry["folded_input"] = 1
    if group_index is not None:
        entry["groups"] = group_count(group_index)
    if binary is not None:
        entry["binary_planes"] = binary.planes
    if lorc is not None:
        entry["lorc_bits"] = lorc.u.bits
    return entry


def extra_tensors(
    key: str,
    binary: BinaryCode | None,
    lorc: LowRank | None,
    group_index: NDArray[np.integer] | None = None,
    folded_scale: NDArray[np.floating] | None = None,
) -> dict[str, NDArray[Any]]:
    """Tensors of the binary code (`<key>.bcq.*`), LoRC factors (`<key>.lorc.*`), groups and
    the folded input scale (`<key>.folded_scale`)."""
    out: dict[str, NDArray[Any]] = {}
    if folded_scale is not None:
        out[f"{key}.folded_scale"] = np.asarray(folded_scale, np.float32)
    if group_index is not None:
        out[f"{key}.group_index"] = np.asarray(group_index, np.int32)
    if binary is not None:
        out[f"{key}.bcq.alpha"] = binary.alpha.astype(np.float32)
        out[f"{key}.bcq.beta"] = binary.beta.astype(np.float32)
    if lorc is not None:
        for name, factor in (("u", lorc.u), ("v", lorc.v)):
            tensor = f"{key}.lorc.{name}"
            if factor.scale is None or factor.zero is None:
                out[tensor] = np.asarray(factor.values, np.float32)
            else:
                out[tensor] = np.asarray(factor.values, np.int8)
                out[f"{tensor}.scale"] = factor.scale.astype(np.float32)
                out[f"{tensor}.zero"] = factor.zero.astype(np.int32)
    return out


def binary_from(entry: dict[str, Any], tensors: dict[str, NDArray[Any]]) -> BinaryCode | None:
    """The binary code of a JSON weight entry, if it has one (KeyError if a tensor is missing)."""
    if "binary_planes" not in entry:
        return None
    key = entry["fqn"]
    return BinaryCode(tensors[f"{key}.bcq.alpha"], tensors[f"{key}.bcq.beta"])


def groups_from(entry: dict[str, Any], tensors: dict[str, NDArray[Any]]) -> NDArray[Any] | None:
    """The group of each input channel of a JSON weight entry, if it is grouped."""
    return tensors[f"{entry['fqn']}.group_index"] if "groups" in entry else None


def folded_from(entry: dict[str, Any], tensors: dict[str, NDArray[Any]]) -> NDArray[Any] | None:
    """The folded input scale of a JSON weight entry calibrated for TensorRT, if it has one."""
    return tensors[f"{entry['fqn']}.folded_scale"] if "folded_input" in entry else None


def lorc_from(entry: dict[str, Any], tensors: dict[str, NDArray[Any]]) -> LowRank | None:
    """The LoRC factors of a JSON weight entry, if it has them (KeyError if a tensor is missing)."""
    if "lorc_bits" not in entry:
        return None
    bits = int(entry["lorc_bits"])

    def factor(name: str) -> LowRankFactor:
        key = f"{entry['fqn']}.lorc.{name}"
        if bits == 16:
            return LowRankFactor(bits, tensors[key])
        return LowRankFactor(bits, tensors[key], tensors[f"{key}.scale"], tensors[f"{key}.zero"])

    return LowRank(factor("u"), factor("v"))
