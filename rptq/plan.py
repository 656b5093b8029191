"""The quantization plan: the versioned contract between calibration and export.

On disk a plan is a directory holding `plan.json` (every scalar, plus an index of tensor key ->
dtype and shape) and `tensors.safetensors` (permutations, cluster sizes, scales, zero points,
weight codes). No pickles. `QuantPlan.load` validates everything it reads, so export can trust a
loaded plan: permutations are permutations, cluster sizes sum to the channel count, per-head
clusters stay inside their head, scales are finite and positive, codes lie on their grid, and
the plan matches the model it is used with.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from rptq.errors import ConfigError, PlanError
from rptq.plan_weights import (
    BinaryCode,
    LowRank,
    binary_from,
    check_weight_extras,
    extra_json,
    extra_tensors,
    folded_from,
    group_count,
    groups_from,
    lorc_from,
    weight_values,
)
from rptq.points import (
    DEFAULT_CLUSTERS,
    KV_ACTS,
    QUANTIZED_ACTS,
    REORDERS,
    SITE_OF,
    Act,
    Reorder,
    act_bits,
)
from rptq.quant.clusters import is_block_diagonal, is_permutation
from rptq.quant.qparams import grid_bounds

SCHEMA_VERSION = 1
PLAN_JSON = "plan.json"
PLAN_TENSORS = "tensors.safetensors"
ABITS_CHOICES = (3, 4, 8, 16)
TARGETS = ("ort", "trt")  # the runtime a plan's weights are calibrated for (CLI: ort, tensorrt)


class Granularity(StrEnum):
    """How activation channels share quantization parameters."""

    TENSOR = "tensor"  # one (scale, zero) per tensor: the baseline RPTQ improves on
    CLUSTER = "cluster"  # RPTQ: k-means clusters of channels with similar ranges
    CHANNEL = "channel"  # one per channel: the upper bound clustering approaches


class WeightMethod(StrEnum):
    """How linear weights are quantized (docs/algorithms.md §2.8, §3, §5)."""

    RTN = "rtn"  # round to nearest on RPTQ's per-row grid
    GPTQ = "gptq"  # GPTQ column sweep with Hessian error feedback, same grid
    GPTQT = "gptqt"  # GPTQ at wbits + 1, then re-coded as wbits binary planes (BCQ)


LORC_BITS_CHOICES = (8, 16)  # LoRC factors: int8 per row, or float


class ActMetric(StrEnum):
    """How per-row activation ranges combine across calibration rows."""

    EMA_MINMAX = "ema_minmax"  # RPTQ's published default: 0.99 EMA of per-row cluster extremes
    MINMAX = "minmax"  # global extremes
    MSE = "mse"  # per cluster, the clipped range with the least quantization MSE (histogram)
    PERCENTILE = "percentile"  # per cluster, clipped at the 0.01 % and 99.99 % points


@dataclass(frozen=True, slots=True)
class Recipe:
    """Everything the user chose for one calibration run."""

    wbits: int = 4
    abits: int = 16
    only_quant_kv: bool = False
    clusters: dict[str, int] = field(
        default_factory=lambda: {str(k): v for k, v in DEFAULT_CLUSTERS.items()}
    )
    granularity: Granularity = Granularity.CLUSTER
    act_metric: ActMetric = ActMetric.MSE  # measured best (bench/RESULTS.md, act-metrics)
    weight_method: WeightMethod = WeightMethod.RTN
    calib_dataset: str = "wikitext2"
    nsamples: int = 128
    seq_len: int = 2048
    seed: int = 2
    lorc_rank: int = 0  # LoRC rank R of the weight-error correction; 0 = none
    lorc_bits: int = 16  # LoRC factors in float (16) or int8 per row (8)
    gptq_percdamp: float = 0.01  # GPTQ dampening, a fraction of mean(diag(H))
    gptq_block_size: int = 128  # GPTQ lazy-batch width (columns updated together)
    act_order: bool = False  # GPTQ visits columns by decreasing Hessian diagonal
    weight_group_size: int = 0  # input channels per weight scale (graph order); 0 = per row
    # "trt": weights are quantized as the TensorRT variant's graph holds them (activation
    # scales folded into their input channels, symmetric codes; plan_weights, "Folded input
    # scale"). Written to plan.json only when "trt", so plans without it load as "ort".
    target: str = "ort"

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ConfigError(
                f"target {self.target!r} is not supported; use ort or tensorrt (plan: 'trt')"
            )
        if not (2 <= self.wbits <= 8 or self.wbits == 16):
            raise ConfigError(f"--wbits {self.wbits} is not supported; use 2..8, or 16 for float")
        if self.abits not in ABITS_CHOICES:
            raise ConfigError(
                f"--abits {self.abits} is not supported; use one of 3, 4, 8, or 16 for float"
            )
        if set(self.clusters) != {str(r) for r in Reorder}:
            raise ConfigError(f"clusters must name R1..R5 exactly, got {sorted(self.clusters)}")
        for point, count in self.clusters.items():
            if count < 1:
                raise ConfigError(f"--clusters for {point} must be >= 1, got {count}")
        self._check_weight_method()
        if self.nsamples < 1 or self.seq_len < 2:
            raise ConfigError("--nsamples must be >= 1 and --seq-len >= 2")
        object.__setattr__(self, "granularity", Granularity(self.granularity))
        object.__setattr__(self, "act_metric", ActMetric(self.act_metric))

    def _check_weight_method(self) -> None:
        choices = ", ".join(m.value for m in WeightMethod)
        if self.weight_method not in {m.value for m in WeightMethod}:
            raise ConfigError(
                f"--weight-method {self.weight_method} is not supported; use one of {choices}"
            )
        object.__setattr__(self, "weight_method", WeightMethod(self.weight_method))
        if self.weight_method is WeightMethod.GPTQT and not 2 <= self.wbits <= 7:
            raise ConfigError(
                f"--weight-method gptqt needs --wbits 2..7 (it quantizes to wbits + 1 first), "
                f"got {self.wbits}"
            )
        if self.lorc_rank < 0:
            raise ConfigError(f"--lorc-rank must be >= 0, got {self.lorc_rank}")
        if self.lorc_rank and self.wbits >= 16:
            raise ConfigError("--lorc-rank needs quantized weights (--wbits below 16)")
        if self.lorc_bits not in LORC_BITS_CHOICES:
            raise ConfigError(f"--lorc-bits must be 8 or 16, got {self.lorc_bits}")
        if not 0 < self.gptq_percdamp <= 1:
            raise ConfigError(f"GPTQ dampening must be in (0, 1], got {self.gptq_percdamp}")
        if self.gptq_block_size < 1:
            raise ConfigError(f"GPTQ block size must be >= 1, got {self.gptq_block_size}")
        if self.act_order and self.weight_method is WeightMethod.RTN:
            raise ConfigError("--act-order needs --weight-method gptq or gptqt")
        if self.weight_group_size < 0:
            raise ConfigError(f"--weight-group-size must be >= 0, got {self.weight_group_size}")
        if self.target == "trt" and self.weight_group_size:
            raise ConfigError(
                "--weight-group-size is not supported with --target tensorrt (TensorRT takes "
                "per-channel INT8 weights; its INT4 blocks repeat per-channel scales); "
                "calibrate with --weight-group-size 0, or use --target ort"
            )
        if self.weight_group_size and self.weight_method is WeightMethod.GPTQT:
            raise ConfigError(
                "--weight-group-size is not supported with --weight-method gptqt (its binary "
                "planes carry one scale per row); use rtn or gptq"
            )

    @property
    def quantized_acts(self) -> tuple[Act, ...]:
        """Activations this recipe quantizes (none at 16 bits)."""
        if self.abits >= 16:
            return ()
        return KV_ACTS if self.only_quant_kv else QUANTIZED_ACTS

    def bits_of(self, act: Act) -> int:
        return act_bits(act, self.abits)

    def label(self) -> str:
        """Paper-style label such as W4A4, W4A4KV or W4A16."""
        kv = "KV" if self.only_quant_kv and self.abits < 16 else ""
        return f"W{self.wbits}A{self.abits}{kv}"


@dataclass(frozen=True, slots=True)
class ReorderSite:
    """One reorder point of one layer: the channel permutation and its cluster sizes."""

    layer: int
    point: Reorder
    perm: NDArray[np.int64]
    sizes: NDArray[np.int64]

    @property
    def key(self) -> str:
        return f"layers.{self.layer}.{self.point}"


@dataclass(frozen=True, slots=True)
class ActQuant:
    """Per-cluster quantization parameters of one activation (cluster order of its site)."""

    layer: int
    act: Act
    bits: int
    scale: NDArray[np.float32]
    zero: NDArray[np.int32]

    @property
    def key(self) -> str:
        return f"layers.{self.layer}.act.{self.act}"


@dataclass(frozen=True, slots=True)
class WeightQuant:
    """Integer codes of one linear weight [out, in] (Hugging Face layout), per-row scale/zero.

    `binary` (GPTQT) replaces the linear dequantization by binary planes; `lorc` adds a
    low-rank correction. Either is None for plain RTN/GPTQ codes. With `group_index`, scale
    and zero are [out, groups] and input channel j uses column group_index[j] (groups are
    contiguous blocks in the exported graph's channel order, see plan_weights). With
    `folded_scale` (plans calibrated for TensorRT) everything above stands for W·diag(c),
    c = folded_scale, with symmetric codes (zero 0) unless binary.
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

    @property
    def key(self) -> str:
        return self.fqn

    def values(self) -> NDArray[np.float32]:
        """The float weight [out, in] this entry stands for (what the reference multiplies by),
        in the model's own domain (a folded input scale divided back out)."""
        return weight_values(
            self.codes,
            self.scale,
            self.zero,
            self.bits,
            self.binary,
            self.lorc,
            self.group_index,
            self.folded_scale,
        )

    def folded_values(self) -> NDArray[np.float32]:
        """The weight [out, in] as the TensorRT variant's graph holds it: W·diag(folded_scale),
        or values() when nothing was folded in."""
        return weight_values(
            self.codes, self.scale, self.zero, self.bits, self.binary, self.lorc, self.group_index
        )


@dataclass(frozen=True)
class ModelRef:
    """Which model a plan belongs to."""

    name: str
    config_hash: str
    shape: dict[str, int]


@dataclass(frozen=True)
class QuantPlan:
    """A complete, validated quantization plan."""

    model: ModelRef
    recipe: Recipe
    sites: tuple[ReorderSite, ...]
    acts: tuple[ActQuant, ...]
    weights: tuple[WeightQuant, ...]
    provenance: dict[str, str]
    schema_version: int = SCHEMA_VERSION

    def site(self, layer: int, point: Reorder) -> ReorderSite:
        for s in self.sites:
            if s.layer == layer and s.point == point:
                return s
        raise KeyError(f"no site {point} in layer {layer}")

    def act(self, layer: int, act: Act) -> ActQuant | None:
        for a in self.acts:
            if a.layer == layer and a.act == act:
                return a
        return None

    def weight(self, fqn: str) -> WeightQuant | None:
        for w in self.weights:
            if w.fqn == fqn:
                return w
        return None

    def save(self, directory: Path, force: bool = False) -> None:
        """Write atomically: a temporary sibling directory renamed into place."""
        from safetensors.numpy import save_file

        from rptq.io import atomic_directory

        tensors, index = self._tensors()
        with atomic_directory(Path(directory), force=force) as tmp:
            save_file(tensors, str(tmp / PLAN_TENSORS))
            (tmp / PLAN_JSON).write_text(json.dumps(self._json(index), indent=1, sort_keys=True))

    def _tensors(self) -> tuple[dict[str, NDArray[Any]], dict[str, Any]]:
        tensors: dict[str, NDArray[Any]] = {}
        for s in self.sites:
            tensors[f"{s.key}.perm"] = s.perm.astype(np.int64)
            tensors[f"{s.key}.sizes"] = s.sizes.astype(np.int64)
        for a in self.acts:
            tensors[f"{a.key}.scale"] = a.scale.astype(np.float32)
            tensors[f"{a.key}.zero"] = a.zero.astype(np.int32)
        for w in self.weights:
            tensors[f"{w.key}.codes"] = w.codes.astype(np.int8)
            tensors[f"{w.key}.scale"] = w.scale.astype(np.float32)
            tensors[f"{w.key}.zero"] = w.zero.astype(np.int32)
            tensors.update(extra_tensors(w.key, w.binary, w.lorc, w.group_index, w.folded_scale))
        # safetensors writes an array's memory as is: a Fortran-ordered one would load transposed
        tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        index = {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in tensors.items()}
        return tensors, index

    def _json(self, index: dict[str, Any]) -> dict[str, Any]:
        recipe = asdict(self.recipe)
        recipe["granularity"] = str(self.recipe.granularity)
        recipe["act_metric"] = str(self.recipe.act_metric)
        recipe["weight_method"] = str(self.recipe.weight_method)
        if self.recipe.target == "ort":
            del recipe["target"]  # optional field: ORT plans stay readable by older rptq
        return {
            "schema_version": self.schema_version,
            "model": asdict(self.model),
            "recipe": recipe,
            "sites": [{"layer": s.layer, "point": str(s.point)} for s in self.sites],
            "acts": [{"layer": a.layer, "act": str(a.act), "bits": a.bits} for a in self.acts],
            "weights": [
                {
                    "fqn": w.fqn,
                    "bits": w.bits,
                    **extra_json(w.binary, w.lorc, w.group_index, w.folded_scale),
                }
                for w in self.weights
            ],
            "provenance": self.provenance,
            "tensor_index": index,
        }

    @classmethod
    def load(cls, directory: Path, expect_hash: str | None = None) -> QuantPlan:
        """Read and validate a plan; `expect_hash` is the config hash of the model it must fit."""
        return read_plan(Path(directory), expect_hash)


def validate_plan(plan: QuantPlan, where: str) -> None:
    """Check every structural invariant; raise PlanError with a one-line fix on the first miss."""
    shape = plan.model.shape
    hidden, ffn = shape["hidden_size"], shape["ffn_dim"]
    head_dim = hidden // shape["num_heads"]
    fix = "recalibrate with `rptq-export calibrate`"
    for s in plan.sites:
        width = ffn if REORDERS[s.point].width == "ffn" else hidden
        if not is_permutation(s.perm, width):
            raise PlanError(
                f"{where}: {s.key}.perm is not a permutation of {width} channels; {fix}"
            )
        if s.sizes.ndim != 1 or s.sizes.min(initial=1) < 1 or int(s.sizes.sum()) != width:
            raise PlanError(
                f"{where}: {s.key}.sizes must be positive and sum to {width}, got sum "
                f"{int(s.sizes.sum())}; {fix}"
            )
        # The permutation must keep each channel in its head (the attention reshape assigns
        # channel c to head c // head_dim). A cluster may still span heads: per-tensor
        # quantization of q/k/v is one cluster over all of them, which is exact.
        if REORDERS[s.point].per_head and not is_block_diagonal(s.perm, head_dim):
            raise PlanError(f"{where}: {s.key} moves channels across heads; {fix}")
    for a in plan.acts:
        n = plan.site(a.layer, SITE_OF[a.act]).sizes.shape[0] if a.act in SITE_OF else 1
        if a.scale.shape != (n,) or a.zero.shape != (n,):
            raise PlanError(
                f"{where}: {a.key} has {a.scale.shape[0]} scales for {n} clusters; {fix}"
            )
        _check_scale(a.scale, f"{where}: {a.key}.scale")
        grid_bounds(a.bits)
    for w in plan.weights:
        qmin, qmax = grid_bounds(w.bits)
        rows = w.codes.shape[0]
        shape = (rows,) if w.group_index is None else (rows, group_count(w.group_index))
        if w.scale.shape != shape or w.zero.shape != shape:
            raise PlanError(f"{where}: {w.key} scale/zero do not match {rows} rows; {fix}")
        if w.codes.size and (int(w.codes.min()) < qmin or int(w.codes.max()) > qmax):
            raise PlanError(f"{where}: {w.key}.codes leave the {w.bits}-bit grid; {fix}")
        _check_scale(w.scale, f"{where}: {w.key}.scale")
        check_weight_extras(
            w.key,
            w.codes.shape,
            w.bits,
            w.binary,
            w.lorc,
            f"{where}: ",
            w.group_index,
            w.folded_scale,
        )
        if w.folded_scale is not None and w.binary is None and np.any(w.zero != 0):
            raise PlanError(f"{where}: {w.key} is folded for TensorRT but not symmetric; {fix}")


def _check_scale(scale: NDArray[np.float32], what: str) -> None:
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        raise PlanError(f"{what} has non-finite or non-positive values; recalibrate")


def default_provenance() -> dict[str, str]:
    """Versions of the tools that made a plan (for bug reports, not for validation)."""
    import importlib.metadata as md

    out = {}
    for pkg in ("rptq", "torch", "transformers", "scikit-learn", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "absent"
    out["python"] = platform.python_version()
    return out


def read_plan(directory: Path, expect_hash: str | None) -> QuantPlan:
    """Load `plan.json` + `tensors.safetensors`; every failure is a one-line PlanError."""
    json_file, tensor_file = directory / PLAN_JSON, directory / PLAN_TENSORS
    if not directory.is_dir() or not json_file.exists() or not tensor_file.exists():
        raise PlanError(
            f"{directory} is not a plan directory (expected {PLAN_JSON} and {PLAN_TENSORS}); "
            "make one with `rptq-export calibrate`"
        )
    try:
        meta = json.loads(json_file.read_text())
    except json.JSONDecodeError as exc:
        raise PlanError(f"{json_file} is not valid JSON ({exc.msg}); recalibrate") from None
    version = meta.get("schema_version") if isinstance(meta, dict) else None
    if version != SCHEMA_VERSION:
        raise PlanError(
            f"{json_file} has schema version {version}; this rptq reads version {SCHEMA_VERSION}"
        )
    try:
        from safetensors.numpy import load_file

        tensors = load_file(str(tensor_file))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise PlanError(
            f"{tensor_file} is unreadable ({type(exc).__name__}); recalibrate"
        ) from None
    for key, info in meta.get("tensor_index", {}).items():
        got = tensors.get(key)
        if got is None or str(got.dtype) != info["dtype"] or list(got.shape) != info["shape"]:
            raise PlanError(f"{tensor_file}: tensor {key} is missing or has the wrong dtype/shape")
    try:
        plan = _plan_from(meta, tensors)
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise PlanError(
            f"{json_file} is malformed ({type(exc).__name__}: {exc}); recalibrate"
        ) from None
    if expect_hash is not None and plan.model.config_hash != expect_hash:
        raise PlanError(
            f"plan {directory} was made for model {plan.model.name} "
            f"({_describe(plan.model.shape)}), which does not match this model; "
            "calibrate a plan for this model"
        )
    validate_plan(plan, str(directory))
    return plan


def _describe(shape: dict[str, int]) -> str:
    return f"{shape['num_layers']} layers, hidden {shape['hidden_size']}"


def _plan_from(meta: dict[str, Any], tensors: dict[str, NDArray[Any]]) -> QuantPlan:
    recipe = Recipe(**meta["recipe"])
    sites = tuple(
        ReorderSite(
            int(s["layer"]),
            Reorder(s["point"]),
            tensors[f"layers.{s['layer']}.{s['point']}.perm"],
            tensors[f"layers.{s['layer']}.{s['point']}.sizes"],
        )
        for s in meta["sites"]
    )
    acts = tuple(
        ActQuant(
            int(a["layer"]),
            Act(a["act"]),
            int(a["bits"]),
            tensors[f"layers.{a['layer']}.act.{a['act']}.scale"],
            tensors[f"layers.{a['layer']}.act.{a['act']}.zero"],
        )
        for a in meta["acts"]
    )
    weights = tuple(
        WeightQuant(
            w["fqn"],
            int(w["bits"]),
            tensors[f"{w['fqn']}.codes"],
            tensors[f"{w['fqn']}.scale"],
            tensors[f"{w['fqn']}.zero"],
            binary_from(w, tensors),
            lorc_from(w, tensors),
            groups_from(w, tensors),
            folded_from(w, tensors),
        )
        for w in meta["weights"]
    )
    model = ModelRef(**meta["model"])
    return QuantPlan(model, recipe, sites, acts, weights, dict(meta["provenance"]))
