"""Which text calibration and evaluation read, in the order a new user can count on.

1. `c4-builtin` (the default calibration set) ships inside the package
   (rptq/assets/README.md: 320 C4 documents, ODC-BY), so the headline command runs offline
   with no data directory.
2. A named set (`wikitext2`, `ptb`, `c4`, `mix`; `c4-sample` for calibration) is read from the
   data directory (`--data-dir` / $RPTQ_DATA_DIR) when its file is there (rptq.data, the
   GPTQ/RPTQ protocol).
3. Else through the Hugging Face `datasets` library, the way GPTQ and RPTQ load them, when it is
   installed and the hub is not switched off (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE).
4. Else one `DataError` line naming both fixes.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rptq import data
from rptq.defaults import BUILTIN_CALIB_DATASET, PAPER_NSAMPLES
from rptq.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

BUILTIN = BUILTIN_CALIB_DATASET
BUILTIN_FILE = "c4_calibration_sample.json.gz"
BUILTIN_NOTE = "320 C4 documents shipped with rptq (ODC-BY 1.0, rptq/assets/README.md)"
CALIB_DATASETS: tuple[str, ...] = (BUILTIN, *data.CALIB_DATASETS)

# (path, name, split, column) of each set on the hub, as GPTQ's datautils.py loads them;
# c4's path is the allenai/c4 repository with one json.gz shard as data_files.
_C4_TRAIN = "en/c4-train.00000-of-01024.json.gz"
_C4_VALIDATION = "en/" + Path(data.C4_VALIDATION_SHARD).name
_HUB_SETS: dict[tuple[str, str], tuple[str, str | None, str, str]] = {
    ("wikitext2", "train"): ("wikitext", "wikitext-2-raw-v1", "train", "text"),
    ("wikitext2", "test"): ("wikitext", "wikitext-2-raw-v1", "test", "text"),
    ("ptb", "train"): ("ptb_text_only", "penn_treebank", "train", "sentence"),
    ("ptb", "test"): ("ptb_text_only", "penn_treebank", "validation", "sentence"),
    ("c4", "train"): ("allenai/c4", None, "train", "text"),
    ("c4", "test"): ("allenai/c4", None, "validation", "text"),
}
_HUB_FILES = {("c4", "train"): {"train": _C4_TRAIN}, ("c4", "test"): {"validation": _C4_VALIDATION}}
_DATA_FILES = {"wikitext2": "wikitext2/wiki.train.raw", "ptb": "ptb/ptb.train.txt",
               "c4": "c4/c4-train.00000-of-01024.json.gz"}  # fmt: skip
_EVAL_FILES = {"wikitext2": "wikitext2/wiki.test.raw", "ptb": "ptb/ptb.valid.txt",
               "c4": data.C4_VALIDATION_SHARD}  # fmt: skip


@dataclass(frozen=True)
class CalibrationText:
    """Calibration windows and where their text came from, for the plan print and the summary."""

    windows: torch.Tensor  # LongTensor [nsamples, seq_len]
    source: str  # e.g. "c4-builtin: 320 C4 documents shipped with rptq (...)"
    text_tokens: int  # tokens in the text the windows were drawn from (0: not counted)


def optional_data_dir(arg: str | Path | None) -> Path | None:
    """--data-dir, else $RPTQ_DATA_DIR, else None (the built-in text and the hub need none)."""
    if arg in (None, "") and not os.environ.get(data.DATA_DIR_ENV):
        return None
    return data.resolve_data_dir(arg)


def builtin_documents() -> list[str]:
    """The shipped C4 documents, read from the installed package (works from a wheel)."""
    resource = resources.files("rptq") / "assets" / BUILTIN_FILE
    try:
        with resource.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as handle:
            return [json.loads(line)["text"] for line in handle if line.strip()]
    except (OSError, EOFError, ValueError) as exc:
        raise DataError(
            f"the built-in calibration text {BUILTIN_FILE} is missing or damaged ({exc}): "
            "reinstall rptq"
        ) from exc


def default_nsamples(text_tokens: int, seq_len: int) -> int:
    """RPTQ's 128 windows, capped at the non-overlapping windows the text holds (at least 1):
    more random windows of a small text repeat its tokens and cost time without new data."""
    return max(1, min(PAPER_NSAMPLES, (text_tokens - 1) // seq_len))


def _has_file(data_dir: Path | None, relative: str) -> bool:
    return data_dir is not None and (data_dir / relative).is_file()


def _hub_loader(dataset: str, split: str, data_dir: Path | None) -> Callable[..., Any]:
    """`datasets.load_dataset` when it may be used, else the one-line error naming both fixes."""
    load = load_dataset_function()
    offline = any(
        os.environ.get(name, "0") not in ("0", "", "false", "False")
        for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    )
    if load is not None and not offline:
        return load
    reason = (
        "the datasets library is not installed"
        if load is None
        else "the Hugging Face hub is switched off (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE)"
    )
    raise _missing(dataset, split, data_dir, reason)


def _missing(dataset: str, split: str, data_dir: Path | None, reason: str) -> DataError:
    where = f"in {data_dir}" if data_dir is not None else "in a data directory"
    want = _DATA_FILES[dataset] if split == "train" else _EVAL_FILES[dataset]
    builtin = (
        f" (or leave out --calib-dataset for the built-in {BUILTIN})" if split == "train" else ""
    )
    return DataError(
        f"{dataset} {split} text is not {where} and {reason}: pass --data-dir with {want}, "
        f"or pip install datasets and run online{builtin}"
    )


def _hub_rows(dataset: str, split: str, data_dir: Path | None) -> list[str]:
    """The rows GPTQ's datautils.py gets from `datasets.load_dataset`, or the two-fixes error."""
    load = _hub_loader(dataset, split, data_dir)
    path, name, hub_split, column = _HUB_SETS[(dataset, split)]
    kwargs: dict[str, Any] = {"split": hub_split}
    if (dataset, split) in _HUB_FILES:
        kwargs["data_files"] = _HUB_FILES[(dataset, split)]
    try:
        rows = load(path, name, **kwargs) if name else load(path, **kwargs)
        return [str(row) for row in rows[column]]
    except Exception as exc:  # network, hub and parsing errors all mean "not available"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _missing(
            dataset, split, data_dir, f"datasets.load_dataset({path!r}) failed ({first})"
        ) from exc


