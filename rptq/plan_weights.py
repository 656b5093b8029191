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

Kept beside plan.py (which re-exports the types, `WeightQuant` included) so that the plan
module stays about the reorder sites, the activations and the recipe. On disk they are extra
tensors under the weight's key
(`<fqn>.bcq.alpha|beta`, `<fqn>.lorc.u|v[.scale|.zero]`, `<fqn>.group_index`,
`<fqn>.folded_scale`) and one extra JSON field per weight (`binary_planes`, `lorc_bits`,
`groups`, `folded_input`); plans without them load unchanged (schema version 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from rptq.errors import PlanError
from rptq.names import LAYER_PREFIX
from rptq.names import module as module_path
from rptq.points import LINEARS
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


def linear_of_fqn(fqn: str) -> tuple[int, str]:
    """(layer, linear) of a decoder linear's module path (`model.decoder.layers.3.fc1`)."""
    index, _, linear = fqn.removeprefix(LAYER_PREFIX).partition(".")
    if index.isdigit() and linear in LINEARS and module_path(int(index), linear) == fqn:
        return int(index), linear
    raise PlanError(f"plan weight {fqn} is not one of the six linears of an OPT decoder layer")


@dataclass(frozen=True, slots=True)
class WeightQuant:
    """Integer codes of one linear weight [out, in] (Hugging Face layout), per-row scale/zero.

    `binary` (GPTQT) replaces the linear dequantization by binary planes; `lorc` adds a
    low-rank correction. Either is None for plain RTN/GPTQ codes. With `group_index`, scale
    and zero are [out, groups] and input channel j uses column group_index[j] (groups are
    contiguous blocks in the exported graph's channel order, see the module docstring). With
    `folded_scale` (plans calibrated for TensorRT) everything above stands for W·diag(c),
    c = folded_scale, with symmetric codes (zero 0) unless binary.

    `layer` and `linear` are parsed from `fqn` once, here (PlanError if it is not one of a
    decoder layer's six linears), so no caller parses the module path again.
    """

    fqn: str
    bits: int
    codes: NDArray[np.int8]
    scale: NDArray[np.float32]
    zero: NDArray[np.int32]
    binary: BinaryCode | None = None
    lorc: LowRank | None = None
    group_index: NDArray[np.int32] | None = None  # [in]: scale column of each input channel
    folded_scale: NDArray[np.float32] | None = None  # [in]: input scale folded in (TensorRT)
    layer: int = field(init=False)
    linear: str = field(init=False)

    def __post_init__(self) -> None:
        layer, linear = linear_of_fqn(self.fqn)
        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "linear", linear)

    @property
    def key(self) -> str:
        """Tensor key prefix of this entry in the plan file (the module path)."""
        return self.fqn

    def values(self) -> NDArray[np.float32]:
        """The float weight [out, in] this entry stands for (what the reference multiplies by),
        in the model's own domain (a folded input scale divided back out)."""
        values = self.folded_values()
        if self.folded_scale is not None:
            values = values / np.asarray(self.folded_scale, np.float32)[None, :]
        return values.astype(np.float32)

    def folded_values(self) -> NDArray[np.float32]:
        """The weight [out, in] as the TensorRT variant's graph holds it: W·diag(folded_scale),
        or values() when nothing was folded in.

        Linear codes dequantize per row (or per group); a binary code replaces them by
        Σ α_i b_i + β; LoRC adds Û V̂ᵀ. The export computes the same terms (the branch as a
        separate MatMul, so its sum is reassociated: equal up to float rounding, not bit-equal).
        """
        if self.binary is None and self.group_index is not None:
            gi = self.group_index
            values = dequantize(self.codes, self.scale[:, gi], self.zero[:, gi])
        elif self.binary is None:
            values = dequantize(self.codes, self.scale[:, None], self.zero[:, None])
        else:
            planes = planes_of(binary_index(self.codes, self.bits), self.bits)
            values = binary_weight(planes, self.binary.alpha, self.binary.beta, axis=0)
        if self.lorc is not None:
            values = values + lowrank_product(self.lorc.u.dequantized(), self.lorc.v.dequantized())
        return values.astype(np.float32)

    def check_extras(self, where: str) -> None:
        """Shapes, ranges and finiteness of the binary code, LoRC factors, groups and folded
        input scale (PlanError naming `where`, e.g. the plan directory, on the first miss)."""
        key, bits, binary, lorc = self.key, self.bits, self.binary, self.lorc
        folded_scale, group_index = self.folded_scale, self.group_index
        rows, cols = self.codes.shape
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
                    f"{where}{key}.group_index must give each of {cols} inputs a group, every "
                    f"group used; {FIX}"
                )
            if binary is not None:
                raise PlanError(f"{where}{key}: binary codes have no groups; {FIX}")
        if binary is not None:
            _check_binary(key, rows, bits, binary, where)
        if lorc is not None:
            for name, factor, length in (("u", lorc.u, rows), ("v", lorc.v, cols)):
                _check_factor(f"{where}{key}.lorc.{name}", factor, length, lorc.rank)

    def extra_json(self) -> dict[str, int]:
        """JSON fields of the entry that say which extra tensors it has."""
        entry = {}
        if self.folded_scale is not None:
            entry["folded_input"] = 1
        if self.group_index is not None:
            entry["groups"] = group_count(self.group_index)
        if self.binary is not None:
            entry["binary_planes"] = self.binary.planes
        if self.lorc is not None:
            entry["lorc_bits"] = self.lorc.u.bits
        return entry

    def extra_tensors(self) -> dict[str, NDArray[Any]]:
        """Tensors of the binary code (`<key>.bcq.*`), LoRC factors (`<key>.lorc.*`), groups
        and the folded input scale (`<key>.folded_scale`)."""
        key = self.key
        out: dict[str, NDArray[Any]] = {}
        if self.folded_scale is not None:
            out[f"{key}.folded_scale"] = np.asarray(self.folded_scale, np.float32)
        if self.group_index is not None:
            out[f"{key}.group_index"] = np.asarray(self.group_index, np.int32)
        if self.binary is not None:
            out[f"{key}.bcq.alpha"] = self.binary.alpha.astype(np.float32)
            out[f"{key}.bcq.beta"] = self.binary.beta.astype(np.float32)
        if self.lorc is not None:
            for name, factor in (("u", self.lorc.u), ("v", self.lorc.v)):
                tensor = f"{key}.lorc.{name}"
                if factor.scale is None or factor.zero is None:
                    out[tensor] = np.asarray(factor.values, np.float32)
                else:
                    out[tensor] = np.asarray(factor.values, np.int8)
                    out[f"{tensor}.scale"] = factor.scale.astype(np.float32)
                    out[f"{tensor}.zero"] = factor.zero.astype(np.int32)
        return out


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
