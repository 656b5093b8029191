"""Calibration: granularity limits, KV-only mode, determinism, the FP reference."""

import numpy as np
import pytest
import torch

from rptq.calib.observers import ClusterRangeObserver
from rptq.calib.runner import calibrate
from rptq.errors import ConfigError
from rptq.model.fakequant import channel_quant
from rptq.plan import ActMetric, Granularity, Recipe
from rptq.points import KV_ACTS, QUANTIZED_ACTS, SITE_OF, Act
from rptq.runtime.reference import ReferenceModel
from tests.conftest import TINY_CLUSTERS

HIDDEN, HEAD_DIM, FFN = 64, 16, 256


def per_channel_params(plan, layer, act):
    """Scale/zero of `act` expanded to every channel (original order)."""
    quant = plan.act(layer, act)
    site = plan.site(layer, SITE_OF[act]) if act in SITE_OF else None
    cq = channel_quant(quant, site)
    return cq.scale.numpy(), cq.zero.numpy()


def test_reference_16_16_reproduces_fp_logits_exactly(tiny_model, tiny_loaded, calibrate_tiny):
    plan = calibrate_tiny(wbits=16, abits=16)
    assert plan.acts == ()
    assert plan.weights == ()
    ids = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = tiny_model(input_ids=ids).logits
    got = ReferenceModel(tiny_loaded, plan)(ids)
    assert torch.equal(got, want), f"max diff {(got - want).abs().max().item()}"


def test_one_cluster_equals_per_tensor(calibrate_tiny):
    ones = calibrate_tiny(wbits=16, abits=4, clusters={f"R{i}": 1 for i in range(1, 6)})
    tensor = calibrate_tiny(wbits=16, abits=4, granularity=Granularity.TENSOR)
    # Layer 0's attn LayerNorm output is the first quantizer, so both runs see the same tensor
    # (later ones differ because R2/R3 with k=1 are per head, not per tensor).
    a = per_channel_params(ones, 0, Act.ATTN_LN_OUT)
    b = per_channel_params(tensor, 0, Act.ATTN_LN_OUT)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert len(np.unique(a[0])) == 1


def test_one_cluster_observer_is_the_tensor_range():
    rng = np.random.default_rng(0)
    rows = [torch.from_numpy(rng.normal(size=(1, 7, 12)).astype(np.float32)) for _ in range(3)]
    labels = {Act.FC2_IN: torch.zeros(12, dtype=torch.long)}
    observer = ClusterRangeObserver(labels, ActMetric.MINMAX)
    for row in rows:
        observer(Act.FC2_IN, row)
    everything = torch.cat(rows)
    assert observer.min[Act.FC2_IN].item() == everything.min().item()
    assert observer.max[Act.FC2_IN].item() == everything.max().item()
    # EMA of per-row extremes, RPTQ's default metric, weighted 0.99 / 0.01
    ema = ClusterRangeObserver(labels, ActMetric.EMA_MINMAX)
    for row in rows:
        ema(Act.FC2_IN, row)
    want = rows[0].max()
    for row in rows[1:]:
        want = 0.99 * want + 0.01 * row.max()
    assert ema.max[Act.FC2_IN].item() == pytest.approx(want.item(), rel=1e-6)


def test_channel_count_clusters_equal_per_channel(calibrate_tiny, tiny_loaded):
    full = {"R1": HIDDEN, "R2": HEAD_DIM, "R3": HEAD_DIM, "R4": HIDDEN, "R5": FFN}
    clustered = calibrate_tiny(wbits=4, abits=4, clusters=full)
    channel = calibrate_tiny(wbits=4, abits=4, granularity=Granularity.CHANNEL)
    for layer in range(2):
        for act in QUANTIZED_ACTS:
            a, b = (
                per_channel_params(clustered, layer, act),
                per_channel_params(channel, layer, act),
            )
            np.testing.assert_array_equal(a[0], b[0], err_msg=f"{act} layer {layer}")
            np.testing.assert_array_equal(a[1], b[1])
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(9))
    a = ReferenceModel(tiny_loaded, clustered)(ids)
    b = ReferenceModel(tiny_loaded, channel)(ids)
    assert torch.equal(a, b)


def test_kv_only_quantizes_k_and_v(calibrate_tiny):
    plan = calibrate_tiny(wbits=4, abits=4, only_quant_kv=True)
    assert {a.act for a in plan.acts} == set(KV_ACTS)
    assert {s.point.value for s in plan.sites} == {"R2", "R3"}
    assert all(a.bits == 4 for a in plan.acts)


def test_full_mode_bits_follow_rptq(calibrate_tiny):
    plan = calibrate_tiny(wbits=4, abits=4)
    bits = {a.act: a.bits for a in plan.acts if a.layer == 0}
    assert bits[Act.ATTN_LN_OUT] == bits[Act.FFN_LN_OUT] == 8  # LN outputs at max(8, A)
    assert bits[Act.ATTN_PROBS] == 8
    assert bits[Act.Q] == bits[Act.K] == bits[Act.V] == bits[Act.FC2_IN] == 4
    assert len(plan.weights) == 12
    assert all(w.bits == 4 for w in plan.weights)


def test_calibration_is_deterministic(tiny_loaded, tiny_windows, tmp_path):
    recipe = Recipe(wbits=4, abits=4, nsamples=8, seq_len=64, clusters=dict(TINY_CLUSTERS))
    for name in ("a", "b"):
        calibrate(tiny_loaded, tiny_windows, recipe).save(tmp_path / name)
    for file in ("plan.json", "tensors.safetensors"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()


def test_clusters_are_contiguous_runs_of_similar_channels(calibrate_tiny):
    plan = calibrate_tiny(wbits=16, abits=4)
    site = plan.site(0, "R5")
    assert len(site.sizes) == 16
    assert site.sizes.sum() == FFN


def test_quantization_error_shrinks_with_bits(tiny_loaded, calibrate_tiny):
    ids = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(3))
    fp = ReferenceModel(tiny_loaded)(ids)
    errors = {}
    for abits in (3, 4, 8):
        plan = calibrate_tiny(wbits=16, abits=abits)
        errors[abits] = (ReferenceModel(tiny_loaded, plan)(ids) - fp).pow(2).mean().item()
    assert errors[8] < errors[4] < errors[3], errors


@pytest.mark.parametrize(
    ("clusters", "message"),
    [
        ({"R1": 65, "R2": 4, "R3": 4, "R4": 8, "R5": 8}, "R1=65"),
        ({"R1": 8, "R2": 17, "R3": 4, "R4": 8, "R5": 8}, "per head"),
    ],
)
def test_more_clusters_than_channels(tiny_loaded, tiny_windows, clusters, message):
    recipe = Recipe(wbits=4, abits=4, clusters=clusters, nsamples=8, seq_len=64)
    with pytest.raises(ConfigError, match=message) as info:
        calibrate(tiny_loaded, tiny_windows, recipe)
    assert "\n" not in str(info.value)
