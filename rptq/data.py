"""Evaluation text and calibration windows, tokenized the way GPTQ and RPTQ do it.

Perplexities are only comparable with the papers if the text, the joins, the tokenizer and the
random draws match theirs exactly (docs/algorithms.md in ../shared/docs, sections 2.1 and 4;
../shared/data/SOURCES.md for the files). Everything is read from a local data directory, never
from the network, and nothing is cached on disk: the reference code's seed-less /tmp cache is a
reproducibility hazard we do not copy.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rptq.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_LOG = logging.getLogger(__name__)

EVAL_DATASETS: tuple[str, ...] = ("wikitext2", "ptb", "c4")
CALIB_DATASETS: tuple[str, ...] = ("wikitext2", "ptb", "c4", "mix", "c4-sample")
DATASETS = EVAL_DATASETS
MIX_ORDER: tuple[str, ...] = ("wikitext2", "ptb", "c4")

DATA_DIR_ENV = "RPTQ_DATA_DIR"
C4_EVAL_SEED = 0  # GPTQ/RPTQ fix random.seed(0) for the C4 eval, whatever --seed says
C4_EVAL_DRAWS = 256

_EVAL_FILES: dict[str, str] = {
    "wikitext2": "wikitext2/wiki.test.raw",
    "ptb": "ptb/ptb.valid.txt",
}
C4_VALIDATION_SHARD = "c4/c4-validation.00000-of-00008.json.gz"
C4_SAMPLE = "c4/c4_validation_2k.json.gz"
_CALIB_FILES: dict[str, str] = {
    "wikitext2": "wikitext2/wiki.train.raw",
    "ptb": "ptb/ptb.train.txt",
    "c4": "c4/c4-train.00000-of-01024.json.gz",
    "c4-sample": C4_SAMPLE,
}
_TOKENIZER_SUBDIR = "tokenizers/opt"
_BPE_FILES = ("vocab.json", "merges.txt")

# OPT's hub tokenizer (facebook/opt-*, special_tokens_map.json) sets bos = eos = unk = "</s>" and
# pad = "<pad>". "<unk>" (id 3) is in the vocabulary but is NOT a special token there, so a
# literal "<unk>" in PTB text is split into BPE pieces, exactly as in GPTQ's evaluation.
# Registering "<unk>" as unk_token would turn it into id 3 and shrink PTB valid by 3,747 tokens.
_OPT_BOS = "</s>"
_OPT_PAD = "<pad>"
_OPT_BOS_ID = 2
_MAX_ADDED_TOKENS = 4


@dataclass(frozen=True, eq=False, slots=True)
class EvalText:
    """One evaluation text as a single token stream, with where it came from.

    `note` says when the text is not the paper's (the staged C4 sample), so reports can carry it.
    """

    name: str
    tokens: torch.Tensor  # LongTensor [n_tokens], starts with the tokenizer's BOS
    source: Path
    note: str = ""


def resolve_data_dir(arg: str | Path | None) -> Path:
    """The data directory: the argument, else $RPTQ_DATA_DIR; it must exist.

    The CLI's --data-dir and the environment variable are the only two ways in, so a missing
    directory is reported once here instead of as a confusing missing-file error later.
    """
    raw = arg if arg not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    if raw is None:
        raise DataError(f"no data directory: pass --data-dir or set {DATA_DIR_ENV}")
    path = Path(raw).expanduser()
    if not path.is_dir():
        raise DataError(
            f"data directory {path} does not exist: pass --data-dir or set {DATA_DIR_ENV} "
            "to the folder that holds wikitext2/, ptb/, c4/ and tokenizers/"
        )
    return path


def _has_tokenizer_files(folder: Path) -> bool:
    if (folder / "tokenizer.json").is_file():
        return True
    return all((folder / name).is_file() for name in _BPE_FILES)


def load_tokenizer(model_dir: Path | None, data_dir: Path | None) -> PreTrainedTokenizerBase:
    """The model's own tokenizer if its folder has one, else OPT's, built from the staged BPE files.

    The fallback exists because no OPT checkpoint can be downloaded here; it reproduces the hub
    tokenizer (same vocabulary, GPT-2 merges, one "</s>" BOS prepended per encoded text).
    """
    # transformers 5 keeps GPT2TokenizerFast only as a runtime alias (absent from its typed
    # exports); 4.x needs it by that name, so the import stays and mypy is told why
    from transformers import AutoTokenizer, GPT2TokenizerFast  # type: ignore[attr-defined]

    if model_dir is not None and _has_tokenizer_files(Path(model_dir)):
        try:
            return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        except (OSError, ValueError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(
                f"cannot load the tokenizer in {model_dir} ({reason}): "
                "fix or remove its tokenizer files"
            ) from exc
    bpe_dir = Path(data_dir) / _TOKENIZER_SUBDIR if data_dir is not None else None
    if bpe_dir is None or not all((bpe_dir / name).is_file() for name in _BPE_FILES):
        in_model = f"{model_dir}" if model_dir is not None else "(no model directory given)"
        in_data = f"{bpe_dir}" if bpe_dir is not None else "(no data directory given)"
        raise DataError(
            f"no tokenizer found: looked for tokenizer.json or vocab.json+merges.txt in "
            f"{in_model} and for vocab.json+merges.txt in {in_data}; pass a model directory "
            f"with tokenizer files or --data-dir"
        )
    from tokenizers import processors

    tokenizer = GPT2TokenizerFast.from_pretrained(
        str(bpe_dir),
        local_files_only=True,
        bos_token=_OPT_BOS,
        eos_token=_OPT_BOS,
        unk_token=_OPT_BOS,
        pad_token=_OPT_PAD,
        add_bos_token=True,
        add_prefix_space=False,
    )
    # transformers 4.x and 5.x honour add_bos_token differently on the fast GPT-2 class, so OPT's
    # rule (prepend "</s>" once per text) is installed on the Rust post-processor directly.
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{_OPT_BOS} $A",
        pair=f"{_OPT_BOS} $A {_OPT_BOS} $B",
        special_tokens=[(_OPT_BOS, _OPT_BOS_ID)],
    )
    assert tokenizer.convert_tokens_to_ids(_OPT_BOS) == _OPT_BOS_ID, "staged OPT vocab is broken"
    return tokenizer


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    # verbose=False: texts are longer than model_max_length on purpose (they are cut into
    # windows later), so transformers' "sequence length is longer" warning is noise here.
    ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason}): convert it to UTF-8") from exc
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror}): check the file") from exc


def _wikitext_rows(path: Path) -> list[str]:
    """The rows of HF `wikitext-2-raw-v1` (blank lines become "" and keep no newline)."""
    text = _read_text(path)
    return [line if line.strip() else "" for line in text.splitlines(keepends=True)]


def _ptb_rows(path: Path) -> list[str]:
    r"""The rows of HF `ptb_text_only`: its loader strips each line, so no leading space remains.

    Mikolov's files start every line with a space; HF's `_generate_examples` yields
    `line.strip()` (leading and trailing space gone), and GPTQ joins those rows with "\n\n".
    Keeping the spaces changes the BPE at every sentence boundary (ptb.valid: 92,830 tokens
    instead of 93,213), so the strip is part of the protocol.
    """
    # StringIO splits on "\n" only, as iterating the file does (str.splitlines would also split
    # on \x0b, \x1c and friends).
    return [line.strip() for line in io.StringIO(_read_text(path))]


def _read_documents(path: Path) -> list[str]:
    """The "text" field of each JSON line of a (gzipped) C4-style file, in file order."""
    opener = gzip.open if path.suffix == ".gz" else open
    docs: list[str] = []
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise DataError(
                        f"{path} line {number} is not a JSON object with a 'text' field: "
                        "give C4-style JSON lines"
                    ) from exc
                docs.append(str(text))
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot read {path} ({reason}): re-copy the file") from exc
    if not docs:
        raise DataError(f"{path} holds no documents: give a non-empty JSON-lines file")
    return docs


def _require_file(data_dir: Path, relative: str, what: str) -> Path:
    path = data_dir / relative
    if not path.is_file():
        raise DataError(
            f"{what} needs {Path(relative).name} in {path.parent}, which is missing: "
            f"copy it there or choose another dataset"
        )
    return path


def _check_seq_len(seq_len: int) -> None:
    if seq_len < 2:
        raise DataError(f"seq_len is {seq_len}: use --seq-len 2 or more")


def _draw_document_windows(
    docs: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    count: int,
    seq_len: int,
    rng: random.Random,
    source: Path,
) -> list[torch.Tensor]:
    """GPTQ's C4 loop: draw random documents until one is long enough, then a random window.

    GPTQ accepts a document of exactly seq_len tokens and then crashes in
    `randint(0, len - seq_len - 1)`; requiring seq_len + 1 tokens gives the same draws in every
    case where the reference finishes. Tokenizations are memoised for the call only.
    """
    longest_bytes = max(len(doc.encode("utf-8")) for doc in docs)
    # Fast refusal without tokenizing: every token covers at least one byte, and tokenizers add
    # at most a few special tokens (OPT: one BOS). The loop below still guards the exact case.
    if longest_bytes + _MAX_ADDED_TOKENS <= seq_len:
        raise DataError(
            f"no document in {source} can hold a {seq_len + 1}-token window (the longest has "
            f"{longest_bytes} bytes): use a smaller --seq-len or a larger document set"
        )
    long_docs: dict[int, torch.Tensor] = {}
    short_docs: set[int] = set()
    longest_tokens = 0
    windows: list[torch.Tensor] = []
    for _ in range(count):
        while True:
            index = rng.randint(0, len(docs) - 1)
            if index in long_docs:
                tokens = long_docs[index]
                break
            if index in short_docs:
                continue
            tokens = _encode(tokenizer, docs[index])
            if tokens.numel() > seq_len:
                long_docs[index] = tokens
                break
            short_docs.add(index)
            longest_tokens = max(longest_tokens, tokens.numel())
            if len(short_docs) == len(docs):
                raise DataError(
                    f"no document in {source} has more than {seq_len} tokens (the longest has "
                    f"{longest_tokens}): use a smaller --seq-len or a larger document set"
                )
        start = rng.randint(0, tokens.numel() - seq_len - 1)
        windows.append(tokens[start : start + seq_len])
    _LOG.debug("%d windows from %d distinct documents of %s", count, len(long_docs), source)
    return windows


def eval_tokens(
    dataset: str, tokenizer: PreTrainedTokenizerBase, data_dir: Path, seq_len: int
) -> EvalText:
    r"""The evaluation token stream of the GPTQ/RPTQ "original" protocol (algorithms.md section 4).

    wikitext2: wikitext-2-raw-v1 test rows joined with "\n\n", tokenized once (one BOS).
    ptb: ptb_text_only validation rows (stripped, see `_ptb_rows`) joined with "\n\n".
    c4: 256 random seq_len windows of random long-enough validation documents, random.seed(0),
    concatenated; `seq_len` matters only here. The paper's shard is used when present, else the
    staged 2,000-document sample, and `note` says so because the two are not comparable.
    """
    if dataset not in EVAL_DATASETS:
        raise DataError(
            f"unknown evaluation set {dataset!r}: choose one of {', '.join(EVAL_DATASETS)}"
        )
    _check_seq_len(seq_len)
    data_dir = Path(data_dir)
    started = time.perf_counter()
    note = ""
    if dataset == "c4":
        source = data_dir / C4_VALIDATION_SHARD
        if not source.is_file():
            source = data_dir / C4_SAMPLE
            note = (
                "C4 from the staged 2,000-document validation sample, not the paper's "
                "en/c4-validation.00000-of-00008 shard: comparable only with runs on the sample"
            )
        if not source.is_file():
            raise DataError(
                f"c4 evaluation needs {Path(C4_VALIDATION_SHARD).name} or "
                f"{Path(C4_SAMPLE).name} in {source.parent}, both missing: copy one there"
            )
        docs = _read_documents(source)
        rng = random.Random(C4_EVAL_SEED)
        windows = _draw_document_windows(docs, tokenizer, C4_EVAL_DRAWS, seq_len, rng, source)
        tokens = torch.cat(windows)
    else:
        source = _require_file(data_dir, _EVAL_FILES[dataset], f"{dataset} evaluation")
        rows = _wikitext_rows(source) if dataset == "wikitext2" else _ptb_rows(source)
        text = "\n\n".join(rows)
        if not text.strip():
            raise DataError(f"{source} is empty: re-copy the {dataset} file")
        tokens = _encode(tokenizer, text)
    _LOG.info(
        "%s eval text: %d tokens from %s in %.1f s",
        dataset,
        tokens.numel(),
        source,
        time.perf_counter() - started,
    )
    return EvalText(name=dataset, tokens=tokens, source=source, note=note)


def eval_windows(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping [n, seq_len] windows; a tail shorter than seq_len is dropped (section 4)."""
    _check_seq_len(seq_len)
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    count = tokens.numel() // seq_len
    if count == 0:
        raise DataError(
            f"the evaluation text has {tokens.numel()} tokens, fewer than one {seq_len}-token "
            "window: use a smaller --seq-len or a longer text"
        )
    return tokens[: count * seq_len].view(count, seq_len)


