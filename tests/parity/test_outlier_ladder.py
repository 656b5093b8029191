"""On a model with OPT-like outlier channels, the default recipe's quality ladder holds.

Issue 13: with RPTQ's published `ema_minmax` ranges, per-cluster (and per-channel) activation
scales lost to a single per-tensor scale on such a model at A8, because the EMA of per-row
extremes clips the wide channels. The default metric (`mse`) must keep the ladder: RPTQ's
clusters clearly ahead of per-tensor scales at A8 and A4, per-tensor worst at A3, and clusters
about as good as per-channel at A8. Logit SQNR of the PyTorch fake-quant reference against the
FP model (which the ONNX graph matches, tests/parity/test_ort_parity.py) on random tokens.

Two CI models. In the plain one (rptq.outliers.make_outlier_opt) the six outlier channels carry
about 99 % of each linear's input energy, so losing the ordinary channels costs little and even
per-channel scales gain only about 2.5 dB over per-tensor at A4. In the balanced one the weight
columns reading the outlier channels are scaled so that they carry half (`outlier_share`), as
in a trained model where both groups matter; there the issue's margins are asked at A8 and A4.
Measured (seed-0 models below, logit SQNR, default `mse` ranges):

| model | bits | per tensor | RPTQ clusters | per channel |
| --- | --- | ---: | ---: | ---: |
| plain | A8 | 15.99 dB | 19.46 dB | 19.05 dB |
| plain | A4 | 7.56 dB | 9.51 dB | 10.15 dB |
| plain | A3 | 4.40 dB | 6.42 dB | 6.84 dB |
| balanced | A8 | 14.84 dB | 27.91 dB | 25.93 dB |
| balanced | A4 | 12.90 dB | 18.68 dB | 18.40 dB |
| balanced | A3 | 10.87 dB | 14.41 dB | 14.99 dB |
"""

import pytest

from rptq.calib.runner import calibrate
from rptq.plan import Recipe
from rptq.runtime.parity import sqnr_db
from rptq.runtime.reference import ReferenceModel
from tests.conftest import TINY_CLUSTERS
from tests.parity.outliers import SEQ_LEN, OutlierCase, make_outlier_case

MARGIN_DB = 3.0  # RPTQ over per-tensor at A8 and A4 (issue 13)
CHANNEL_SLACK_DB = 1.0  # RPTQ may trail per-channel by this much at A8 (issue 13)
GAP_CLOSED_MIN = 0.5  # at A4: RPTQ's share of the per-tensor -> per-channel gain
A3_MARGIN_DB = 1.5  # balanced model, A3: RPTQ over per-tensor (the ladder holds; half the margin)
BALANCED_SHARE = 0.5  # the outlier channels' share of their readers' input energy
GRANULARITIES = ("tensor", "cluster", "channel")


@pytest.fixture(scope="module")
def outlier_case() -> OutlierCase:
    """The CI outlier model (tests/parity/outliers.py), built once per module."""
    return make_outlier_case()


def _sqnr(outlier_case, abits: int, granularity: str) -> float:
    model, calib, evals, fp_logits = outlier_case
    recipe = Recipe(  # default act_metric and clusters, float weights: activations only
        wbits=16,
        abits=abits,
        granularity=granularity,
        clusters=dict(TINY_CLUSTERS),
        nsamples=calib.shape[0],
        seq_len=SEQ_LEN,
        calib_dataset="random",
    )
    plan = calibrate(model, calib, recipe)
    return sqnr_db(fp_logits, ReferenceModel(model, plan)(evals))


def test_rptq_beats_per_tensor_by_a_clear_margin_at_a8(outlier_case):
    tensor = _sqnr(outlier_case, 8, "tensor")
    cluster = _sqnr(outlier_case, 8, "cluster")
    assert cluster >= tensor + MARGIN_DB, f"RPTQ {cluster:.2f} dB, tensor {tensor:.2f}"


def test_rptq_closes_most_of_the_tensor_to_channel_gap_at_a4(outlier_case):
    """On the plain model per-channel scales are only about 2.5 dB above per-tensor at A4
    (measured), so the issue's +3 dB cannot be asked of clusters here (the balanced model
    below asks it); they must close at least half of what per-channel gains."""
    tensor, cluster, channel = (_sqnr(outlier_case, 4, g) for g in ("tensor", "cluster", "channel"))
    assert channel > tensor, f"no gap to close: tensor {tensor:.2f} dB, channel {channel:.2f}"
    closed = (cluster - tensor) / (channel - tensor)
    assert closed >= GAP_CLOSED_MIN, (
        f"RPTQ {cluster:.2f} dB closes {closed:.0%} of tensor {tensor:.2f} -> channel {channel:.2f}"
    )


def test_rptq_is_close_to_per_channel_at_a8(outlier_case):
    cluster = _sqnr(outlier_case, 8, "cluster")
    channel = _sqnr(outlier_case, 8, "channel")
    assert cluster >= channel - CHANNEL_SLACK_DB, f"RPTQ {cluster:.2f} dB, channel {channel:.2f}"


def test_ladder_holds_at_a3(outlier_case):
    tensor, cluster, channel = (_sqnr(outlier_case, 3, g) for g in ("tensor", "cluster", "channel"))
    assert tensor < cluster, f"tensor {tensor:.2f} dB, RPTQ {cluster:.2f}"
    assert cluster >= channel - CHANNEL_SLACK_DB, f"RPTQ {cluster:.2f} dB, channel {channel:.2f}"


@pytest.fixture(scope="module")
def balanced_ladder() -> dict[tuple[int, str], float]:
    """SQNR by (abits, granularity) on the balanced CI outlier model, calibrated once each."""
    case = make_outlier_case(outlier_share=BALANCED_SHARE)
    return {(bits, g): _sqnr(case, bits, g) for bits in (8, 4, 3) for g in GRANULARITIES}


@pytest.mark.parametrize("abits", [8, 4])
def test_balanced_outliers_rptq_beats_per_tensor_by_the_issue_margin(balanced_ladder, abits):
    tensor, cluster = balanced_ladder[abits, "tensor"], balanced_ladder[abits, "cluster"]
    assert cluster >= tensor + MARGIN_DB, f"A{abits}: RPTQ {cluster:.2f} dB, tensor {tensor:.2f}"


def test_balanced_outliers_rptq_is_close_to_per_channel_at_a8(balanced_ladder):
    cluster, channel = balanced_ladder[8, "cluster"], balanced_ladder[8, "channel"]
    assert cluster >= channel - CHANNEL_SLACK_DB, f"RPTQ {cluster:.2f} dB, channel {channel:.2f}"


def test_balanced_outliers_ladder_holds_at_a3(balanced_ladder):
    tensor, cluster, channel = (balanced_ladder[3, g] for g in GRANULARITIES)
    assert cluster >= tensor + A3_MARGIN_DB, f"RPTQ {cluster:.2f} dB, tensor {tensor:.2f}"
    assert cluster >= channel - CHANNEL_SLACK_DB, f"RPTQ {cluster:.2f} dB, channel {channel:.2f}"
