"""Random but valid QuantPlans for tests, without running calibration.

Permutations are random (block-diagonal per head for R2/R3, as the attention reshape demands),
cluster sizes are random compositions of the channel count (inside each head for R2/R3),
activation scales/zeros are random positive/integer values, and weight codes are RTN codes of
the model's real weights (`quantize_rows`), so the weight pass's closeness check holds. Every
plan passes `validate_plan`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict

import numpy as np
from numpy.typing import NDArray

from rptq import names
from rptq.model.shape import OptShape
from rptq.plan import (
    ActQuant,
    ModelRef,
    QuantPlan,
    Recipe,
    ReorderSite,
    WeightMethod,
    WeightQuant,
    validate_plan,
)
from rptq.plan_weights import BinaryCode, LowRank, LowRankFactor
from rptq.points import (
    LINEAR_INPUT_SITE,
    LINEARS,
    REORDERS,
    SITE_OF,
    Act,
    Reorder,
)
from rptq.quant.qparams import grid_bounds, quantize_rows
from rptq.quant.trt_weights import fold_input_scale, symmetric_codes, symmetric_scale

PROBS_SCALE = np.float32(1 / 255)  # RPTQ's fixed [0, 1] grid for softmax output
PROBS_ZERO = -128  # round(255 P) - 128 spans the signed 8-bit grid
LORC_RANK = 4
GROUP_SIZE = 16


def random_sizes(rng: np.random.Generator, width: int, max_clusters: int) -> NDArray[np.int64]:
    """A random composition of `width` into 1..max_clusters positive parts."""
    k = int(rng.integers(1, min(width, max_clusters) + 1))
    cuts = np.sort(rng.choice(np.arange(1, width), size=k - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [width]])).astype(np.int64)


def random_site(
    rng: np.random.Generator, shape: OptShape, layer: int, point: Reorder, max_clusters: int = 8
) -> ReorderSite:
    """A random permutation and cluster sizes for one reorder point."""
    spec = REORDERS[point]
    width = shape.width(spec.width)
    if spec.per_head:
        hd = shape.head_dim
        perm = np.concatenate([h * hd + rng.permutation(hd) for h in range(shape.num_heads)])
        sizes = np.concatenate(
            [random_sizes(rng, hd, max_clusters) for _ in range(shape.num_heads)]
        )
    else:
        perm = rng.permutation(width)
        sizes = random_sizes(rng, width, max_clusters)
    return ReorderSite(layer, point, perm.astype(np.int64), sizes.astype(np.int64))


def identity_site(shape: OptShape, layer: int, point: Reorder) -> ReorderSite:
    """The identity permutation with one cluster per head (R2/R3) or per tensor."""
    spec = REORDERS[point]
    width = shape.width(spec.width)
    groups = shape.num_heads if spec.per_head else 1
    sizes = np.full(groups, width // groups, dtype=np.int64)
    return ReorderSite(layer, point, np.arange(width, dtype=np.int64), sizes)


def random_act(
    rng: np.random.Generator, layer: int, act: Act, bits: int, clusters: int, wide_zero: bool
) -> ActQuant:
    """Random positive scales and zero points inside the grid (or beyond int8 if wide_zero)."""
    if act is Act.ATTN_PROBS:
        return ActQuant(
            layer, act, bits, np.full(1, PROBS_SCALE, np.float32), np.full(1, PROBS_ZERO, np.int32)
        )
    qmin, qmax = grid_bounds(bits)
    scale = rng.uniform(0.005, 0.05, clusters).astype(np.float32)
    zero = rng.integers(qmin // 2, qmax // 2 + 1, clusters).astype(np.int32)
    if wide_zero:
        zero[0] = 200  # outside int8: forces the int16 container (RPTQ's z can leave the grid)
    return ActQuant(layer, act, bits, scale, zero)


def random_plan(
    shape: OptShape,
    weights: Mapping[str, NDArray[np.floating]] | None = None,
    *,
    wbits: int = 4,
    abits: int = 4,
    only_quant_kv: bool = False,
    seed: int = 0,
    points: Iterable[Reorder] = tuple(Reorder),
    identity: bool = False,
    wide_zero_acts: Iterable[Act] = (),
    max_clusters: int = 8,
) -> QuantPlan:
    """A valid plan for a model of `shape`.

    `weights` maps Hugging Face names (`model.decoder.layers.0.fc1.weight`, [out, in]) to arrays
    and is needed when wbits < 16. `points` limits the reorder sites; `identity` makes every
    permutation the identity; activations in `wide_zero_acts` get a zero point beyond int8.
    """
    rng = np.random.default_rng(seed)
    recipe = Recipe(wbits=wbits, abits=abits, only_quant_kv=only_quant_kv)
    points = tuple(points)
    wide = frozenset(wide_zero_acts)
    sites: list[ReorderSite] = []
    acts: list[ActQuant] = []
    quants: list[WeightQuant] = []
    for layer in range(shape.num_layers):
        for point in points:
            if identity:
                sites.append(identity_site(shape, layer, point))
            else:
                sites.append(random_site(rng, shape, layer, point, max_clusters))
        by_point = {s.point: s for s in sites if s.layer == layer}
        for act in recipe.quantized_acts:
            site = by_point.get(SITE_OF[act]) if act in SITE_OF else None
            if act in SITE_OF and site is None:
                continue  # that point is not in the plan: no per-cluster parameters for it
            clusters = 1 if site is None else site.sizes.shape[0]
            acts.append(random_act(rng, layer, act, recipe.bits_of(act), clusters, act in wide))
        if wbits < 16:
            assert weights is not None, "weights are needed to quantize them"
            for linear in LINEARS:
                fqn = names.module(layer, linear)
                codes, scale, zero = quantize_rows(np.asarray(weights[names.weight(fqn)]), wbits)
                quants.append(WeightQuant(fqn, wbits, codes, scale, zero))
    plan = QuantPlan(
        model=ModelRef("tiny-opt", shape.config_hash(), asdict(shape)),
        recipe=recipe,
        sites=tuple(sites),
        acts=tuple(acts),
        weights=tuple(quants),
        provenance={"test": "tests/plans.py"},
    )
    validate_plan(plan, "tests/plans.py")
    return plan


def _seeded(label: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(label.encode()).digest()[:4]))


def _hf_weight(loaded, fqn: str) -> NDArray[np.float32]:
    return np.asarray(loaded.weights.get(names.weight(fqn)).float().numpy(), np.float32)


def _with_recipe(plan: QuantPlan, weights, **recipe) -> QuantPlan:
    out = dataclasses.replace(
        plan, recipe=dataclasses.replace(plan.recipe, **recipe), weights=tuple(weights)
    )
    validate_plan(out, "test_export_hashes")
    return out


def _binary(quant: WeightQuant) -> WeightQuant:
    """A GPTQT-style entry that spells the RTN grid exactly as binary planes.

    Index k = c + 2^(n-1) of code c; value s(c - z) = Σ s·2^(i-1) b_i + s(-1/2 - z).
    """
    n = quant.bits
    alpha = quant.scale[:, None] * (2.0 ** (np.arange(n) - 1))[None, :]
    beta = quant.scale * (-0.5 - quant.zero.astype(np.float32))
    binary = BinaryCode(alpha.astype(np.float32), beta.astype(np.float32))
    return dataclasses.replace(quant, binary=binary)


def _lorc(quant: WeightQuant, bits: int) -> WeightQuant:
    rng = _seeded(f"lorc {quant.fqn} {bits}")
    rows, cols = quant.codes.shape

    def factor(length: int) -> LowRankFactor:
        values = rng.normal(0.0, 0.05, (length, LORC_RANK)).astype(np.float32)
        if bits == 16:
            return LowRankFactor(16, values)
        codes = rng.integers(-128, 128, (length, LORC_RANK)).astype(np.int8)
        scale = rng.uniform(1e-4, 4e-4, length).astype(np.float32)
        zero = rng.integers(-8, 8, length).astype(np.int32)
        return LowRankFactor(8, codes, scale, zero)

    return dataclasses.replace(quant, lorc=LowRank(factor(rows), factor(cols)))


def _grouped(loaded, plan: QuantPlan, quant: WeightQuant) -> WeightQuant:
    """Blocks of GROUP_SIZE input channels in graph order, each with its own RTN grid."""
    point = LINEAR_INPUT_SITE.get(quant.linear)
    cols = quant.codes.shape[1]
    perm = np.arange(cols) if point is None else plan.site(quant.layer, point).perm
    group_index = np.empty(cols, np.int32)
    group_index[perm] = np.arange(cols) // GROUP_SIZE
    weight = _hf_weight(loaded, quant.fqn)
    groups = cols // GROUP_SIZE
    codes = np.empty_like(quant.codes)
    scale = np.empty((weight.shape[0], groups), np.float32)
    zero = np.empty((weight.shape[0], groups), np.int32)
    for g in range(groups):
        members = group_index == g
        codes[:, members], scale[:, g], zero[:, g] = quantize_rows(weight[:, members], quant.bits)
    return dataclasses.replace(quant, codes=codes, scale=scale, zero=zero, group_index=group_index)


def _trt_calibrated(loaded, plan: QuantPlan, quant: WeightQuant) -> WeightQuant:
    """Symmetric codes of W·diag(c), c the linear's folded input scale (plan_weights)."""
    scale_in = plan.folded_input_scale(quant.layer, quant.linear)
    if scale_in is None:
        return quant
    folded = fold_input_scale(_hf_weight(loaded, quant.fqn), scale_in)
    scale = symmetric_scale(folded, quant.bits)
    codes = symmetric_codes(folded, scale, quant.bits)
    return dataclasses.replace(
        quant, codes=codes, scale=scale, zero=np.zeros_like(quant.zero), folded_scale=scale_in
    )


