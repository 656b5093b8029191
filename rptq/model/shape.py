"""The dimensions of an OPT model and the checks that it is one rptq supports."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from rptq.errors import ModelError


@dataclass(frozen=True, slots=True)
class OptShape:
    """Sizes that fix every tensor shape of an OPT model (and therefore of its plan)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    ffn_dim: int
    vocab_size: int
    max_positions: int

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.hidden_size // self.num_heads

    def width(self, kind: str) -> int:
        """Channel count of a reorder point's tensor ("hidden" or "ffn")."""
        return self.ffn_dim if kind == "ffn" else self.hidden_size

    def config_hash(self) -> str:
        """Stable hash of the shape, stored in plans so a plan cannot meet the wrong model."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def from_config(cls, config: Any, where: str = "model") -> OptShape:
        """Read and validate a transformers OPTConfig (or any object with its attributes)."""
        model_type = getattr(config, "model_type", None)
        if model_type != "opt":
            raise ModelError(
                f"unsupported architecture {model_type or 'unknown'!s} in {where}; supported: OPT "
                "(facebook/opt-125m ... opt-66b)"
            )
        checks = {
            "do_layer_norm_before": (getattr(config, "do_layer_norm_before", True), True),
            "activation_function": (getattr(config, "activation_function", "relu"), "relu"),
            "enable_bias": (getattr(config, "enable_bias", True), True),
            "layer_norm_elementwise_affine": (
                getattr(config, "layer_norm_elementwise_affine", True),
                True,
            ),
            "word_embed_proj_dim": (
                getattr(config, "word_embed_proj_dim", config.hidden_size),
                config.hidden_size,
            ),
        }
        for key, (got, want) in checks.items():
            if got != want:
                raise ModelError(
                    f"unsupported OPT variant in {where}: {key}={got!r} (RPTQ's reorder points "
                    f"need {key}={want!r}; post-LN opt-350m is not supported)"
                )
        if config.hidden_size % config.num_attention_heads:
            raise ModelError(f"hidden_size not divisible by num_attention_heads in {where}")
        return cls(
            num_layers=int(config.num_hidden_layers),
            hidden_size=int(config.hidden_size),
            num_heads=int(config.num_attention_heads),
            ffn_dim=int(config.ffn_dim),
            vocab_size=int(config.vocab_size),
            max_positions=int(config.max_position_embeddings),
        )
