"""Eval text and calibration windows: paper token counts on the staged data, draws, errors."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import torch

from rptq import data
from rptq.data import (
    EvalText,
    calibration_windows,
    eval_tokens,
    eval_windows,
    load_tokenizer,
    resolve_data_dir,
    split_mix,
)
from rptq.errors import DataError

# SOURCES.md: HF wikitext-2-raw-v1 test rows joined with "\n\n" -> 287,644 BPE tokens + one BOS.
WIKITEXT2_TEST_TOKENS = 287_645
# ptb_text_only validation rows (stripped) joined with "\n\n", OPT hub special tokens ("<unk>" is
# plain text, split into "<", "unk", ">"). Pinned so a tokenizer change cannot slip through.
PTB_VALID_TOKENS = 93_213

WORDS = ("the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be")


def one_line_error(excinfo: pytest.ExceptionInfo[DataError]) -> str:
    message = str(excinfo.value)
    assert message
    assert "\n" not in message
    return message


def make_text(words: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(max(1, words // 12)):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(12)))
    return " .\n".join(lines) + "\n"


def write_jsonl_gz(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text, "url": "x", "timestamp": "2019-04-01"}) + "\n")


@pytest.fixture(scope="module")
def tokenizer(data_dir: Path):
    return load_tokenizer(None, data_dir)


@pytest.fixture(scope="module")
def wikitext2(tokenizer, data_dir: Path) -> EvalText:
    return eval_tokens("wikitext2", tokenizer, data_dir, 2048)


@pytest.fixture(scope="module")
def c4_eval(tokenizer, data_dir: Path) -> EvalText:
    return eval_tokens("c4", tokenizer, data_dir, 2048)


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory with small synthetic train files for every named calibration set."""
    root = tmp_path_factory.mktemp("fake_data")
    (root / "wikitext2").mkdir()
    (root / "wikitext2" / "wiki.train.raw").write_text(
        " \n = Title = \n \n" + make_text(600, 1), encoding="utf-8"
    )
    (root / "ptb").mkdir()
    (root / "ptb" / "ptb.train.txt").write_text(make_text(600, 2), encoding="utf-8")
    docs = [make_text(n, 10 + n) for n in (5, 40, 8, 100, 3, 60)]
    write_jsonl_gz(root / "c4" / "c4-train.00000-of-01024.json.gz", docs)
    write_jsonl_gz(root / "c4" / "c4-validation.00000-of-00008.json.gz", docs)
    return root


# --- data directory and tokenizer -------------------------------------------------------------


def test_resolve_data_dir_prefers_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    other = tmp_path / "env"
    other.mkdir()
    monkeypatch.setenv("RPTQ_DATA_DIR", str(other))
    assert resolve_data_dir(tmp_path) == tmp_path
    assert resolve_data_dir(str(tmp_path)) == tmp_path
    assert resolve_data_dir(None) == other


def test_resolve_data_dir_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("RPTQ_DATA_DIR", raising=False)
    with pytest.raises(DataError) as excinfo:
        resolve_data_dir(None)
    assert "--data-dir" in one_line_error(excinfo)
    with pytest.raises(DataError) as excinfo:
        resolve_data_dir(tmp_path / "absent")
    assert str(tmp_path / "absent") in one_line_error(excinfo)


def test_opt_tokenizer_matches_hub_ids(tokenizer):
    ids = tokenizer("Hello world! cécé herlolip")["input_ids"]
    assert ids == [2, 31414, 232, 328, 740, 1140, 12695, 69, 46078, 1588]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 2, 1)


def test_tokenizer_from_model_dir_wins(tokenizer, tmp_path: Path):
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path, None)
    assert loaded("Hello world")["input_ids"] == [2, 31414, 232]


def test_model_dir_without_tokenizer_falls_back(tmp_path: Path, data_dir: Path):
    loaded = load_tokenizer(tmp_path, data_dir)
    assert loaded("Hello")["input_ids"] == [2, 31414]


def test_no_tokenizer_anywhere(tmp_path: Path):
    with pytest.raises(DataError) as excinfo:
        load_tokenizer(tmp_path / "model", tmp_path / "data")
    message = one_line_error(excinfo)
    assert str(tmp_path / "model") in message
    assert str(tmp_path / "data" / "tokenizers" / "opt") in message


# --- evaluation text --------------------------------------------------------------------------


def test_wikitext2_rows_match_hf(data_dir: Path):
    rows = data._wikitext_rows(data_dir / "wikitext2" / "wiki.test.raw")
    assert len(rows) == 4358
    assert len("\n\n".join(rows)) == 1_294_336


