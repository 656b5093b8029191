"""The layer-wise calibration loop (GPTQ's opt_sequential pattern, RPTQ's per-layer steps).

Only one decoder layer is held in fp32 at a time, plus the calibration activations [N, T, d]
entering it; each row is pushed through the layer on its own. Per layer (RPTQ section 2.2):

1. statistics pass on the float layer: global per-channel (max, min) at R1..R5;
2. clustering: KMeans per reorder point -> permutation and cluster sizes;
3. activation calibration pass (float layer): per-cluster ranges -> scales and zero points,
   and (GPTQ/GPTQT) the Hessians of the six linears' inputs;
4. weights: RTN, GPTQ or GPTQT codes per output row, optionally LoRC (calib/weight_methods.py),
   for `--target tensorrt` on the weights as its graph holds them (calib/trt_domain.py);
5. output pass with fake-quantized weights and activations: the next layer's inputs.

So activation ranges of layer i are measured inside the float layer i, on the quantized outputs
of layers 0..i-1, as in RPTQ.

`device` may list several devices (`cuda:0,cuda:1`, `cuda:all`; `cpu,cpu` for tests): the windows
are then split into contiguous shards, one per device, each pass runs on all of them at once and
the statistics are merged so that the plan is the single-device plan (calib/shards.py; GPTQ's
Hessians up to float rounding). The windows are split rather than the layers placed on several
GPUs with accelerate's device map because only one layer is ever held: a device map would leave
all but one GPU idle. Weights are quantized on the first device.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

import numpy as np
import torch

from rptq.calib.cluster import cluster_channels, fixed_clusters
from rptq.calib.gptq import HessianTap
from rptq.calib.observers import ChannelRangeObserver, ClusterRangeObserver
from rptq.calib.range_search import SEARCHED_METRICS, search_ranges
from rptq.calib.shards import (
    Shard,
    advance,
    channel_ranges,
    cluster_ranges,
    parse_devices,
    split_windows,
)
from rptq.calib.trt_domain import trt_adjust
from rptq.calib.weight_methods import hessian_tap, needs_hessian, quantize_layer
from rptq.errors import ConfigError
from rptq.model.fakequant import FakeQuantTap, apply_weights
from rptq.model.forward import LayerWeights, causal_mask, embed, read_layer
from rptq.model.load import LoadedModel
from rptq.model.shape import OptShape
from rptq.model.weights import layer_prefix
from rptq.plan import (
    ActMetric,
    ActQuant,
    Granularity,
    ModelRef,
    QuantPlan,
    Recipe,
    ReorderSite,
    Target,
    WeightQuant,
    default_provenance,
)
from rptq.points import REORDERS, SITE_OF, Act, Reorder
from rptq.quant.clusters import cluster_of_channel
from rptq.quant.qparams import affine_params, floor_cluster_ranges

log = logging.getLogger(__name__)

# attn_probs lies in [0, 1]: RPTQ's fix0to1 grid round(255 P) / 255 is, on the signed 8-bit grid,
# scale 1/255 with zero point -128 (codes -128..127 <-> 0..255).
PROBS_SCALE = np.array([1 / 255], dtype=np.float32)
PROBS_ZERO = np.array([-128], dtype=np.int32)

ProgressFn = Callable[[int, int], None]


def check_recipe_fits(recipe: Recipe, shape: OptShape) -> None:
    """Reject cluster counts the model cannot have, before any expensive work."""
    group = recipe.weight_group_size
    if group and recipe.wbits < 16 and (shape.hidden_size % group or shape.ffn_dim % group):
        raise ConfigError(
            f"--weight-group-size {group} must divide the linears' input widths "
            f"({shape.hidden_size} and {shape.ffn_dim})"
        )
    if recipe.granularity is not Granularity.CLUSTER:
        return
    for point, spec in REORDERS.items():
        channels = shape.width(spec.width)
        per_group = shape.head_dim if spec.per_head else channels
        k = recipe.clusters[str(point)]
        if k > per_group:
            where = (
                f"per head ({per_group} channels each)" if spec.per_head else f"{channels} channels"
            )
            raise ConfigError(
                f"--clusters {point}={k} is more than the model has ({where}); "
                f"use at most {per_group}"
            )
    if recipe.seq_len > shape.max_positions:
        raise ConfigError(
            f"--seq-len {recipe.seq_len} exceeds the model's {shape.max_positions} positions"
        )


def needed_points(recipe: Recipe) -> list[Reorder]:
    """Reorder points whose clusters some quantized activation uses."""
    acts = set(recipe.quantized_acts)
    return [p for p, spec in REORDERS.items() if acts & set(spec.quantized)]


def _site(
    layer: int, point: Reorder, stats: ChannelRangeObserver, recipe: Recipe, shape: OptShape
) -> ReorderSite:
    spec = REORDERS[point]
    channels = shape.width(spec.width)
    if recipe.granularity is not Granularity.CLUSTER:
        perm, sizes = fixed_clusters(channels, recipe.granularity)
        return ReorderSite(layer, point, perm, sizes)
    # One point per channel: (max, min) per statistic tensor, maxima first (R2: qmax, kmax,
    # qmin, kmin, so q and k share one clustering).
    columns = [stats.max[a] for a in spec.stats_from] + [stats.min[a] for a in spec.stats_from]
    points = torch.stack(columns, dim=1).double().cpu().numpy()
    groups = shape.num_heads if spec.per_head else 1
    perm, sizes = cluster_channels(points, groups, recipe.clusters[str(point)])
    return ReorderSite(layer, point, perm, sizes)


def _act_quants(layer: int, observer: ClusterRangeObserver, recipe: Recipe) -> list[ActQuant]:
    out = []
    for act in recipe.quantized_acts:
        bits = recipe.bits_of(act)
        if act is Act.ATTN_PROBS:
            out.append(ActQuant(layer, act, bits, PROBS_SCALE.copy(), PROBS_ZERO.copy()))
            continue
        lo = observer.min[act].double().cpu().numpy()
        hi = observer.max[act].double().cpu().numpy()
        scale, zero = affine_params(*floor_cluster_ranges(lo, hi, bits), bits)
        out.append(ActQuant(layer, act, bits, scale, zero))
    return out


def calibrate(
    model: LoadedModel,
    windows: torch.Tensor,
    recipe: Recipe,
    device: str | Sequence[str | torch.device] = "cpu",
    progress: ProgressFn | None = None,
) -> QuantPlan:
    """Run RPTQ calibration on `windows` [N, T] and return the quantization plan.

    `device`: one device, or several (a list or a comma-separated string) that share the windows.
    """
    devices = parse_devices(device)
    shape = model.shape
    check_recipe_fits(recipe, shape)
    rows, length = windows.shape
    mask = torch.ones(1, length, dtype=torch.long)
    additive = causal_mask(mask, torch.float32)
    with torch.no_grad():  # embeddings on the CPU (the table stays there), activations on device
        hidden = torch.cat([embed(windows[n : n + 1], mask, model.weights) for n in range(rows)])
    shards = split_windows(hidden, additive, devices)
    del hidden
    if len(shards) > 1:
        log.info(
            "windows split across %d devices: %s",
            len(shards),
            ", ".join(f"{s.hidden.shape[0]} on {s.device}" for s in shards),
        )
    points = needed_points(recipe)
    stat_acts = {a for p in points for a in REORDERS[p].stats_from}
    sites: list[ReorderSite] = []
    acts: list[ActQuant] = []
    weights: list[WeightQuant] = []
    started = time.perf_counter()
    for i in range(shape.num_layers):
        layer_weights = read_layer(model.weights, i, device=str(devices[0]))
        with torch.no_grad():
            layer_sites = _calibrate_sites(
                i, shards, layer_weights, shape, recipe, points, stat_acts
            )
            hessians = hessian_tap() if needs_hessian(recipe) else None
            layer_acts = _calibrate_acts(
                i, shards, layer_weights, shape, recipe, layer_sites, hessians
            )
            adjust = (
                trt_adjust(layer_acts, layer_sites, recipe.trt_weight_groups)
                if recipe.target is Target.TRT
                else None
            )
            layer_wq = (
                quantize_layer(i, layer_weights, recipe, layer_sites, hessians, adjust)
                if recipe.wbits < 16
                else []
            )
            quant_weights = apply_weights(
                layer_weights, {w.fqn.split(f"{layer_prefix(i)}.", 1)[1]: w for w in layer_wq}
            )
            tap = FakeQuantTap.for_layer(layer_acts, {s.point: s for s in layer_sites})
            advance(shards, quant_weights, shape, tap)
        sites += layer_sites
        acts += layer_acts
        weights += layer_wq
        log.debug("layer %d calibrated (%.1f s elapsed)", i, time.perf_counter() - started)
        if progress is not None:
            progress(i + 1, shape.num_layers)
        del layer_weights, quant_weights
    return QuantPlan(
        model=ModelRef(model.name, shape.config_hash(), asdict(shape)),
        recipe=recipe,
        sites=tuple(sites),
        acts=tuple(acts),
        weights=tuple(weights),
        provenance=default_provenance(),
    )


def _calibrate_sites(
    layer: int,
    shards: list[Shard],
    weights: LayerWeights,
    shape: OptShape,
    recipe: Recipe,
    points: list[Reorder],
    stat_acts: set[Act],
) -> list[ReorderSite]:
    stats = (
        channel_ranges(shards, weights, shape, stat_acts)
        if stat_acts and recipe.granularity is Granularity.CLUSTER
        else ChannelRangeObserver(stat_acts)
    )
    return [_site(layer, p, stats, recipe, shape) for p in points]


def _calibrate_acts(
    layer: int,
    shards: list[Shard],
    weights: LayerWeights,
    shape: OptShape,
    recipe: Recipe,
    sites: list[ReorderSite],
    hessians: HessianTap | None = None,
) -> list[ActQuant]:
    if not recipe.quantized_acts and hessians is None:
        return []
    by_point = {s.point: s for s in sites}
    labels = {
        act: torch.from_numpy(
            cluster_of_channel(by_point[SITE_OF[act]].perm, by_point[SITE_OF[act]].sizes)
        )
        for act in recipe.quantized_acts
        if act in SITE_OF
    }
    searched = recipe.act_metric in SEARCHED_METRICS
    # a searched metric clips inside the global extremes: minmax first, then its own pass
    observer = ClusterRangeObserver(labels, ActMetric.MINMAX if searched else recipe.act_metric)
    cluster_ranges(shards, weights, shape, observer, hessians)
    if searched:
        search_ranges(shards, weights, shape, observer, recipe)
    return _act_quants(layer, observer, recipe)
