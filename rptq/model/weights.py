"""Read OPT weights by Hugging Face name, one tensor at a time.

Calibration and export touch one decoder layer at a time, so a 6.7B model never needs all its
weights in fp32 at once: safetensors files are memory-mapped and read tensor by tensor.
Names are canonical `OPTForCausalLM` state-dict keys (`model.decoder.layers.3.fc1.weight`);
checkpoints saved from `OPTModel` (keys `decoder.*`) are mapped onto them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

import torch

from rptq.errors import ModelError

EMBED_TOKENS = "model.decoder.embed_tokens.weight"
EMBED_POSITIONS = "model.decoder.embed_positions.weight"
FINAL_LN = "model.decoder.final_layer_norm"
LM_HEAD = "lm_head.weight"


def layer_prefix(index: int) -> str:
    """Module path of decoder layer `index`."""
    return f"model.decoder.layers.{index}"


def canonical_key(key: str) -> str:
    """Map a checkpoint key onto the OPTForCausalLM state-dict naming."""
    if key.startswith("decoder."):
        return "model." + key
    return key


class WeightSource(Protocol):
    """Where tensors come from: an in-memory module or files on disk."""

    def names(self) -> Iterable[str]:
        """Canonical names of all tensors."""
        ...

    def get(self, name: str) -> torch.Tensor:
        """The tensor called `name`, in its stored dtype, on the CPU."""
        ...


class MappingWeights:
    """Weights from an in-memory mapping such as `model.state_dict()` (no copies)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = {canonical_key(k): v for k, v in tensors.items()}

    def names(self) -> Iterable[str]:
        """Hugging Face names of every tensor held."""
        return self._tensors.keys()

    def get(self, name: str) -> torch.Tensor:
        """The tensor called `name` (ModelError naming it if absent)."""
        try:
            return self._tensors[name].detach()
        except KeyError:
            raise ModelError(f"checkpoint has no tensor {name}") from None


class SafetensorsWeights:
    """Weights memory-mapped from one or more .safetensors files, read on demand."""

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        self._files = files
        self._where: dict[str, tuple[Path, str]] = {}
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                        self._where[canonical_key(key)] = (file, key)
            except Exception as exc:  # SafetensorError, OSError: a missing, cut or foreign file
                raise ModelError(
                    f"{file} is not a readable safetensors file ({_first_line(exc)}): "
                    "re-download or re-save the checkpoint"
                ) from None

    def names(self) -> Iterable[str]:
        """Hugging Face names of every tensor in the checkpoint files."""
        return self._where.keys()

    def get(self, name: str) -> torch.Tensor:
        """Read tensor `name` from its safetensors file (one tensor in memory)."""
        from safetensors import safe_open

        try:
            file, key = self._where[name]
        except KeyError:
            raise ModelError(f"checkpoint has no tensor {name}") from None
        try:
            with safe_open(str(file), framework="pt") as handle:
                tensor = handle.get_tensor(key)
        except Exception as exc:  # a file changed or cut since it was opened
            raise ModelError(
                f"cannot read {key} from {file} ({_first_line(exc)}): re-download the checkpoint"
            ) from None
        # NaN/Inf weights would calibrate to NaN scales and export a graph that computes NaN
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelError(
                f"{key} in {file} holds NaN or Inf values: the checkpoint is damaged; "
                "re-download it or fix the training run that wrote it"
            )
        return tensor


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def open_checkpoint(directory: Path) -> WeightSource:
    """The weights of a Hugging Face model directory (safetensors preferred, .bin otherwise)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return SafetensorsWeights([directory / s for s in shards])
    single = directory / "model.safetensors"
    if single.exists():
        return SafetensorsWeights([single])
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if bins:
        tensors: dict[str, torch.Tensor] = {}
        for file in bins:
            tensors.update(torch.load(file, map_location="cpu", mmap=True, weights_only=True))
        return MappingWeights(tensors)
    raise ModelError(
        f"no weights in {directory}: expected model.safetensors, model.safetensors.index.json "
        "or pytorch_model.bin"
    )