def test_wikitext2_token_count(wikitext2: EvalText):
    assert wikitext2.tokens.dtype == torch.long
    assert wikitext2.tokens.numel() == WIKITEXT2_TEST_TOKENS
    assert int((wikitext2.tokens == 2).sum()) == 1  # one BOS, at the very start
    assert int(wikitext2.tokens[0]) == 2
    assert eval_windows(wikitext2.tokens, 2048).shape == (140, 2048)
    assert wikitext2.note == ""


def test_ptb_valid(tokenizer, data_dir: Path):
    rows = data._ptb_rows(data_dir / "ptb" / "ptb.valid.txt")
    assert len(rows) == 3370
    assert not any(row.startswith(" ") for row in rows)
    text = eval_tokens("ptb", tokenizer, data_dir, 2048)
    assert text.tokens.numel() == PTB_VALID_TOKENS
    assert int(text.tokens[0]) == 2
    assert int((text.tokens == 3).sum()) == 0  # "<unk>" stays text, as with the hub tokenizer


def test_c4_eval_on_staged_sample(c4_eval: EvalText, data_dir: Path):
    assert c4_eval.tokens.shape == (256 * 2048,)
    assert c4_eval.source == data_dir / "c4" / "c4_validation_2k.json.gz"
    assert "sample" in c4_eval.note
    assert "\n" not in c4_eval.note


def test_c4_eval_is_seed_fixed(tokenizer, data_dir: Path):
    state = random.getstate()
    first = eval_tokens("c4", tokenizer, data_dir, 64).tokens
    random.seed(12345)
    second = eval_tokens("c4", tokenizer, data_dir, 64).tokens
    random.setstate(state)
    assert torch.equal(first, second)
    assert first.numel() == 256 * 64


def test_c4_eval_prefers_paper_shard(tokenizer, fake_dir: Path):
    text = eval_tokens("c4", tokenizer, fake_dir, 16)
    assert text.source.name == "c4-validation.00000-of-00008.json.gz"
    assert text.note == ""
    assert text.tokens.numel() == 256 * 16


def test_eval_errors(tokenizer, tmp_path: Path, data_dir: Path):
    with pytest.raises(DataError) as excinfo:
        eval_tokens("lambada", tokenizer, data_dir, 2048)
    assert "wikitext2, ptb, c4" in one_line_error(excinfo)
    for name, expected in (("wikitext2", "wiki.test.raw"), ("ptb", "ptb.valid.txt")):
        with pytest.raises(DataError) as excinfo:
            eval_tokens(name, tokenizer, tmp_path, 2048)
        assert expected in one_line_error(excinfo)
    with pytest.raises(DataError) as excinfo:
        eval_tokens("c4", tokenizer, tmp_path, 2048)
    assert "c4_validation_2k.json.gz" in one_line_error(excinfo)


def test_eval_windows_too_short():
    with pytest.raises(DataError) as excinfo:
        eval_windows(torch.arange(10), 16)
    assert "10 tokens" in one_line_error(excinfo)


# --- calibration ------------------------------------------------------------------------------


def test_c4_sample_calibration_is_deterministic(tokenizer, data_dir: Path):
    state = random.getstate()
    first = calibration_windows("c4-sample", tokenizer, 4, 512, 0, data_dir)
    again = calibration_windows("c4-sample", tokenizer, 4, 512, 0, data_dir)
    other = calibration_windows("c4-sample", tokenizer, 4, 512, 1, data_dir)
    assert random.getstate() == state  # the global generator is never touched
    assert first.shape == (4, 512)
    assert first.dtype == torch.long
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_txt_calibration_windows_are_slices(tokenizer, tmp_path: Path):
    path = tmp_path / "calib.txt"
    text = make_text(1200, 5)
    path.write_text(text, encoding="utf-8")
    first = calibration_windows(str(path), tokenizer, 6, 32, 0, None)
    assert first.shape == (6, 32)
    assert torch.equal(first, calibration_windows(str(path), tokenizer, 6, 32, 0, None))
    assert not torch.equal(first, calibration_windows(str(path), tokenizer, 6, 32, 1, None))
    full = torch.tensor(tokenizer(text)["input_ids"])
    candidates = full.unfold(0, 32, 1)
    for row in first:
        assert bool((candidates == row).all(dim=1).any())


