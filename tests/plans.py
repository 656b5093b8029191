"""Random but valid QuantPlans for tests, without running calibration.

Permutations are random (block-diagonal per head for R2/R3, as the attention reshape demands),
cluster sizes are random compositions of the channel count (inside each head for R2/R3),
activation scales/zeros are random positive/integer values, and weight codes are RTN codes of
the model's real weights (`quantize_rows`), so the weight pass's closeness check holds. Every
plan passes `validate_plan`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict

import numpy as np
from numpy.typing import NDArray

from rptq import names
from rptq.model.shape import OptShape
from rptq.plan import ActQuant, ModelRef, QuantPlan, Recipe, ReorderSite, WeightQuant, validate_plan
from rptq.points import LINEARS, REORDERS, SITE_OF, Act, Reorder
from rptq.quant.qparams import grid_bounds, quantize_rows

PROBS_SCALE = np.float32(1 / 255)  # RPTQ's fixed [0, 1] grid for softmax output
PROBS_ZERO = -128  # round(255 P) - 128 spans the signed 8-bit grid


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
