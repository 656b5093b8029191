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
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from rptq.errors import ConfigError, PlanError
from rptq.plan_weights import (  # re-exported: the weight entry and its parts
    BinaryCode as BinaryCode,
)
from rptq.plan_weights import (
    LowRank as LowRank,
)
from rptq.plan_weights import (
    WeightQuant as WeightQuant,
)
from rptq.plan_weights import (
    binary_from,
    folded_from,
    group_count,
    groups_from,
    lorc_from,
)
from rptq.points import (
    DEFAULT_CLUSTERS,
    KV_ACTS,
    LINEAR_INPUT_ACT,
    LINEAR_INPUT_SITE,
    LINEAR_OUTPUT_SITE,
    QUANTIZED_ACTS,
    REORDERS,
    SITE_OF,
    Act,
    Reorder,
    act_bits,
)
from rptq.quant.clusters import expand_to_channels, is_block_diagonal, is_permutation
from rptq.quant.qparams import grid_bounds
from rptq.quant.trt_weights import DEFAULT_WEIGHT_GROUPS

SCHEMA_VERSION = 1
PLAN_JSON = "plan.json"
PLAN_TENSORS = "tensors.safetensors"
ABITS_CHOICES = (3, 4, 8, 16)


# The with-past graph's cache type (rptq.exporter.options, rptq.passes.kv_cache): the export's
# float type, or the plan's K/V codes in one byte
KvCacheDtype = Literal["float", "int8", "uint8"]
# How the ONNX Runtime target writes a per-cluster (per-axis) activation quantizer (docs/graph.md,
# "ONNX Runtime kernels"): "elementwise" Div -> Round -> Max -> Min -> Mul, which ORT's CPU
# provider runs at per-tensor speed, or the portable per-axis "qdq" QuantizeLinear/DequantizeLinear
# pair that other execution providers consume; both compute the same values. "auto": elementwise
# in float32 exports (the CPU format), qdq in float16 ones (rptq.passes.elementwise_quant).
ActQuantForm = Literal["auto", "elementwise", "qdq"]


class Target(StrEnum):
    """The runtime a graph is exported for, and that a plan's weights are calibrated for.

    Defined once, here: the recipe, the passes, the checker, the exporter and the CLI all use
    it. The plan file and the API spell TensorRT "trt"; the CLI spells it "tensorrt", mapped
    only by `from_cli` and `cli`.
    """

    ORT = "ort"  # ONNX Runtime: per-cluster asymmetric Q/DQ (the default export)
    TRT = "trt"  # TensorRT: the exact variant of docs/tensorrt-rules.md, "Implementation"

    @classmethod
    def from_cli(cls, spelling: str) -> Target:
        """The target a `--target` value names (ort, tensorrt)."""
        return {target.cli: target for target in cls}[spelling]

    @property
    def cli(self) -> str:
        """How the CLI spells this target (`--target ort|tensorrt`)."""
        return "tensorrt" if self is Target.TRT else "ort"


