"""Real TensorRT engines (GPU + TensorRT only; skipped elsewhere with the reason).

Three checks: the FP16 FP graph's engine matches ORT on the FP32 graph (logits SQNR and
perplexity on the same windows); the timing cache round-trips; and TensorRT itself agrees with
the static checker, i.e. every hand-built graph that a hard rule flags is refused by TensorRT's
parser or builder while its passing twin builds. The last one is what turns docs/tensorrt-rules.md
from a reading of TensorRT's documentation into a measured fact for the installed version.
"""

from __future__ import annotations

import pytest

pytest.importorskip(
    "tensorrt", reason="TensorRT is not installed (pip install tensorrt, NVIDIA index, CUDA GPU)"
)

import onnx  # noqa: E402
import torch  # noqa: E402

from rptq.errors import TargetRuleError  # noqa: E402
from rptq.runtime.ort import OrtLogits, make_session  # noqa: E402
from rptq.runtime.parity import compare  # noqa: E402
from rptq.runtime.perplexity import perplexity  # noqa: E402
from rptq.runtime.trt import EngineOptions, TrtLogits, build_engine  # noqa: E402
from tests.graph.test_check_target import CASES  # noqa: E402
from tests.tolerances import TRT_FP16_LOGITS_MIN_SQNR_DB, TRT_FP16_PPL_MAX_REL_DIFF  # noqa: E402

pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu]

# Rules whose violating case TensorRT accepts anyway: the opset window and the ONNX-checker case
# are rptq's own requirements, TRT-FP16 is a warning, and negative scales are not documented
# as a parse-time error.
NOT_TRT_ERRORS = {"TRT-OPSET", "TRT-FP16", "ONNX-CHECKER", "TRT-SCALE-VALUE"}
SMALL = EngineOptions(workspace_gib=2, max_seq_len=64, optimization_level=0)


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(7))


def test_fp16_engine_matches_ort(tiny_loaded, tmp_path, windows):
    from rptq.exporter import build_fp_graph

    fp16, fp32 = tmp_path / "fp16.onnx", tmp_path / "fp32.onnx"
    onnx.save(build_fp_graph(tiny_loaded, "float16"), str(fp16))
    onnx.save(build_fp_graph(tiny_loaded, "float32"), str(fp32))
    build_engine(fp16, tmp_path / "fp16.engine", SMALL)
    engine = TrtLogits(tmp_path / "fp16.engine")
    ort = OrtLogits(make_session(fp32))
    result = compare(ort(windows), engine(windows).cpu())
    assert result.sqnr_db >= TRT_FP16_LOGITS_MIN_SQNR_DB, result.describe()
    ppl_ort, ppl_trt = perplexity(ort, windows).ppl, perplexity(engine, windows).ppl
    assert abs(ppl_trt - ppl_ort) / ppl_ort <= TRT_FP16_PPL_MAX_REL_DIFF, (ppl_ort, ppl_trt)


def test_timing_cache_round_trip(tiny_loaded, tmp_path):
    from rptq.exporter import build_fp_graph

    source = tmp_path / "fp16.onnx"
    onnx.save(build_fp_graph(tiny_loaded, "float16"), str(source))
    cache = tmp_path / "timing.cache"
    options = EngineOptions(workspace_gib=2, max_seq_len=64, timing_cache=cache)
    build_engine(source, tmp_path / "a.engine", options)
    first = cache.read_bytes()
    assert first
    build_engine(source, tmp_path / "b.engine", options)
    assert len(cache.read_bytes()) >= len(first)


@pytest.mark.parametrize("rule", sorted(set(CASES) - NOT_TRT_ERRORS))
def test_tensorrt_rejects_what_the_checker_rejects(rule, tmp_path):
    violating, twin = CASES[rule]
    bad, good = tmp_path / "bad.onnx", tmp_path / "good.onnx"
    onnx.save(violating(), str(bad))
    onnx.save(twin(), str(good))
    build_engine(good, tmp_path / "good.engine", SMALL)
    with pytest.raises(TargetRuleError):
        build_engine(bad, tmp_path / "bad.engine", SMALL)