def load_dataset_function() -> Callable[..., Any] | None:
    """`datasets.load_dataset`, or None when the library is absent (tests replace this)."""
    try:
        from datasets import load_dataset
    except ImportError:
        return None
    return load_dataset


def _hub_windows(
    dataset: str, tokenizer: PreTrainedTokenizerBase, nsamples: int, seq_len: int, seed: int,
    data_dir: Path | None,
) -> torch.Tensor:  # fmt: skip
    rows = _hub_rows(dataset, "train", data_dir)
    rng = random.Random(seed)
    source = Path(f"hf:{_HUB_SETS[(dataset, 'train')][0]}")
    if dataset == "c4":
        return torch.stack(
            data._draw_document_windows(rows, tokenizer, nsamples, seq_len, rng, source)
        )
    tokens = data._encode(tokenizer, "\n\n".join(rows))
    return data._text_windows(tokens, nsamples, seq_len, rng, source)


def calibration_text(
    dataset: str,
    tokenizer: PreTrainedTokenizerBase,
    nsamples: int | None,
    seq_len: int,
    seed: int,
    data_dir: Path | None,
) -> CalibrationText:
    """[nsamples, seq_len] windows of `dataset` from the first source that has it (module doc).

    `nsamples` None: RPTQ's 128, or for the built-in text what `default_nsamples` allows.
    """
    data._check_seq_len(seq_len)
    if nsamples is not None and nsamples < 1:
        raise DataError(f"nsamples is {nsamples}: use --nsamples 1 or more")
    if dataset == BUILTIN:
        tokens = data._encode(tokenizer, "\n\n".join(builtin_documents()))
        count = nsamples if nsamples is not None else default_nsamples(tokens.numel(), seq_len)
        source = Path(f"rptq/assets/{BUILTIN_FILE}")
        windows = data._text_windows(tokens, count, seq_len, random.Random(seed), source)
        return CalibrationText(windows, f"{BUILTIN}: {BUILTIN_NOTE}", tokens.numel())
    count = nsamples if nsamples is not None else PAPER_NSAMPLES
    if dataset == "mix":
        parts = [(n, c) for n, c in zip(data.MIX_ORDER, data.split_mix(count), strict=True) if c]
        for name, _ in parts:  # every source found before the first (slow) tokenization
            if not _has_file(data_dir, _DATA_FILES[name]):
                _hub_loader(name, "train", data_dir)
        rows = [_one_set(name, tokenizer, c, seq_len, seed, data_dir) for name, c in parts]
        sources = ", ".join(_describe(name, data_dir) for name, _ in parts)
        return CalibrationText(torch.cat(rows), f"mix: {sources}", 0)
    if dataset in _DATA_FILES:
        windows = _one_set(dataset, tokenizer, count, seq_len, seed, data_dir)
    else:  # c4-sample, a .txt file, or an unknown name: rptq.data's checks and errors
        windows = data.calibration_windows(dataset, tokenizer, count, seq_len, seed, data_dir)
    return CalibrationText(windows, _describe(dataset, data_dir), 0)


