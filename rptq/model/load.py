"""Find an OPT model (local directory, Hugging Face cache, or an in-memory module)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rptq.errors import ModelError
from rptq.model.shape import OptShape
from rptq.model.weights import MappingWeights, WeightSource, open_checkpoint

_SHORT_NAME = re.compile(r"^opt-\d+(\.\d+)?[mb]$")


@dataclass(frozen=True)
class LoadedModel:
    """An OPT model ready for calibration or export: identity, shape and a weight source."""

    name: str
    shape: OptShape
    config: Any  # transformers.OPTConfig
    weights: WeightSource
    directory: Path | None  # where tokenizer files may live


def hub_id(ref: str) -> str | None:
    """`opt-6.7b` -> `facebook/opt-6.7b`; `org/name` stays; anything else is not a hub id."""
    if _SHORT_NAME.match(ref):
        return f"facebook/{ref}"
    if re.match(r"^[\w.-]+/[\w.-]+$", ref) and not ref.startswith((".", "/")):
        return ref
    return None


def _resolve_directory(ref: str) -> Path:
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"model path {path} is a file; pass the model directory")
        return path
    repo = hub_id(ref)
    if repo is None:
        raise ModelError(f"model path {path} does not exist; pass a Hugging Face OPT directory")
    try:
        from huggingface_hub import snapshot_download

        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        return Path(
            snapshot_download(
                repo,
                local_files_only=offline,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.bin"],
            )
        )
    except Exception as exc:  # the hub raises many types; all mean "not available here"
        raise ModelError(
            f"model {repo} is neither a local directory nor in the Hugging Face cache "
            f"({type(exc).__name__}); run `huggingface-cli download {repo}` where there is "
            "network, or pass a local directory"
        ) from None


def read_config(directory: Path) -> Any:
    """OPTConfig of a model directory, with a clear error for other architectures."""
    config_file = directory / "config.json"
    if not config_file.exists():
        raise ModelError(f"no config.json in {directory}; pass a Hugging Face model directory")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(
            f"{config_file} is not valid JSON ({exc.msg}); fix it or re-download the model"
        ) from None
    model_type = raw.get("model_type")
    if model_type != "opt":
        raise ModelError(
            f"unsupported architecture {model_type or 'unknown'} in {directory}; supported: OPT"
        )
    from transformers import OPTConfig

    return OPTConfig.from_pretrained(str(directory))


def model_name(ref: str, directory: Path) -> str:
    """The model's name, never a machine's path: the hub id (`opt-125m` -> `facebook/opt-125m`,
    also for a path inside a hub cache snapshot), else the directory's own name.

    It goes into the graph name and the plan, so two machines exporting the same model write
    the same bytes wherever their copies live.
    """
    if not Path(ref).expanduser().exists() and hub_id(ref) is not None:
        return str(hub_id(ref))
    parts = Path(directory).resolve().parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return part.removeprefix("models--").replace("--", "/")
    return Path(directory).resolve().name


def load_model(ref: str) -> LoadedModel:
    """Open an OPT model by local path or hub id; weights stay on disk until read."""
    directory = _resolve_directory(ref)
    config = read_config(directory)
    shape = OptShape.from_config(config, where=str(directory))
    name = model_name(ref, directory)
    return LoadedModel(name, shape, config, open_checkpoint(directory), directory)


def from_module(model: Any, name: str = "in-memory") -> LoadedModel:
    """Wrap an in-memory `OPTForCausalLM` (tests, the demo)."""
    shape = OptShape.from_config(model.config, where=name)
    return LoadedModel(name, shape, model.config, MappingWeights(model.state_dict()), None)
