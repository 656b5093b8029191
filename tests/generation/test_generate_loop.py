"""`rptq.runtime.generate` on the FP with-past graph: transformers' tokens, eos, timings."""

import numpy as np
import pytest

from rptq.runtime.decode import DecoderSession
from rptq.runtime.generate import generate
from rptq.runtime.ort import make_session
from rptq.runtime.sampling import Sampling
from tests.generation.conftest import NEW_TOKENS, PROMPT


@pytest.fixture(scope="module")
def decoder(stack_dir) -> DecoderSession:
    return DecoderSession(make_session(stack_dir / "model.onnx"))


def test_greedy_equals_transformers_generate(decoder, hf_greedy):
    result = generate(decoder, np.array([PROMPT]), None, NEW_TOKENS)
    assert result.tokens[0].tolist() == hf_greedy
    assert len(set(hf_greedy)) >= 8, "the reference should not be one repeated token"


def test_stops_at_end_of_sequence(decoder, hf_greedy):
    """Declare the 6th greedy token the eos: generation stops right after producing it."""
    eos = hf_greedy[5]
    stop = hf_greedy.index(eos)  # its first occurrence
    result = generate(decoder, np.array([PROMPT]), None, NEW_TOKENS, eos_token_id=eos)
    assert result.stopped_at_eos
    assert result.tokens[0].tolist() == hf_greedy[: stop + 1]


def test_finished_rows_are_padded_with_eos(decoder, hf_greedy):
    """Batch of two: the row that meets eos keeps eos while the other goes on."""
    eos = hf_greedy[5]
    ids = np.array([PROMPT, PROMPT[:1] + PROMPT[2:] + [PROMPT[1]]])
    result = generate(decoder, ids, None, 12, eos_token_id=eos)
    first = result.tokens[0].tolist()
    stop = first.index(eos)
    assert all(t == eos for t in first[stop:])


def test_timings_and_cache_size(decoder):
    result = generate(decoder, np.array([PROMPT]), None, 8)
    assert result.prefill_s > 0
    assert result.decode_s > 0
    assert result.prompt_tokens == len(PROMPT)
    assert result.prefill_tokens_per_s == pytest.approx(len(PROMPT) / result.prefill_s)
    assert result.decode_tokens_per_s == pytest.approx(7 / result.decode_s)
    # keys and values of 2 layers, 4 heads of 16 channels, fp32
    assert result.cache_bytes_per_token == 2 * 2 * 4 * 16 * 4


def test_sampling_is_repeatable_by_seed(decoder):
    def run(seed: int) -> list[int]:
        sampling = Sampling(greedy=False, temperature=1.0, top_p=0.95, seed=seed)
        return generate(decoder, np.array([PROMPT]), None, 16, sampling).tokens[0].tolist()

    assert run(11) == run(11)
    assert run(11) != run(12)
