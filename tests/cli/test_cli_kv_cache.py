"""`run`/`export` write the decoder with a KV cache by default; `--no-cache` the prefill graph,
`--kv-cache-dtype int8|uint8` the integer cache. The graphs run in ORT and score alike."""

import json

import numpy as np
import onnx
import pytest

from rptq import names
from rptq.cli import main
from rptq.runtime.decode import DecoderSession, is_with_past
from rptq.runtime.ort import make_session
from tests.cli.test_cli_flow import quick_eval_flags


def _export(capsys, model_dir, out, *flags) -> dict:
    argv = ["export", str(model_dir), "-o", str(out), "--json", "-q", *flags]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _cache_type(path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    past = next(i for i in model.graph.input if i.name == names.past_key(0))
    return past.type.tensor_type.elem_type


def test_cache_graph_is_the_default_and_no_cache_the_prefill_graph(
    capsys,
    model_dir,
    plan_dir,
    data_dir,
    tmp_path,
):
    cached, prefill = tmp_path / "cached.onnx", tmp_path / "prefill.onnx"
    summary = _export(capsys, model_dir, cached, "--plan", str(plan_dir))
    assert summary["kv cache"].startswith("float32")
    assert is_with_past(cached)
    assert _cache_type(cached) == onnx.TensorProto.FLOAT
    summary = _export(capsys, model_dir, prefill, "--plan", str(plan_dir), "--no-cache")
    assert summary["kv cache"].startswith("none")
    assert not is_with_past(prefill)
    # `eval` scores both graph kinds, with the same perplexity
    ppl = []
    for path in (cached, prefill):
        assert main(["eval", str(path), *quick_eval_flags(data_dir)]) == 0
        ppl.append(json.loads(capsys.readouterr().out)["perplexity"]["wikitext2"])
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-6)


@pytest.mark.parametrize(("kind", "elem"), [("int8", 3), ("uint8", 2)])
def test_integer_cache_flag(capsys, model_dir, plan_dir, tmp_path, kind, elem):
    out = tmp_path / f"{kind}.onnx"
    summary = _export(capsys, model_dir, out, "--plan", str(plan_dir), "--kv-cache-dtype", kind)
    assert kind in summary["kv cache"]
    assert _cache_type(out) == elem  # onnx.TensorProto.INT8 / UINT8
    decoder = DecoderSession(make_session(out))
    ids = np.arange(3, 11, dtype=np.int64)[None]
    logits, cache = decoder.step(ids, np.ones_like(ids), decoder.empty_cache(1))
    assert cache[0][0].dtype == np.dtype(kind)
    assert np.isfinite(logits).all()
