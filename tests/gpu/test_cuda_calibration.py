"""Calibration on a CUDA device gives the plan the CPU gives (run on the lent GPU machine)."""

import numpy as np
import pytest
import torch

from rptq.calib.runner import calibrate
from rptq.plan import Recipe
from rptq.runtime.parity import sqnr_db
from rptq.runtime.reference import ReferenceModel
from tests.conftest import TINY_CLUSTERS

pytestmark = pytest.mark.gpu


def test_cuda_calibration_matches_cpu(tiny_loaded, tiny_windows):
    recipe = Recipe(wbits=4, abits=4, nsamples=8, seq_len=64, clusters=dict(TINY_CLUSTERS))
    cpu = calibrate(tiny_loaded, tiny_windows, recipe, device="cpu")
    cuda = calibrate(tiny_loaded, tiny_windows, recipe, device="cuda")
    # Float reductions differ between devices, so a channel at a k-means boundary may switch
    # cluster; the function the plan describes must stay the same within quantization noise.
    same_perm = np.mean(
        [np.array_equal(a.perm, b.perm) for a, b in zip(cpu.sites, cuda.sites, strict=True)]
    )
    assert same_perm >= 0.8
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(7))
    fp = ReferenceModel(tiny_loaded)(ids)
    a = ReferenceModel(tiny_loaded, cpu)(ids)
    b = ReferenceModel(tiny_loaded, cuda)(ids)
    noise_db = sqnr_db(fp, a)
    assert sqnr_db(a, b) >= noise_db, (sqnr_db(a, b), noise_db)