def split_mix(nsamples: int) -> tuple[int, ...]:
    """Rows per MIX_ORDER set: nsamples // 3 each, the remainder to the first sets.

    RPTQ takes nsamples // 3 from each and leaves the rest of its buffer as all-zero rows
    (algorithms.md section 2.1); we fill exactly nsamples rows instead.
    """
    base, extra = divmod(nsamples, len(MIX_ORDER))
    return tuple(base + (1 if i < extra else 0) for i in range(len(MIX_ORDER)))


def _text_windows(
    tokens: torch.Tensor, nsamples: int, seq_len: int, rng: random.Random, source: Path
) -> torch.Tensor:
    """GPTQ's wikitext2/ptb loop: a uniform start in [0, L - seq_len - 1] per sample."""
    if tokens.numel() < seq_len + 1:
        raise DataError(
            f"{source} has {tokens.numel()} tokens but a {seq_len}-token window needs "
            f"{seq_len + 1}: use a longer text or a smaller --seq-len"
        )
    starts = [rng.randint(0, tokens.numel() - seq_len - 1) for _ in range(nsamples)]
    return torch.stack([tokens[s : s + seq_len] for s in starts])


def _calibration_source(dataset: str, data_dir: Path | None) -> Path:
    """Validate the name and locate the file before any tokenizing starts."""
    if dataset.lower().endswith(".txt"):
        path = Path(dataset).expanduser()
        if not path.is_file():
            raise DataError(f"calibration text {path} does not exist: check the path")
        return path
    if dataset not in _CALIB_FILES:
        raise DataError(
            f"unknown calibration set {dataset!r}: choose one of {', '.join(CALIB_DATASETS)} "
            "or a path to a .txt file"
        )
    if data_dir is None:
        raise DataError(
            f"calibration set {dataset!r} needs a data directory: pass --data-dir or set "
            f"{DATA_DIR_ENV}"
        )
    return _require_file(Path(data_dir), _CALIB_FILES[dataset], f"calibration set {dataset!r}")


def calibration_windows(
    dataset: str,
    tokenizer: PreTrainedTokenizerBase,
    nsamples: int,
    seq_len: int,
    seed: int,
    data_dir: Path | None,
) -> torch.Tensor:
    """[nsamples, seq_len] calibration token windows drawn as GPTQ/RPTQ do (algorithms.md 2.1).

    wikitext2 / ptb: the train split, tokenized whole, random windows. c4: random documents of
    the train shard. mix: split_mix(nsamples) rows from wikitext2, ptb and c4 in that order, each
    drawn with a fresh generator seeded with `seed` as RPTQ reseeds per sub-loader. c4-sample:
    the C4 protocol on the staged validation sample, which our benchmarks use because none of
    the train splits could be staged (see SOURCES.md); it overlaps no WikiText/PTB eval text but
    is from C4's validation split, so do not evaluate C4 on it after calibrating on it. A path
    ending in .txt: that UTF-8 file's text. A private random.Random(seed) per set keeps draws
    deterministic and leaves the global `random` state alone.
    """
    if nsamples < 1:
        raise DataError(f"nsamples is {nsamples}: use --nsamples 1 or more")
    _check_seq_len(seq_len)
    if dataset == "mix":
        counts = split_mix(nsamples)
        parts = [(name, n) for name, n in zip(MIX_ORDER, counts, strict=True) if n > 0]
        for name, _ in parts:  # all files checked before the first (slow) tokenization
            _calibration_source(name, data_dir)
        rows = [
            calibration_windows(name, tokenizer, n, seq_len, seed, data_dir) for name, n in parts
        ]
        return torch.cat(rows)
    source = _calibration_source(dataset, data_dir)
    rng = random.Random(seed)
    started = time.perf_counter()
    if dataset in ("c4", "c4-sample"):
        docs = _read_documents(source)
        windows = torch.stack(
            _draw_document_windows(docs, tokenizer, nsamples, seq_len, rng, source)
        )
    else:
        if dataset == "wikitext2":
            text = "\n\n".join(_wikitext_rows(source))
        elif dataset == "ptb":
            text = "\n\n".join(_ptb_rows(source))
        else:
            text = _read_text(source)
        if not text.strip():
            raise DataError(f"{source} is empty: give a text with at least {seq_len + 1} tokens")
        windows = _text_windows(_encode(tokenizer, text), nsamples, seq_len, rng, source)
    _LOG.info(
        "calibration %s: %d x %d tokens (seed %d) in %.1f s",
        dataset,
        nsamples,
        seq_len,
        seed,
        time.perf_counter() - started,
    )
    return windows
