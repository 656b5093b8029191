"""The TensorRT variant of the passes: not implemented yet (design in docs/tensorrt-rules.md).

Until it is, asking the pipeline for target "trt" must fail loudly: the ORT passes would write
per-cluster asymmetric activation Q/DQ, a graph TensorRT rejects.
"""

import pytest

from rptq.errors import ConfigError
from rptq.passes import PassContext, run_passes
from tests.plans import random_plan


def test_trt_target_is_refused_until_implemented(fp32_graph, tiny_loaded, tiny_model):
    weights = {k: v.detach().numpy() for k, v in tiny_model.state_dict().items()}
    ctx = PassContext(plan=random_plan(tiny_loaded.shape, weights), target="trt")
    with pytest.raises(ConfigError, match="not implemented"):
        run_passes(fp32_graph, ctx)
