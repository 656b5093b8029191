"""Plan files: exact round trip, and a one-line PlanError for each kind of corruption."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from rptq.errors import ConfigError, OutputError, PlanError
from rptq.plan import PLAN_JSON, PLAN_TENSORS, QuantPlan, Recipe


@pytest.fixture(scope="module")
def plan(calibrate_tiny):
    return calibrate_tiny(wbits=4, abits=4)


@pytest.fixture
def saved(plan, tmp_path):
    path = tmp_path / "plan"
    plan.save(path)
    return path


def test_round_trip_is_exact(plan, saved, tiny_loaded):
    loaded = QuantPlan.load(saved, expect_hash=tiny_loaded.shape.config_hash())
    assert loaded.recipe == plan.recipe
    assert loaded.model == plan.model
    assert len(loaded.sites) == len(plan.sites) == 10
    for a, b in zip(plan.sites, loaded.sites, strict=True):
        assert (a.layer, a.point) == (b.layer, b.point)
        np.testing.assert_array_equal(a.perm, b.perm)
        np.testing.assert_array_equal(a.sizes, b.sizes)
    for a, b in zip(plan.acts, loaded.acts, strict=True):
        assert (a.layer, a.act, a.bits) == (b.layer, b.act, b.bits)
        np.testing.assert_array_equal(a.scale, b.scale)
        np.testing.assert_array_equal(a.zero, b.zero)
    for a, b in zip(plan.weights, loaded.weights, strict=True):
        assert (a.fqn, a.bits) == (b.fqn, b.bits)
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_array_equal(a.scale, b.scale)


def test_no_pickle_and_json_is_readable(saved):
    meta = json.loads((saved / PLAN_JSON).read_text())
    assert meta["schema_version"] == 1
    assert meta["recipe"]["abits"] == 4
    assert sorted(p.name for p in saved.iterdir()) == [PLAN_JSON, PLAN_TENSORS]


def test_save_refuses_to_overwrite_without_force(plan, saved):
    with pytest.raises(OutputError, match="--force"):
        plan.save(saved)
    plan.save(saved, force=True)
    assert (saved / PLAN_JSON).exists()


def _rewrite_tensor(path, key, fn):
    tensors = load_file(str(path / PLAN_TENSORS))
    tensors[key] = fn(tensors[key])
    save_file(tensors, str(path / PLAN_TENSORS))


def _corruptions():
    def swap_dup(perm):
        perm = perm.copy()
        perm[0] = perm[1]
        return perm

    def cross_head(perm):
        perm = perm.copy()
        perm[0], perm[-1] = perm[-1], perm[0]
        return perm

    def bad_sizes(sizes):
        sizes = sizes.copy()
        sizes[0] += 1
        return sizes

    def nan_scale(scale):
        scale = scale.copy()
        scale[0] = np.nan
        return scale

    def negative_scale(scale):
        return -scale

    def off_grid(codes):
        codes = codes.copy()
        codes[0, 0] = 100
        return codes

    return {
        "not a permutation": ("layers.0.R1.perm", swap_dup, "not a permutation"),
        "R2 across heads": ("layers.0.R2.perm", cross_head, "across heads"),
        "sizes do not sum": ("layers.1.R5.sizes", bad_sizes, "sum to"),
        "nan scale": ("layers.0.act.q.scale", nan_scale, "non-finite"),
        "negative scale": ("layers.1.act.fc2_in.scale", negative_scale, "non-positive"),
        "codes off grid": ("model.decoder.layers.0.fc1.codes", off_grid, "grid"),
    }


@pytest.mark.parametrize("case", sorted(_corruptions()))
def test_corrupt_tensors_raise_plan_error(saved, case):
    key, fn, message = _corruptions()[case]
    _rewrite_tensor(saved, key, fn)
    with pytest.raises(PlanError, match=message) as info:
        QuantPlan.load(saved)
    assert "\n" not in str(info.value)


def test_wrong_model_is_rejected(saved):
    with pytest.raises(PlanError, match="does not match this model"):
        QuantPlan.load(saved, expect_hash="0" * 16)


def test_unknown_schema_version(saved):
    meta = json.loads((saved / PLAN_JSON).read_text())
    meta["schema_version"] = 99
    (saved / PLAN_JSON).write_text(json.dumps(meta))
    with pytest.raises(PlanError, match="schema version 99"):
        QuantPlan.load(saved)


def test_truncated_tensor_file(saved):
    data = (saved / PLAN_TENSORS).read_bytes()
    (saved / PLAN_TENSORS).write_bytes(data[: len(data) // 2])
    with pytest.raises(PlanError, match="unreadable|missing"):
        QuantPlan.load(saved)


def test_missing_files(saved, tmp_path):
    (saved / PLAN_JSON).unlink()
    with pytest.raises(PlanError, match="not a plan directory"):
        QuantPlan.load(saved)
    with pytest.raises(PlanError, match="not a plan directory"):
        QuantPlan.load(tmp_path / "nowhere")


def test_tensor_with_wrong_shape(saved):
    _rewrite_tensor(saved, "layers.0.act.k.zero", lambda z: z[:1])
    with pytest.raises(PlanError, match="wrong dtype/shape"):
        QuantPlan.load(saved)


def test_interrupted_save_leaves_nothing(plan, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.numpy.save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        plan.save(tmp_path / "plan")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"abits": 5}, "--abits 5"),
        ({"wbits": 1}, "--wbits 1"),
        ({"clusters": {"R1": 0, "R2": 1, "R3": 1, "R4": 1, "R5": 1}}, ">= 1"),
        ({"weight_method": "magic"}, "weight-method"),
    ],
)
def test_recipe_validation(fields, message):
    with pytest.raises(ConfigError, match=message):
        Recipe(**fields)


def test_copy_of_plan_dir_loads(saved, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    assert QuantPlan.load(copy).recipe.abits == 4


def test_per_tensor_plan_round_trips(calibrate_tiny, tmp_path):
    """One cluster over all heads (per-tensor q/k/v) is a valid plan: nothing crosses a head."""
    from rptq.plan import Granularity

    plan = calibrate_tiny(wbits=4, abits=4, granularity=Granularity.TENSOR)
    plan.save(tmp_path / "tensor")
    loaded = QuantPlan.load(tmp_path / "tensor")
    assert [len(s.sizes) for s in loaded.sites if s.layer == 0] == [1] * 5