def _one_set(
    dataset: str, tokenizer: PreTrainedTokenizerBase, nsamples: int, seq_len: int, seed: int,
    data_dir: Path | None,
) -> torch.Tensor:  # fmt: skip
    if _has_file(data_dir, _DATA_FILES[dataset]):
        return data.calibration_windows(dataset, tokenizer, nsamples, seq_len, seed, data_dir)
    return _hub_windows(dataset, tokenizer, nsamples, seq_len, seed, data_dir)


def _describe(dataset: str, data_dir: Path | None) -> str:
    if dataset.lower().endswith(".txt"):
        return f"text file {dataset}"
    if dataset in _DATA_FILES and _has_file(data_dir, _DATA_FILES[dataset]):
        return f"{dataset} from {data_dir} ({_DATA_FILES[dataset]})"
    if dataset == "c4-sample":
        return f"c4-sample from {data_dir}"
    return f"{dataset} from the Hugging Face hub (datasets)"


def eval_text(
    dataset: str, tokenizer: PreTrainedTokenizerBase, data_dir: Path | None, seq_len: int
) -> data.EvalText:
    """The evaluation stream of `dataset` from the data directory, else through `datasets`."""
    if dataset not in data.EVAL_DATASETS:
        raise DataError(
            f"unknown evaluation set {dataset!r}: choose one of {', '.join(data.EVAL_DATASETS)}"
        )
    local = _has_file(data_dir, _EVAL_FILES[dataset]) or (
        dataset == "c4" and _has_file(data_dir, data.C4_SAMPLE)
    )
    if local:
        assert data_dir is not None
        return data.eval_tokens(dataset, tokenizer, data_dir, seq_len)
    data._check_seq_len(seq_len)
    rows = _hub_rows(dataset, "test", data_dir)
    source = Path(f"hf:{_HUB_SETS[(dataset, 'test')][0]}")
    if dataset == "c4":
        rng = random.Random(data.C4_EVAL_SEED)
        windows = data._draw_document_windows(
            rows, tokenizer, data.C4_EVAL_DRAWS, seq_len, rng, source
        )
        return data.EvalText(dataset, torch.cat(windows), source)
    if dataset == "wikitext2":
        # the hub's rows are what rptq.data rebuilds from wiki.test.raw (blank rows are "")
        rows = [row if row.strip() else "" for row in rows]
    return data.EvalText(dataset, data._encode(tokenizer, "\n\n".join(rows)), source)