CLI_TARGETS = tuple(target.cli for target in Target)  # argparse choices of --target


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
    target: Target = Target.ORT
    # "trt" only: scale groups of each folded weight (rptq.quant.trt_weights.scale_groups),
    # stored as the weight's group_index; written to plan.json only when "trt", and a "trt"
    # plan without it (rptq before scale groups) was calibrated with one scale per row.
    trt_weight_groups: int = DEFAULT_WEIGHT_GROUPS

    def __post_init__(self) -> None:
        if self.target not in {t.value for t in Target}:
            raise ConfigError(
                f"target {self.target!r} is not supported; use ort or tensorrt (plan: 'trt')"
            )
        object.__setattr__(self, "target", Target(self.target))
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
        if self.trt_weight_groups < 1:
            raise ConfigError(f"--trt-weight-groups must be >= 1, got {self.trt_weight_groups}")
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
        if self.target is Target.TRT and self.weight_group_size:
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
        """Bit width of activation `act` under this recipe (points.act_bits)."""
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
        """Tensor key prefix of this site in the plan file (`layers.3.R1`)."""
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
        """Tensor key prefix of this activation in the plan file (`layers.3.act.q`)."""
        return f"layers.{self.layer}.act.{self.act}"


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
        """The reorder site `point` of decoder layer `layer` (KeyError if absent)."""
        for s in self.sites:
            if s.layer == layer and s.point == point:
                return s
        raise KeyError(f"no site {point} in layer {layer}")

    def act(self, layer: int, act: Act) -> ActQuant | None:
        """Quantization parameters of `act` in decoder layer `layer`, or None if float."""
        for a in self.acts:
            if a.layer == layer and a.act == act:
                return a
        return None

    def weight(self, fqn: str) -> WeightQuant | None:
        """The weight entry of module `fqn`, or None if that weight stays float."""
        for w in self.weights:
            if w.fqn == fqn:
                return w
        return None

    def layers(self) -> list[int]:
        """The decoder layers the plan holds anything for, ascending.

        Passes iterate these rather than range(num_layers): the streamed export
        (rptq.exporter.stream) runs them on one layer's fragment with `for_layer(layer)`.
        """
        layers = {site.layer for site in self.sites} | {quant.layer for quant in self.acts}
        layers |= {quant.layer for quant in self.weights}
        return sorted(layers)

    def for_layer(self, layer: int | None) -> QuantPlan:
        """This plan with only what belongs to decoder layer `layer` (nothing for None)."""
        return replace(
            self,
            sites=tuple(site for site in self.sites if site.layer == layer),
            acts=tuple(quant for quant in self.acts if quant.layer == layer),
            weights=tuple(w for w in self.weights if w.layer == layer),
        )

    def linear_perms(
        self, layer: int, linear: str
    ) -> tuple[NDArray[np.int64] | None, NDArray[np.int64] | None]:
        """(input, output) permutations the fold applies to a linear; None where the plan has
        no site for that reorder point (identity). Every weight pass reads this one mapping."""

        def perm(point: Reorder | None) -> NDArray[np.int64] | None:
            if point is None:
                return None
            try:
                return self.site(layer, point).perm
            except KeyError:
                return None

        return perm(LINEAR_INPUT_SITE.get(linear)), perm(LINEAR_OUTPUT_SITE.get(linear))

    def folded_input_scale(self, layer: int, linear: str) -> NDArray[np.float32] | None:
        """`folded_input_scale` of a linear of decoder layer `layer` (None: input not quantized)."""
        return folded_input_scale(
            [a for a in self.acts if a.layer == layer],
            [s for s in self.sites if s.layer == layer],
            linear,
        )

    def check_target(self, target: Target) -> None:
        """Refuse to export this plan for `target` when its weights are calibrated for the other.

        A plan calibrated for TensorRT (recipe target "trt") holds codes of the folded weights
        W·diag(s), symmetric per channel: the default export folds only permutations and would
        misread them. Weights calibrated for ONNX Runtime stand for W, not for the folded
        W·diag(s) the TensorRT variant multiplies by: plain RTN codes are re-quantized by RTN
        (what RTN would compute anyway), but GPTQ/GPTQT codes, LoRC factors and weight groups
        would lose what calibration optimized, so they need a plan calibrated for TensorRT.
        """
        if target is not Target.TRT:
            if self.recipe.target is Target.TRT:
                raise ConfigError(
                    "plan was calibrated for --target tensorrt (weights folded with activation "
                    "scales); export it with --target tensorrt, or recalibrate with --target ort"
                )
            return
        if self.recipe.target is Target.TRT or not self.weights:
            return
        method = self.recipe.weight_method
        extras = [
            what
            for what, present in (
                ("GPTQT binary planes", any(w.binary is not None for w in self.weights)),
                ("LoRC branches", any(w.lorc is not None for w in self.weights)),
                ("weight groups", any(w.group_index is not None for w in self.weights)),
            )
            if present
        ]
        if method is not WeightMethod.RTN or extras:
            what = ", ".join([f"{method} weights", *extras])
            raise ConfigError(
                f"plan was calibrated for ONNX Runtime ({what}), which the TensorRT variant "
                "would re-quantize; recalibrate with --target tensorrt, or export with --target ort"
            )

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
            tensors.update(w.extra_tensors())
        # safetensors writes an array's memory as is: a Fortran-ordered one would load transposed
        tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        index = {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in tensors.items()}
        return tensors, index

    def _json(self, index: dict[str, Any]) -> dict[str, Any]:
        recipe = asdict(self.recipe)
        recipe["granularity"] = str(self.recipe.granularity)
        recipe["act_metric"] = str(self.recipe.act_metric)
        recipe["weight_method"] = str(self.recipe.weight_method)
        recipe["target"] = str(self.recipe.target)
        if self.recipe.target is Target.ORT:
            del recipe["target"]  # optional field: ORT plans stay readable by older rptq
            del recipe["trt_weight_groups"]  # says how folded weights were grouped: "trt" only
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
                    **w.extra_json(),
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


def folded_input_scale(
    acts: Iterable[ActQuant], sites: Iterable[ReorderSite], linear: str
) -> NDArray[np.float32] | None:
    """Per-channel scale c (model channel order) of the quantized activation `linear` reads,
    from one layer's activations and sites; None when that activation is not quantized.

    The TensorRT variant folds c into the linear's weight (W·diag(c)): calibration for it
    quantizes that weight (rptq.calib.trt_domain), its PyTorch reference divides by c
    (rptq.runtime.trt_reference), and the export folds the same float32 vector in graph order
    (rptq.passes.tensorrt.acts.act_vectors, c permuted by the site).
    """
    act = LINEAR_INPUT_ACT[linear]
    quant = next((a for a in acts if a.act == act), None)
    if quant is None:
        return None
    point = SITE_OF[act]
    site = next(s for s in sites if s.point == point)
    return expand_to_channels(quant.scale.astype(np.float32), site.perm, site.sizes)


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
        expected = (rows,) if w.group_index is None else (rows, group_count(w.group_index))
        if w.scale.shape != expected or w.zero.shape != expected:
            raise PlanError(f"{where}: {w.key} scale/zero do not match {rows} rows; {fix}")
        if w.codes.size and (int(w.codes.min()) < qmin or int(w.codes.max()) > qmax):
            raise PlanError(f"{where}: {w.key}.codes leave the {w.bits}-bit grid; {fix}")
        _check_scale(w.scale, f"{where}: {w.key}.scale")
        if w.layer >= plan.model.shape["num_layers"]:
            raise PlanError(
                f"{where}: plan weight {w.fqn} is not one of the six linears of an OPT decoder "
                "layer"
            )
        w.check_extras(f"{where}: ")
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
            f"{json_file} has schema version {version}; this rptq reads version {SCHEMA_VERSION}: "
            "recalibrate with this rptq, or use the rptq that wrote the plan"
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
    fields = dict(meta["recipe"])
    if fields.get("target") == Target.TRT.value:
        fields.setdefault("trt_weight_groups", 1)  # calibrated before scale groups existed
    recipe = Recipe(**fields)
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
