"""The CI outlier model both outlier test modules use (the ladder and the TensorRT variant)."""

import torch

from rptq.model.load import LoadedModel, from_module
from rptq.outliers import make_outlier_opt
from rptq.runtime.reference import ReferenceModel

SEQ_LEN = 32
VOCAB = 512

OutlierCase = tuple[LoadedModel, torch.Tensor, torch.Tensor, torch.Tensor]


def make_outlier_case(outlier_share: float | None = None) -> OutlierCase:
    """A 2-layer random OPT (hidden 64, weights N(0, 0.05)) with 6 outlier channels (their
    readers balanced to `outlier_share` when given, rptq/outliers.py), 16 calibration and 8
    evaluation windows of random tokens, and the FP logits of the latter."""
    shape = {"hidden_size": 64, "num_layers": 2, "ffn_dim": 256, "weight_std": 0.05}
    model = from_module(make_outlier_opt(outlier_share=outlier_share, **shape), "outliers")
    generator = torch.Generator().manual_seed(1)
    calib = torch.randint(0, VOCAB, (16, SEQ_LEN), generator=generator)
    evals = torch.randint(0, VOCAB, (8, SEQ_LEN), generator=generator)
    return model, calib, evals, ReferenceModel(model)(evals)