def test_mix_split_fills_every_row():
    assert split_mix(128) == (43, 43, 42)
    assert split_mix(126) == (42, 42, 42)
    assert split_mix(2) == (1, 1, 0)
    assert all(sum(split_mix(n)) == n for n in range(1, 20))


def test_mix_reseeds_each_set_in_order(tokenizer, fake_dir: Path):
    mixed = calibration_windows("mix", tokenizer, 5, 16, 3, fake_dir)
    assert mixed.shape == (5, 16)
    wiki = calibration_windows("wikitext2", tokenizer, 2, 16, 3, fake_dir)
    ptb = calibration_windows("ptb", tokenizer, 2, 16, 3, fake_dir)
    c4 = calibration_windows("c4", tokenizer, 1, 16, 3, fake_dir)
    assert torch.equal(mixed, torch.cat([wiki, ptb, c4]))


def test_calibration_unknown_and_missing(tokenizer, tmp_path: Path):
    with pytest.raises(DataError) as excinfo:
        calibration_windows("pile", tokenizer, 4, 16, 0, tmp_path)
    message = one_line_error(excinfo)
    assert "mix" in message
    assert ".txt" in message
    expected = {
        "wikitext2": "wiki.train.raw",
        "ptb": "ptb.train.txt",
        "c4": "c4-train.00000-of-01024.json.gz",
        "c4-sample": "c4_validation_2k.json.gz",
        "mix": "wiki.train.raw",
    }
    for name, filename in expected.items():
        with pytest.raises(DataError) as excinfo:
            calibration_windows(name, tokenizer, 4, 16, 0, tmp_path)
        message = one_line_error(excinfo)
        assert filename in message
        assert str(tmp_path) in message
    with pytest.raises(DataError) as excinfo:
        calibration_windows("wikitext2", tokenizer, 4, 16, 0, None)
    assert "--data-dir" in one_line_error(excinfo)
    with pytest.raises(DataError) as excinfo:
        calibration_windows(str(tmp_path / "absent.txt"), tokenizer, 4, 16, 0, None)
    assert "absent.txt" in one_line_error(excinfo)


def test_calibration_bad_text(tokenizer, tmp_path: Path):
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n", encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        calibration_windows(str(empty), tokenizer, 4, 16, 0, None)
    assert "empty" in one_line_error(excinfo)
    short = tmp_path / "short.txt"
    short.write_text("the of and to in", encoding="utf-8")  # BOS + 5 tokens
    with pytest.raises(DataError) as excinfo:
        calibration_windows(str(short), tokenizer, 4, 2048, 0, None)
    message = one_line_error(excinfo)
    assert "6 tokens" in message
    assert "2049" in message
    assert "--seq-len" in message
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    with pytest.raises(DataError) as excinfo:
        calibration_windows(str(latin1), tokenizer, 4, 16, 0, None)
    assert "UTF-8" in one_line_error(excinfo)


def test_calibration_nsamples_and_seq_len(tokenizer, tmp_path: Path):
    with pytest.raises(DataError) as excinfo:
        calibration_windows("c4-sample", tokenizer, 0, 16, 0, tmp_path)
    assert "nsamples" in one_line_error(excinfo)
    with pytest.raises(DataError) as excinfo:
        calibration_windows("c4-sample", tokenizer, 4, 1, 0, tmp_path)
    assert "--seq-len" in one_line_error(excinfo)


def test_documents_too_short(tokenizer, tmp_path: Path):
    path = tmp_path / "c4" / "c4_validation_2k.json.gz"
    write_jsonl_gz(path, ["short text", "another one"])
    with pytest.raises(DataError) as excinfo:  # caught by the byte bound, nothing tokenized
        calibration_windows("c4-sample", tokenizer, 2, 64, 0, tmp_path)
    assert "--seq-len" in one_line_error(excinfo)
    write_jsonl_gz(path, ["a" * 200, "b" * 150])  # enough bytes, too few BPE tokens
    with pytest.raises(DataError) as excinfo:
        calibration_windows("c4-sample", tokenizer, 2, 100, 0, tmp_path)
    assert "more than 100 tokens" in one_line_error(excinfo)


def test_bad_json_line(tokenizer, tmp_path: Path):
    path = tmp_path / "c4" / "c4_validation_2k.json.gz"
    path.parent.mkdir()
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write('{"text": "fine"}\n{"body": "no text key"}\n')
    with pytest.raises(DataError) as excinfo:
        calibration_windows("c4-sample", tokenizer, 2, 16, 0, tmp_path)
    assert "line 2" in one_line_error(excinfo)
