"""Calibration with the windows split across devices gives the single-device plan.

CPU device lists (`cpu,cpu`) are no faster, but they run the same sharding, threads and merges
as a list of GPUs, so the merge logic is tested without one.
"""

import numpy as np
import pytest
import torch

from rptq.calib.gptq import HessianTap
from rptq.calib.runner import calibrate
from rptq.calib.shards import parse_devices, split_windows
from rptq.errors import ConfigError
from rptq.plan import ActMetric, Recipe, WeightMethod
from rptq.points import Act
from rptq.runtime.parity import sqnr_db
from rptq.runtime.reference import ReferenceModel
from tests.conftest import TINY_CLUSTERS

THREE_UNEVEN = ["cpu", "cpu", "cpu"]  # 8 windows -> shards of 3, 3 and 2


def recipe(**fields):
    """The recipe `calibrate_tiny(wbits=4, abits=4, **fields)` calibrates."""
    fields.setdefault("clusters", dict(TINY_CLUSTERS))
    fields.setdefault("act_metric", "ema_minmax")  # as calibrate_tiny (tests/conftest.py)
    return Recipe(wbits=4, abits=4, nsamples=8, seq_len=64, calib_dataset="random", **fields)


@pytest.mark.parametrize("metric", list(ActMetric))
@pytest.mark.parametrize("devices", [["cpu", "cpu"], THREE_UNEVEN], ids=["2", "3-uneven"])
def test_rtn_sharded_plan_is_byte_identical(
    tiny_loaded, tiny_windows, calibrate_tiny, tmp_path, metric, devices
):
    calibrate_tiny(wbits=4, abits=4, act_metric=metric).save(tmp_path / "one")
    done = []
    sharded = calibrate(
        tiny_loaded,
        tiny_windows,
        recipe(act_metric=metric),
        device=devices,
        progress=lambda *p: done.append(p),
    )
    sharded.save(tmp_path / "sharded")
    assert done == [(1, 2), (2, 2)]
    for file in ("plan.json", "tensors.safetensors"):
        one, many = (tmp_path / name / file for name in ("one", "sharded"))
        assert one.read_bytes() == many.read_bytes(), file


def test_merged_hessians_match_one_tap():
    rows = torch.randn(8, 1, 64, 32, generator=torch.Generator().manual_seed(0))
    one = HessianTap({Act.FC2_IN})
    for row in rows:
        one(Act.FC2_IN, row)
    merged = HessianTap({Act.FC2_IN})
    for shard in torch.tensor_split(rows, 3):
        tap = HessianTap({Act.FC2_IN})
        for row in shard:
            tap(Act.FC2_IN, row)
        merged.merge(tap)
    assert merged.tokens == one.tokens == {Act.FC2_IN: 8 * 64}
    # The same float32 sum of 8 terms grouped by shard: a few ulps of the largest entry.
    want, got = one.hessian(Act.FC2_IN), merged.hessian(Act.FC2_IN)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


# GPTQ's sweep rounds each column with the error of the columns before it, so a Hessian entry a
# few ulps away can tip one code across a rounding boundary, and the error feedback moves a few
# codes after it in that row: a small fraction, by a step or two (measured on the tiny model:
# 22 of 16384 codes, by one step). Later layers then also see slightly different inputs.
GPTQ_MAX_CODES_CHANGED = 0.01
GPTQ_MAX_CODE_STEPS = 2


def assert_matches_up_to_hessian_rounding(loaded, one, sharded):
    """The sharded GPTQ plan is the one-device plan up to the merged Hessians' last bits."""
    # Layer 0's clusters and activation ranges come before any Hessian is used: exact.
    for a, b in zip(one.sites, sharded.sites, strict=True):
        if a.layer == 0:
            np.testing.assert_array_equal(a.perm, b.perm)
    for a, b in zip(one.acts, sharded.acts, strict=True):
        if a.layer == 0:
            np.testing.assert_array_equal(a.scale, b.scale)
    for a, b in zip(one.weights, sharded.weights, strict=True):
        if a.fqn.startswith("model.decoder.layers.0."):
            diff = np.abs(a.codes.astype(np.int64) - b.codes.astype(np.int64))
            assert np.mean(diff > 0) <= GPTQ_MAX_CODES_CHANGED, a.fqn
            assert diff.max() <= GPTQ_MAX_CODE_STEPS, a.fqn
    # The models the plans describe differ by less than quantization changes the float model.
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(7))
    fp = ReferenceModel(loaded)(ids)
    a, b = ReferenceModel(loaded, one)(ids), ReferenceModel(loaded, sharded)(ids)
    assert sqnr_db(a, b) >= sqnr_db(fp, a), (sqnr_db(a, b), sqnr_db(fp, a))


def test_gptq_sharded_plan_matches_up_to_rounding(tiny_loaded, tiny_windows, calibrate_tiny):
    # The TensorRT target: with these windows, the merged Hessians' last bits flip GPTQ codes.
    fields = {"weight_method": WeightMethod.GPTQ, "target": "trt"}
    one = calibrate_tiny(wbits=4, abits=4, **fields)
    sharded = calibrate(tiny_loaded, tiny_windows, recipe(**fields), device=THREE_UNEVEN)
    assert_matches_up_to_hessian_rounding(tiny_loaded, one, sharded)


def test_split_windows_is_contiguous_and_drops_idle_devices():
    hidden = torch.arange(8.0).reshape(8, 1, 1)
    mask = torch.zeros(1, 1, 1, 1)
    shards = split_windows(hidden, mask, parse_devices(THREE_UNEVEN))
    assert [s.hidden.flatten().tolist() for s in shards] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert len(split_windows(hidden[:2], mask, parse_devices(THREE_UNEVEN))) == 2


@pytest.fixture
def two_gpus(monkeypatch):
    """Pretend to be a CUDA build with two visible GPUs (parsing touches no device)."""
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_device_lists(two_gpus):
    assert parse_devices("cpu") == [torch.device("cpu")]
    assert parse_devices(" cpu , cpu") == [torch.device("cpu")] * 2
    assert parse_devices("cuda:all") == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert parse_devices("cuda:1,cuda:0") == [torch.device("cuda", 1), torch.device("cuda", 0)]
    assert parse_devices(["cuda"]) == [torch.device("cuda")]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("cuda:3", "cuda:3 is not available: this machine has 2 CUDA devices"),
        ("cuda:0,cuda:2", "cuda:2 is not available"),
        ("cuda:all,cpu", "cuda:all stands alone"),
        ("gpu", "'gpu' is not a device; use cpu, cuda"),
        ("cuda:0,", "'' is not a device"),
        ("mps", "calibration runs on cpu or cuda"),
    ],
)
def test_bad_device_lists(two_gpus, spec, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_devices(spec)
    assert "\n" not in str(info.value)


def test_cuda_without_a_cuda_build(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    with pytest.raises(ConfigError, match="needs a CUDA build of torch"):
        parse_devices("cuda:all")


def test_cuda_build_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match="no CUDA device is visible"):
        parse_devices("cuda")
