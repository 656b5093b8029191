"""The output folder loaded unchanged by real inference stacks: optimum's ORTModelForCausalLM
and onnxruntime-genai's og.Model, each generating transformers' greedy tokens.

Both packages are in the `test` extra; where one cannot be imported the test is skipped with
the import error, never silently passed.
"""

import json

import numpy as np
import pytest

from rptq.stack_folder import (
    CONFIG_FILE,
    GENAI_CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    MODEL_FILE,
    PLAN_RECORD_FILE,
)
from tests.generation.conftest import NEW_TOKENS, PROMPT, assert_decidable


def test_folder_holds_what_each_stack_reads(stack_dir, gen_hf_model):
    names = {p.name for p in stack_dir.iterdir()}
    want = {MODEL_FILE, CONFIG_FILE, GENERATION_CONFIG_FILE, GENAI_CONFIG_FILE, PLAN_RECORD_FILE}
    assert want | {"tokenizer.json", "tokenizer_config.json"} <= names, names
    assert not [n for n in names if n.startswith(".")], "a temporary was left in the folder"
    config = json.loads((stack_dir / CONFIG_FILE).read_text())
    assert config["model_type"] == "opt"
    assert config["use_cache"] is True
    hf = gen_hf_model.config
    genai = json.loads((stack_dir / GENAI_CONFIG_FILE).read_text())
    decoder = genai["model"]["decoder"]
    assert decoder["filename"] == MODEL_FILE
    assert decoder["num_hidden_layers"] == hf.num_hidden_layers
    assert (
        decoder["num_attention_heads"] == decoder["num_key_value_heads"] == hf.num_attention_heads
    )
    assert decoder["head_size"] * hf.num_attention_heads == decoder["hidden_size"] == hf.hidden_size
    assert genai["model"]["context_length"] == hf.max_position_embeddings
    assert (genai["model"]["bos_token_id"], genai["model"]["eos_token_id"]) == (2, 2)
    assert genai["model"]["pad_token_id"] == 1
    assert genai["search"]["past_present_share_buffer"] is False
    record = json.loads((stack_dir / PLAN_RECORD_FILE).read_text())
    assert record["bits"] == "FP"
    assert record["export"]["past"] is True


def test_folder_tokenizer_is_opts(stack_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(stack_dir))
    ids = tokenizer("Hello there")["input_ids"]
    assert ids[0] == 2
    assert ids.count(2) == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Hello there"


def _import_optimum():
    try:
        from optimum.onnxruntime import ORTModelForCausalLM
    except Exception as exc:  # ImportError, or transformers' lazy-module error wrapping one
        pytest.skip(f"optimum.onnxruntime is not importable here ({type(exc).__name__}: {exc})")
    return ORTModelForCausalLM


def optimum_greedy(folder, **kwargs) -> list[int]:
    """ORTModelForCausalLM.from_pretrained(folder), then its own forward step by step: it builds
    the empty past (in the graph's cache type), OPT's position_ids from the mask and feeds
    `present` back itself."""
    import torch

    ort_model_class = _import_optimum()
    model = ort_model_class.from_pretrained(folder, **kwargs)
    assert model.can_use_cache
    ids = torch.tensor([PROMPT])
    mask = torch.ones_like(ids)
    past, tokens = None, []
    for _ in range(NEW_TOKENS):
        out = model(input_ids=ids, attention_mask=mask, past_key_values=past, use_cache=True)
        ids = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(ids))
        past = out.past_key_values
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    return tokens


def test_optimum_loads_the_folder_and_decodes_greedily(stack_dir, hf_greedy):
    assert optimum_greedy(stack_dir) == hf_greedy


def test_optimum_generate(stack_dir, hf_greedy):
    """optimum's generate() goes through transformers' GenerationMixin. optimum-onnx's releases
    (0.1.0: transformers < 4.58) predate transformers 5's renamed generation inputs; where that
    mismatch stops generate() before our graph runs, the test says so and skips."""
    import torch

    ort_model_class = _import_optimum()
    model = ort_model_class.from_pretrained(stack_dir)
    ids = torch.tensor([PROMPT])
    try:
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
        )
    except (AttributeError, ValueError) as exc:
        import transformers

        pytest.skip(
            f"optimum's ORTModelForCausalLM.generate does not run with transformers "
            f"{transformers.__version__} ({type(exc).__name__}: {exc}); its forward is tested above"
        )
    assert out[0, len(PROMPT) :].tolist() == hf_greedy


def genai_greedy(folder) -> list[int]:
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    total = len(PROMPT) + NEW_TOKENS
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([PROMPT], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(PROMPT) :]


def test_onnxruntime_genai_loads_the_folder_and_generates_greedily(stack_dir, hf_greedy):
    assert genai_greedy(stack_dir) == hf_greedy


@pytest.fixture(scope="module")
def int8_greedy(int8_stack_dir) -> list[int]:
    """rptq's own loop on the int8-cache graph: the tokens both stacks must reproduce."""
    from rptq.runtime.decode import DecoderSession, greedy
    from rptq.runtime.ort import make_session

    decoder = DecoderSession(make_session(int8_stack_dir / MODEL_FILE))
    ids, mask = np.array([PROMPT]), np.ones((1, len(PROMPT)), np.int64)
    cache, tokens, step_logits = decoder.empty_cache(1), [], []
    for _ in range(NEW_TOKENS):
        logits, cache = decoder.step(ids, mask, cache)
        step_logits.append(logits[0, -1])
        ids = logits[:, -1:].argmax(-1).astype(np.int64)
        tokens.append(int(ids[0, 0]))
        mask = np.concatenate([mask, np.ones_like(ids)], axis=1)
    # the stacks run the same graph with the same options: only thread scheduling may differ
    assert_decidable(step_logits)
    assert tokens == greedy(decoder, np.array([PROMPT]), None, NEW_TOKENS)[0].tolist()
    return tokens


def test_int8_cache_folder(int8_stack_dir, stack_dir):
    from rptq.runtime.decode import DecoderSession
    from rptq.runtime.ort import make_session
    from rptq.stack_folder import ACCURACY_LEVEL, ACCURACY_LEVEL_KEY

    int8 = DecoderSession(make_session(int8_stack_dir / MODEL_FILE))
    fp32 = DecoderSession(make_session(stack_dir / MODEL_FILE))
    assert int8.cache_dtype == np.int8
    assert 4 * int8.cache_bytes_per_token == fp32.cache_bytes_per_token
    genai = json.loads((int8_stack_dir / GENAI_CONFIG_FILE).read_text())
    assert genai["model"]["decoder"]["session_options"][ACCURACY_LEVEL_KEY] == ACCURACY_LEVEL
    record = json.loads((int8_stack_dir / PLAN_RECORD_FILE).read_text())
    assert record["export"]["kv_cache_dtype"] == "int8"
    assert record["recipe"]["only_quant_kv"]


def test_optimum_runs_the_int8_cache(int8_stack_dir, int8_greedy):
    """optimum makes its empty past as float zeros and casts it to the input's declared type;
    with rptq's session options (MatMulNBits at fp32 activations) it computes the graph's
    arithmetic, so its tokens are rptq's."""
    from rptq.runtime.ort import session_options

    tokens = optimum_greedy(int8_stack_dir, session_options=session_options())
    assert tokens == int8_greedy
    assert len(set(int8_greedy)) >= 8


def test_onnxruntime_genai_runs_the_int8_cache(int8_stack_dir, int8_greedy):
    """genai sizes and types the cache from the graph's inputs; genai_config.json's session
    options keep MatMulNBits at fp32 activations, so its tokens are rptq's."""
    assert genai_greedy(int8_stack_dir) == int8_greedy


def test_prefill_only_folder_has_no_genai_config(gen_model_dir, data_dir, tmp_path):
    """Without a cache no stack can generate with the graph: the folder says so by omission."""
    from rptq.exporter.options import ExportOptions
    from rptq.model.load import load_model
    from rptq.stack_folder import export_folder

    folder = tmp_path / "prefill"
    export_folder(load_model(str(gen_model_dir)), None, folder, ExportOptions(), data_dir)
    assert (folder / MODEL_FILE).is_file()
    assert (folder / CONFIG_FILE).is_file()
    assert not (folder / GENAI_CONFIG_FILE).exists()
    assert json.loads((folder / CONFIG_FILE).read_text())["use_cache"] is False