def stand_in_plans(loaded) -> dict[str, QuantPlan | None]:
    """Plans for every recipe family, built elementwise with numpy (no calibration, no BLAS).

    The same bytes on any machine and thread count: seeded random sites and activations, RTN
    codes of the model's weights, and stand-ins for the other methods that have their entry
    layout and export path (GPTQ: RTN codes under the gptq method; GPTQT: the RTN grid spelled
    as binary planes; LoRC: small seeded factors; groups: RTN per block of input channels in
    graph order; TensorRT-calibrated: symmetric codes of W·diag(c)).
    """
    weights = {k: loaded.weights.get(k).float().numpy() for k in loaded.weights.names()}
    shape = loaded.shape

    def base(wbits: int, abits: int, kv: bool = False, seed: int = 0) -> QuantPlan:
        return random_plan(shape, weights, wbits=wbits, abits=abits, only_quant_kv=kv, seed=seed)

    w4a4, w3a4 = base(4, 4), base(3, 4, seed=1)
    gptq = WeightMethod.GPTQ
    gptqt = WeightMethod.GPTQT
    return {
        "FP": None,
        "W4A8": base(4, 8),
        "W4A4": w4a4,
        "W4A4KV": base(4, 4, kv=True),
        "W3A3KV": base(3, 3, kv=True),
        "W4A16": base(4, 16),
        "GPTQ": _with_recipe(w4a4, w4a4.weights, weight_method=gptq),
        "GPTQT": _with_recipe(w3a4, map(_binary, w3a4.weights), weight_method=gptqt),
        "LoRC": _with_recipe(
            w4a4, [_lorc(w, 16) for w in w4a4.weights], lorc_rank=LORC_RANK, lorc_bits=16
        ),
        "GPTQT-LoRC8": _with_recipe(
            w3a4,
            [_lorc(_binary(w), 8) for w in w3a4.weights],
            weight_method=gptqt,
            lorc_rank=LORC_RANK,
            lorc_bits=8,
        ),
        "W4A4-groups": _with_recipe(
            w4a4,
            [_grouped(loaded, w4a4, w) for w in w4a4.weights],
            weight_group_size=GROUP_SIZE,
        ),
        "W4A4-trt-calibrated": _with_recipe(
            w4a4, [_trt_calibrated(loaded, w4a4, w) for w in w4a4.weights], target="trt"
        ),
    }
