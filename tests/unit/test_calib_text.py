"""Where calibration and evaluation text comes from: the built-in sample, --data-dir, the
`datasets` library (a stand-in loader here: tests never download), else one error naming both
fixes."""

from __future__ import annotations

import pytest

from rptq import calib_text
from rptq.calib_text import BUILTIN, calibration_text, eval_text
from rptq.errors import DataError

WORDS = " ".join(f"word{i} and more text" for i in range(400))


class FakeDatasets:
    """`datasets.load_dataset` for the calls GPTQ's datautils makes; records each call."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, path, name=None, **kwargs):
        self.calls.append((path, name, kwargs))
        column = "sentence" if path == "ptb_text_only" else "text"
        return {column: [WORDS, "", WORDS.upper()]}


@pytest.fixture
def tokenizer(data_dir):
    from rptq.data import load_tokenizer

    return load_tokenizer(None, data_dir)


@pytest.fixture
def online(monkeypatch):
    fake = FakeDatasets()
    monkeypatch.setattr(calib_text, "load_dataset_function", lambda: fake)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return fake


def test_builtin_text_needs_no_data_directory(tokenizer):
    text = calibration_text(BUILTIN, tokenizer, None, 2048, seed=2, data_dir=None)
    assert tuple(text.windows.shape) == (76, 2048)  # 156,314 tokens hold 76 such windows
    assert text.text_tokens == 156_314
    again = calibration_text(BUILTIN, tokenizer, 3, 64, seed=2, data_dir=None)
    assert tuple(again.windows.shape) == (3, 64)


@pytest.mark.parametrize(("dataset", "hub"), [("wikitext2", "wikitext"), ("ptb", "ptb_text_only")])
def test_named_set_missing_from_data_dir_comes_from_datasets(tokenizer, online, dataset, hub):
    text = calibration_text(dataset, tokenizer, 4, 32, seed=0, data_dir=None)
    assert tuple(text.windows.shape) == (4, 32)
    assert online.calls[0][0] == hub
    assert online.calls[0][2]["split"] == "train"
    assert "Hugging Face hub" in text.source


def test_c4_from_datasets_uses_the_papers_shard(tokenizer, online):
    calibration_text("c4", tokenizer, 2, 32, seed=0, data_dir=None)
    path, _, kwargs = online.calls[0]
    assert path == "allenai/c4"
    assert kwargs["data_files"] == {"train": "en/c4-train.00000-of-01024.json.gz"}


def test_data_dir_wins_over_datasets(tokenizer, online, data_dir):
    """c4-sample and ptb eval are staged: no load_dataset call at all."""
    calibration_text("c4-sample", tokenizer, 2, 32, seed=0, data_dir=data_dir)
    eval_text("ptb", tokenizer, data_dir, 2048)
    assert online.calls == []


def test_eval_falls_back_to_datasets(tokenizer, online, tmp_path):
    text = eval_text("wikitext2", tokenizer, tmp_path, 64)
    assert online.calls[0][:2] == ("wikitext", "wikitext-2-raw-v1")
    assert online.calls[0][2]["split"] == "test"
    assert text.tokens.numel() > 64


def test_mix_takes_each_part_from_where_it_is(tokenizer, online):
    text = calibration_text("mix", tokenizer, 6, 32, seed=0, data_dir=None)
    assert tuple(text.windows.shape) == (6, 32)
    assert [call[0] for call in online.calls] == ["wikitext", "ptb_text_only", "allenai/c4"]


def test_without_datasets_the_error_names_both_fixes(tokenizer, monkeypatch, tmp_path):
    monkeypatch.setattr(calib_text, "load_dataset_function", lambda: None)
    with pytest.raises(DataError) as info:
        calibration_text("ptb", tokenizer, 4, 32, seed=0, data_dir=tmp_path)
    assert str(info.value) == (
        f"ptb train text is not in {tmp_path} and the datasets library is not installed: pass "
        "--data-dir with ptb/ptb.train.txt, or pip install datasets and run online (or leave "
        "out --calib-dataset for the built-in c4-builtin)"
    )


def test_offline_hub_is_not_tried(tokenizer, monkeypatch):
    fake = FakeDatasets()
    monkeypatch.setattr(calib_text, "load_dataset_function", lambda: fake)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="switched off"):
        eval_text("c4", tokenizer, None, 64)
    assert fake.calls == []


def test_a_failing_download_is_one_line(tokenizer, monkeypatch):
    def broken(*args, **kwargs):
        raise ConnectionError(
            "Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)\nmore"
        )

    monkeypatch.setattr(calib_text, "load_dataset_function", lambda: broken)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(DataError) as info:
        calibration_text("wikitext2", tokenizer, 4, 32, seed=0, data_dir=None)
    message = str(info.value)
    assert "\n" not in message
    assert "datasets.load_dataset('wikitext') failed (Couldn't reach" in message
    assert message.endswith("or pip install datasets and run online (or leave out "
                            "--calib-dataset for the built-in c4-builtin)")  # fmt: skip
