"""A tiny OPT with OPT's vocabulary on disk and its inference-stack folder (with-past graph)."""

from pathlib import Path

import pytest

# prompt token ids (BOS first); with weight_std 0.2 the tiny model's greedy continuation visits
# about twenty distinct tokens in 32 steps, so a cache bug shows as a different token early
PROMPT = [2, 100, 200, 300, 400, 500, 600, 700]
NEW_TOKENS = 32


@pytest.fixture(scope="session")
def gen_model_dir(tmp_path_factory) -> Path:
    from rptq.tiny import make_tiny_opt

    path = tmp_path_factory.mktemp("gen-models") / "tiny-opt"
    make_tiny_opt(vocab_size=50272, max_positions=256, weight_std=0.2).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def gen_hf_model(gen_model_dir):
    from transformers import OPTForCausalLM

    return OPTForCausalLM.from_pretrained(gen_model_dir).eval()


def assert_decidable(step_logits) -> None:
    """Token equality is a fair test only where no step is a near-tie: the graph's logits differ
    from the reference's by float reassociation (tests/tolerances.py, INCREMENTAL_FP32_*), so
    the arg-max agrees on every CPU when the top-2 gap exceeds twice that bound."""
    import numpy as np

    from tests.tolerances import INCREMENTAL_FP32_ATOL, INCREMENTAL_FP32_RTOL

    for step, logits in enumerate(step_logits):
        row = np.asarray(logits, dtype=np.float64).ravel()
        top2 = np.sort(row)[-2:]
        bound = INCREMENTAL_FP32_ATOL + INCREMENTAL_FP32_RTOL * float(np.abs(row).max())
        assert top2[1] - top2[0] > 2 * bound, f"step {step}: top-2 gap {top2[1] - top2[0]:.2e}"


@pytest.fixture(scope="session")
def hf_greedy(gen_hf_model) -> list[int]:
    """transformers' own greedy continuation of PROMPT (the reference every client matches)."""
    import torch

    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        out = gen_hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,  # no stop at eos: fixed-length runs compare token by token
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert_decidable([step[0].numpy() for step in out.logits])
    return out.sequences[0, len(PROMPT) :].tolist()


@pytest.fixture(scope="session")
def stack_dir(gen_model_dir, data_dir, tmp_path_factory) -> Path:
    """`export -o DIR/` of the FP with-past graph, as the CLI writes it."""
    from rptq.exporter.options import ExportOptions
    from rptq.model.load import load_model
    from rptq.stack_folder import export_folder

    folder = tmp_path_factory.mktemp("stack") / "out"
    export_folder(load_model(str(gen_model_dir)), None, folder, ExportOptions(past=True), data_dir)
    return folder


@pytest.fixture(scope="session")
def kv_plan(gen_model_dir):
    """A W4A4KV plan of the tiny model (K/V at 4 bits: what the integer cache stores)."""
    import torch

    from rptq.calib.runner import calibrate
    from rptq.model.load import load_model
    from rptq.plan import Recipe

    windows = torch.randint(3, 50272, (8, 64), generator=torch.Generator().manual_seed(1))
    recipe = Recipe(
        wbits=4,
        abits=4,
        only_quant_kv=True,
        nsamples=8,
        seq_len=64,
        calib_dataset="random",
        act_metric="ema_minmax",
        clusters={"R1": 8, "R2": 4, "R3": 4, "R4": 8, "R5": 16},
    )
    return calibrate(load_model(str(gen_model_dir)), windows, recipe)


@pytest.fixture(scope="session")
def int8_stack_dir(gen_model_dir, kv_plan, data_dir, tmp_path_factory) -> Path:
    """The W4A4KV with-past graph with an int8 cache (the plan's K/V codes), as a folder."""
    from rptq.exporter.options import ExportOptions
    from rptq.model.load import load_model
    from rptq.stack_folder import export_folder

    folder = tmp_path_factory.mktemp("stack-int8") / "out"
    options = ExportOptions(past=True, kv_cache_dtype="int8")
    export_folder(load_model(str(gen_model_dir)), kv_plan, folder, options, data_dir)
    return folder
