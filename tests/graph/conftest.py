"""Graph fixtures: the tiny OPT exported once per session, plus the functional reference."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def functional_logits():
    """`(loaded, ids, mask) -> logits` of rptq.model.forward in fp32, which graphs reproduce."""
    from rptq.runtime.reference import ReferenceModel

    return lambda loaded, ids, mask: ReferenceModel(loaded)(ids, mask)


@pytest.fixture(scope="session")
def fp32_graph(tiny_loaded):
    """The tiny model's FP prefill graph in float32 (shared: tests must not edit it)."""
    from rptq.exporter import build_fp_graph

    return build_fp_graph(tiny_loaded, "float32")


@pytest.fixture(scope="session")
def fp16_graph(tiny_loaded):
    """The tiny model's FP prefill graph in float16 (shared: tests must not edit it)."""
    from rptq.exporter import build_fp_graph

    return build_fp_graph(tiny_loaded, "float16")


@pytest.fixture(scope="session")
def tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences of 17 tokens, the second left-padded by 3."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (2, 17), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask
