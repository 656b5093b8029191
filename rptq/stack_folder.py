"""The output folder an inference stack loads unchanged: model.onnx plus the files around it.

optimum's `ORTModelForCausalLM.from_pretrained(folder)` reads `config.json` (model_type "opt"
makes it feed OPT's position_ids) and `generation_config.json`; onnxruntime-genai's
`og.Model(folder)` reads `genai_config.json`; both tokenize with `tokenizer.json` and
`tokenizer_config.json`. `rptq_plan.json` records the recipe and export options, for
provenance. Which stack takes which cache type is in README.md, "Inference stacks".
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rptq.errors import ConfigError, DataError, OutputError

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
GENAI_CONFIG_FILE = "genai_config.json"
PLAN_RECORD_FILE = "rptq_plan.json"
SIDE_FILES = (CONFIG_FILE, GENERATION_CONFIG_FILE, GENAI_CONFIG_FILE, PLAN_RECORD_FILE)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
ACCURACY_LEVEL_KEY = "session.qdq_matmulnbits_accuracy_level"
ACCURACY_LEVEL = "1"


def wants_folder(raw_output: str) -> bool:
    """`-o DIR/` (a trailing separator) or an existing directory asks for the stack folder.

    A path ending in `.onnx` stays a file path even when a directory has that name: writing a
    model over it is then the `could not write ... (Is a directory)` error, as before folders.
    """
    if raw_output.endswith(("/", os.sep)):
        return True
    return Path(raw_output).suffix != ".onnx" and Path(raw_output).is_dir()


def writes_side_files(output: Path) -> bool:
    """`-o .../model.onnx` also gets the side files (the stack folder's layout)."""
    return output.name == MODEL_FILE


@dataclass(frozen=True)
class GraphInfo:
    """What the side files need from an exported graph, read from its rptq metadata."""

    shape: dict[str, int]
    dtype: str
    past: bool
    kv_cache_dtype: str

    @property
    def head_size(self) -> int:
        """Channels per attention head."""
        return self.shape["hidden_size"] // self.shape["num_heads"]


def read_graph_info(path: Path) -> GraphInfo:
    """The rptq metadata of `path` (weights are not read)."""
    import onnx

    from rptq.exporter.opt import META_DTYPE, META_KV_CACHE_DTYPE, META_PAST, META_SHAPE

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX file at all
        raise ConfigError(
            f"{path} is not an ONNX model ({type(exc).__name__}): pass a file written by "
            "`rptq-export`"
        ) from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if META_SHAPE not in meta:
        raise ConfigError(f"{path} was not exported by rptq (no {META_SHAPE} metadata)")
    return GraphInfo(
        shape={k: int(v) for k, v in json.loads(meta[META_SHAPE]).items()},
        dtype=meta.get(META_DTYPE, "float32"),
        past=meta.get(META_PAST) == "1",
        kv_cache_dtype=meta.get(META_KV_CACHE_DTYPE, "float"),
    )


def special_token_ids(config: Any) -> dict[str, int | None]:
    """bos/eos/pad ids of a transformers config (OPT: 2, 2, 1)."""
    return {
        key: getattr(config, key, None) for key in ("bos_token_id", "eos_token_id", "pad_token_id")
    }


def genai_config(
    info: GraphInfo, tokens: dict[str, int | None], filename: str = MODEL_FILE
) -> dict[str, Any]:
    """onnxruntime-genai's config for a with-past rptq graph: the fields its model builder
    writes (onnxruntime_genai/models/builders/base.py, `make_genai_config`).

    `type` "decoder" is genai's generic decoder-only model (0.18 has no "opt" type): it feeds
    input_ids, attention_mask and position_ids by the names below, and past/present by the
    `%d` templates. `past_present_share_buffer` is false because rptq's `present` is the
    Concat of past and new (P + S long), not a preallocated max-length buffer.
    """
    shape = info.shape
    context = shape["max_positions"]
    return {
        "model": {
            "bos_token_id": tokens["bos_token_id"],
            "context_length": context,
            "decoder": {
                "session_options": {
                    "log_id": "onnxruntime-genai",
                    "provider_options": [],
                    # genai passes string entries on as session config entries: keep the fused
                    # MatMulNBits at fp32 activations, the graph's arithmetic (rptq.runtime.ort
                    # session_options says why); its default, level 4, quantizes them to int8
                    ACCURACY_LEVEL_KEY: ACCURACY_LEVEL,
                },
                "filename": filename,
                "head_size": info.head_size,
                "hidden_size": shape["hidden_size"],
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": shape["num_heads"],
                "num_hidden_layers": shape["num_layers"],
                "num_key_value_heads": shape["num_heads"],
            },
            "eos_token_id": tokens["eos_token_id"],
            "pad_token_id": tokens["pad_token_id"],
            "type": "decoder",
            "vocab_size": shape["vocab_size"],
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0,
        },
    }


def plan_record(plan: Any, info: GraphInfo, model_name: str) -> dict[str, Any]:
    """`rptq_plan.json`: the recipe and provenance of the plan (none for FP) and the export."""
    import rptq

    record: dict[str, Any] = {
        "rptq_version": rptq.__version__,
        "model": model_name,
        "export": {
            "dtype": info.dtype,
            "past": info.past,
            "kv_cache_dtype": info.kv_cache_dtype if info.past else None,
        },
        "bits": "FP",
        "recipe": None,
        "provenance": None,
    }
    if plan is not None:
        from dataclasses import asdict

        record["bits"] = plan.recipe.label()
        record["recipe"] = asdict(plan.recipe)  # enums are str subclasses: JSON strings
        record["provenance"] = dict(plan.provenance)
    return record


def check_side_files(folder: Path, force: bool) -> None:
    """Refuse to overwrite side files beside `-o .../model.onnx` without --force (before the
    export starts, like every other output check)."""
    if force:
        return
    for name in SIDE_FILES + TOKENIZER_FILES:
        if (folder / name).exists():
            raise OutputError(f"{folder / name} exists; pass --force to overwrite it")


def _write_json(path: Path, content: dict[str, Any]) -> None:
    """Write beside the final name and rename: never a half-written JSON file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(content, indent=1, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(
            f"could not write {path} ({exc.strerror or exc}); check free space and permissions"
        ) from exc


def write_side_files(
    folder: Path,
    onnx_path: Path,
    model: Any,
    plan: Any,
    data_dir: Path | None,
) -> list[Path]:
    """Write config.json, generation_config.json, the tokenizer, genai_config.json (with-past
    graphs) and rptq_plan.json beside `onnx_path`; returns the files written.

    `model` is the rptq LoadedModel that was exported. Without a tokenizer of its own, OPT's
    (rptq.data.load_tokenizer from the data directory) is written; without either the folder
    is still complete for token-id clients and `generate --tokenizer` names one.
    """
    from transformers import GenerationConfig

    info = read_graph_info(onnx_path)
    written: list[Path] = []
    config = model.config.to_dict()
    config["use_cache"] = info.past
    _write_json(folder / CONFIG_FILE, config)
    written.append(folder / CONFIG_FILE)
    generation = GenerationConfig.from_model_config(model.config).to_dict()
    generation["use_cache"] = info.past
    _write_json(folder / GENERATION_CONFIG_FILE, generation)
    written.append(folder / GENERATION_CONFIG_FILE)
    written += write_tokenizer(folder, model.directory, data_dir)
    tokens = special_token_ids(model.config)
    if info.past:
        _write_json(folder / GENAI_CONFIG_FILE, genai_config(info, tokens, onnx_path.name))
        written.append(folder / GENAI_CONFIG_FILE)
    _write_json(folder / PLAN_RECORD_FILE, plan_record(plan, info, model.name))
    written.append(folder / PLAN_RECORD_FILE)
    return written


def write_tokenizer(folder: Path, model_dir: Path | None, data_dir: Path | None) -> list[Path]:
    """The model's tokenizer, else OPT's; [] (with a warning) when neither can be found."""
    from rptq.data import load_tokenizer

    try:
        tokenizer = load_tokenizer(model_dir, data_dir)
    except DataError as exc:
        log.warning("no tokenizer written to %s: %s", folder, exc)
        return []
    import shutil
    import tempfile

    staging = Path(tempfile.mkdtemp(prefix=".tokenizer.", suffix=".tmp", dir=folder))
    try:
        tokenizer.save_pretrained(str(staging))
        written = []
        for item in sorted(staging.iterdir()):  # each file renamed whole into place
            os.replace(item, folder / item.name)
            written.append(folder / item.name)
        return written
    except OSError as exc:
        raise OutputError(
            f"could not write the tokenizer to {folder} ({exc.strerror or exc}); check "
            "free space and permissions"
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def folder_path(raw_output: str) -> Path:
    """The folder of `-o DIR/`."""
    return Path(raw_output.rstrip("/" + os.sep) or raw_output)


def check_folder(folder: Path, force: bool) -> bool:
    """Check `-o DIR/` before any work; True when an existing folder may be replaced (it is
    empty, or --force). Its parent must exist and be writable: the folder is built beside it
    and renamed into place (rptq.io.atomic_directory)."""
    from rptq.io import check_output

    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} is a file; pass a folder (-o DIR/) or a .onnx path")
    empty = folder.is_dir() and not any(folder.iterdir())
    check_output(folder, force or empty)
    return force or empty


def export_folder(
    model: Any, plan: Any, folder: Path, options: Any, data_dir: Path | None
) -> tuple[Any, list[tuple[Path, int]]]:
    """Export into a temporary folder beside `folder`, write the side files there, and rename
    it into place: the stack folder appears whole or not at all."""
    from dataclasses import replace

    from rptq.io import atomic_directory
    from rptq.workflow import export_onnx

    replace_existing = check_folder(folder, options.force)
    with atomic_directory(folder, force=replace_existing) as tmp:
        summary = export_onnx(model, plan, tmp / MODEL_FILE, replace(options, force=False))
        write_side_files(tmp, tmp / MODEL_FILE, model, plan, data_dir)
        files = [(folder / p.name, p.stat().st_size) for p in sorted(tmp.iterdir())]
    return summary, files
