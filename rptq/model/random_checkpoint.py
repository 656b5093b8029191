"""Write a random-weight OPT checkpoint of any published size, streamed to safetensors.

Export cost and runtime latency depend on the shapes, not on the weight values, and no real
OPT checkpoint can be downloaded here; a random model of the real shape measures them honestly
(its perplexity means nothing). Building the model in memory and calling `save_pretrained`
needs the full checkpoint in RAM (13 GiB for 6.7b in fp16), so this writes the safetensors files
by hand: each shard's header follows from the shapes alone, and the values are generated and
written one chunk of at most `CHUNK_ELEMENTS` at a time, a few chunks ahead on threads. Peak
memory is a few hundred MiB whatever the model size.

Values follow Hugging Face's OPT init (normal std `init_std` for linear and embedding weights,
zero biases, padding row zero) except the LayerNorms: gamma = exp(N(0, 0.25)) and
beta = N(0, 0.05) instead of 1 and 0, so per-channel activation ranges differ and RPTQ's
range clustering has something to group (with gamma = 1 and beta = 0 every channel looks alike).

Each chunk draws from its own generator seeded by (seed, tensor name, chunk index), so the
output is deterministic and does not depend on the shard size or on the order of writing.
"""

from __future__ import annotations

import collections
import copy
import functools
import hashlib
import json
import math
import os
import shutil
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch

from rptq.errors import ConfigError, OutputError
from rptq.io import atomic_directory
from rptq.model.shape import OptShape

# size -> (hidden_size, num_attention_heads, ffn_dim, num_hidden_layers), facebook/opt-* configs.
# opt-350m is absent: it is post-LN with a 512-wide embedding projection, which rptq rejects.
SHAPES: dict[str, tuple[int, int, int, int]] = {
    "125m": (768, 12, 3072, 12),
    "1.3b": (2048, 32, 8192, 24),
    "2.7b": (2560, 32, 10240, 32),
    "6.7b": (4096, 32, 16384, 32),
    "13b": (5120, 40, 20480, 40),
    "30b": (7168, 56, 28672, 48),
    "66b": (9216, 72, 36864, 64),
}
VOCAB_SIZE = 50272
MAX_POSITIONS = 2048
POSITION_OFFSET = 2  # OPT's learned positions have 2 extra rows
DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
}
_SAFETENSORS_DTYPE = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16"}
DEFAULT_SHARD_BYTES = 2**30
CHUNK_ELEMENTS = 2**22  # 16 MiB of fp32 values per generated chunk
WORKERS = max(1, min(4, os.cpu_count() or 1))  # drawing threads; 4 already outpace a disk
LN_GAMMA_LOG_STD = 0.25
LN_BETA_STD = 0.05
DISK_MARGIN_BYTES = 64 * 2**20

Init = Literal["normal", "zeros", "ln_gamma", "ln_beta"]
Progress = Callable[[int, int], None]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor to write: its state-dict name, shape and how its values are drawn."""

    name: str
    shape: tuple[int, ...]
    init: Init
    zero_row: int | None = None  # the embedding's padding row, zero as in nn.Embedding

    @property
    def numel(self) -> int:
        """Element count, from the shape alone: headers are planned before any value exists."""
        return math.prod(self.shape)


@dataclass(frozen=True, slots=True)
class WrittenCheckpoint:
    """What `write_random_checkpoint` wrote, for the caller's summary line."""

    directory: Path
    parameters: int
    total_bytes: int  # all files, headers and JSON included
    files: tuple[str, ...]
    wall_s: float


def opt_config(size: str, num_layers: int | None = None) -> Any:
    """The OPTConfig of facebook/opt-<size>, optionally with fewer (or more) decoder layers."""
    from transformers import OPTConfig

    if size not in SHAPES:
        raise ConfigError(f"unknown OPT size {size!r}; choose one of {', '.join(SHAPES)}")
    hidden, heads, ffn, layers = SHAPES[size]
    if num_layers is not None and num_layers < 1:
        raise ConfigError(f"--layers must be at least 1, got {num_layers}")
    return OPTConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        num_attention_heads=heads,
        ffn_dim=ffn,
        num_hidden_layers=layers if num_layers is None else num_layers,
        max_position_embeddings=MAX_POSITIONS,
        word_embed_proj_dim=hidden,
        do_layer_norm_before=True,
        enable_bias=True,
        activation_function="relu",
        dropout=0.1,
        attention_dropout=0.0,
        init_std=0.02,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        tie_word_embeddings=True,
    )


def tensor_specs(config: Any) -> list[TensorSpec]:
    """Every tensor `OPTForCausalLM.save_pretrained` writes for `config`, in writing order.

    The tied LM head is omitted (save_pretrained drops it too); an untied one is written last.
    """
    shape = OptShape.from_config(config, where="the random checkpoint config")
    hidden, ffn = shape.hidden_size, shape.ffn_dim
    pad = getattr(config, "pad_token_id", None)
    specs = [
        TensorSpec(
            "model.decoder.embed_tokens.weight",
            (shape.vocab_size, hidden),
            "normal",
            pad if pad is not None and 0 <= pad < shape.vocab_size else None,
        ),
        TensorSpec(
            "model.decoder.embed_positions.weight",
            (shape.max_positions + POSITION_OFFSET, hidden),
            "normal",
        ),
    ]
    for index in range(shape.num_layers):
        specs += _layer_specs(f"model.decoder.layers.{index}", hidden, ffn)
    specs += _layer_norm_specs("model.decoder.final_layer_norm", hidden)
    if not getattr(config, "tie_word_embeddings", True):
        specs.append(TensorSpec("lm_head.weight", (shape.vocab_size, hidden), "normal"))
    return specs


def _layer_norm_specs(prefix: str, hidden: int) -> list[TensorSpec]:
    return [
        TensorSpec(f"{prefix}.weight", (hidden,), "ln_gamma"),
        TensorSpec(f"{prefix}.bias", (hidden,), "ln_beta"),
    ]


def _linear_specs(prefix: str, out_features: int, in_features: int) -> list[TensorSpec]:
    return [
        TensorSpec(f"{prefix}.weight", (out_features, in_features), "normal"),
        TensorSpec(f"{prefix}.bias", (out_features,), "zeros"),
    ]


def _layer_specs(prefix: str, hidden: int, ffn: int) -> list[TensorSpec]:
    specs = _layer_norm_specs(f"{prefix}.self_attn_layer_norm", hidden)
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        specs += _linear_specs(f"{prefix}.self_attn.{proj}", hidden, hidden)
    specs += _layer_norm_specs(f"{prefix}.final_layer_norm", hidden)
    specs += _linear_specs(f"{prefix}.fc1", ffn, hidden)
    specs += _linear_specs(f"{prefix}.fc2", hidden, ffn)
    return specs


def parameter_count(size_or_config: str | Any) -> int:
    """Parameters of an OPT (tied LM head counted once), from its size name or config."""
    config = opt_config(size_or_config) if isinstance(size_or_config, str) else size_or_config
    return sum(spec.numel for spec in tensor_specs(config))


def plan_shards(
    specs: list[TensorSpec], itemsize: int, max_shard_bytes: int
) -> list[list[TensorSpec]]:
    """Split tensors greedily in order, as save_pretrained does; a huge tensor fills a shard."""
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in specs:
        size = spec.numel * itemsize
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += size
    return shards


def safetensors_header(specs: list[TensorSpec], dtype: torch.dtype) -> bytes:
    """The 8-byte length and JSON header of a safetensors file holding `specs` in order.

    The JSON is padded with spaces to a multiple of 8 bytes, as the safetensors library does,
    so every tensor's data starts 8-byte aligned.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        end = offset + spec.numel * itemsize
        header[spec.name] = {
            "dtype": _SAFETENSORS_DTYPE[dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _chunk_seed(seed: int, name: str, chunk: int) -> int:
    """A stable 63-bit seed per chunk (Python's hash() is salted per process, so not that)."""
    digest = hashlib.blake2b(f"{seed}/{name}/{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def chunk_jobs(
    spec: TensorSpec, seed: int, dtype: torch.dtype, init_std: float
) -> list[Callable[[], torch.Tensor]]:
    """One job per flat chunk of at most CHUNK_ELEMENTS.

    Jobs are independent, so threads may run them in any order and the bytes stay the same.
    """
    return [
        functools.partial(_make_chunk, spec, chunk, start, seed, dtype, init_std)
        for chunk, start in enumerate(range(0, spec.numel, CHUNK_ELEMENTS))
    ]


def _make_chunk(
    spec: TensorSpec, chunk: int, start: int, seed: int, dtype: torch.dtype, init_std: float
) -> torch.Tensor:
    """Values of flat elements [start, start + CHUNK_ELEMENTS).

    Drawn in fp32 and then cast, so they do not depend on the output dtype beyond its rounding.
    """
    count = min(CHUNK_ELEMENTS, spec.numel - start)
    if spec.init == "zeros":
        return torch.zeros(count, dtype=dtype)
    generator = torch.Generator().manual_seed(_chunk_seed(seed, spec.name, chunk))
    values = torch.randn(count, generator=generator)
    if spec.init == "normal":
        values.mul_(init_std)
    elif spec.init == "ln_gamma":
        values.mul_(LN_GAMMA_LOG_STD).exp_()
    else:
        values.mul_(LN_BETA_STD)
    if spec.zero_row is not None:
        _zero_row(values, start, spec.zero_row * spec.shape[-1], spec.shape[-1])
    return values.to(dtype)


def _in_order(jobs: Iterable[Callable[[], T]], workers: int) -> Iterator[T]:
    """Run jobs on threads at most 2 * workers ahead, yielding results in submission order.

    One torch.randn call draws on one core (CPU generators are sequential) and releases the GIL,
    so a few drawing threads plus the writing thread keep both the cores and the disk busy,
    while the bounded look-ahead keeps memory at a few chunks.
    """
    with ThreadPoolExecutor(workers, thread_name_prefix="random-checkpoint") as pool:
        pending: collections.deque[Future[T]] = collections.deque()
        try:
            for job in jobs:
                pending.append(pool.submit(job))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _zero_row(values: torch.Tensor, start: int, row_start: int, row_len: int) -> None:
    """Zero the part of flat elements [row_start, row_start+row_len) that falls in this chunk."""
    lo = max(row_start, start) - start
    hi = min(row_start + row_len, start + values.numel()) - start
    if lo < hi:
        values[lo:hi] = 0


def shard_names(count: int) -> list[str]:
    """Hugging Face's file names: one model.safetensors, or model-0000k-of-0000n.safetensors."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def _check_disk(parent: Path, need_bytes: int) -> None:
    free = shutil.disk_usage(parent).free
    if free < need_bytes + DISK_MARGIN_BYTES:
        raise OutputError(
            f"{parent} has {free / 2**30:.1f} GiB free but the checkpoint needs "
            f"{need_bytes / 2**30:.1f} GiB; free some space or choose another -o directory"
        )


def published_size(config: Any) -> str | None:
    """The facebook/opt-* size whose widths `config` has (any layer count), else None."""
    widths = (config.hidden_size, config.num_attention_heads, config.ffn_dim)
    if (config.vocab_size, config.max_position_embeddings) != (VOCAB_SIZE, MAX_POSITIONS):
        return None
    return next((size for size, shape in SHAPES.items() if shape[:3] == widths), None)


def _resolve_config(size_or_config: str | Any) -> tuple[Any, str | None]:
    if isinstance(size_or_config, str):
        return opt_config(size_or_config), size_or_config
    config = copy.deepcopy(size_or_config)  # dtype is set on it; leave the caller's alone
    return config, published_size(config)


def _validate(dtype: torch.dtype, max_shard_bytes: int) -> None:
    if dtype not in _SAFETENSORS_DTYPE:
        raise ConfigError(f"unsupported dtype {dtype}; choose one of {', '.join(DTYPES)}")
    if max_shard_bytes <= 0:
        raise ConfigError(f"the shard size must be positive, got {max_shard_bytes} bytes")


def _write_shard(
    file: Path,
    specs: list[TensorSpec],
    dtype: torch.dtype,
    seed: int,
    init_std: float,
    report: Callable[[int], None],
) -> None:
    with open(file, "wb") as handle:
        header = safetensors_header(specs, dtype)
        handle.write(header)
        report(len(header))
        jobs = (job for spec in specs for job in chunk_jobs(spec, seed, dtype, init_std))
        for values in _in_order(jobs, WORKERS):
            data = values.view(torch.uint8).numpy()
            handle.write(data.data)  # the array's memory, without a copy
            report(data.nbytes)


def _note(
    config: Any, size: str | None, seed: int, dtype: torch.dtype, parameters: int, wall_s: float
) -> dict[str, Any]:
    label = f"facebook/opt-{size}" if size else "the given OPTConfig"
    if size and config.num_hidden_layers != SHAPES[size][3]:
        label += f" with {config.num_hidden_layers} of its {SHAPES[size][3]} layers"
    return {
        "what": f"random-weight OPT with the shape of {label}; perplexity is meaningless, use it "
        "for export cost, memory and latency only",
        "size": size,
        "layers": config.num_hidden_layers,
        "dtype": str(dtype).removeprefix("torch."),
        "seed": seed,
        "init": f"HF OPT init (normal std {config.init_std}, zero biases) but LayerNorm gamma = "
        f"exp(N(0, {LN_GAMMA_LOG_STD})), beta = N(0, {LN_BETA_STD})",
        "parameters": parameters,
        "wall_s": round(wall_s, 1),
        "writer": "rptq.model.random_checkpoint",
    }


def write_random_checkpoint(
    output_dir: Path,
    size_or_config: str | Any,
    *,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
    progress: Progress | None = None,
) -> WrittenCheckpoint:
    """Write config.json, safetensors shard(s) with index, and RANDOM.json into `output_dir`.

    The directory is written under a temporary name beside `output_dir` and renamed at the end,
    so a failure (disk full, Ctrl-C, a raising `progress`) leaves nothing at `output_dir`.
    `progress(bytes_written, total_bytes)` is called after every chunk.
    """
    started = time.perf_counter()
    output_dir = Path(output_dir)
    config, size = _resolve_config(size_or_config)
    _validate(dtype, max_shard_bytes)
    specs = tensor_specs(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = plan_shards(specs, itemsize, max_shard_bytes)
    names = shard_names(len(shards))
    total = sum(
        len(safetensors_header(s, dtype)) + sum(t.numel for t in s) * itemsize for s in shards
    )
    empty = output_dir.is_dir() and not any(output_dir.iterdir())
    with atomic_directory(output_dir, force=force or empty) as tmp:
        _check_disk(output_dir.parent, total)
        written = 0

        def report(count: int) -> None:
            nonlocal written
            written += count
            if progress is not None:
                progress(written, total)

        for name, shard in zip(names, shards, strict=True):
            _write_shard(tmp / name, shard, dtype, seed, config.init_std, report)
        _write_metadata(tmp, config, dtype, shards, names, itemsize)
        parameters = sum(spec.numel for spec in specs)
        note = _note(config, size, seed, dtype, parameters, time.perf_counter() - started)
        (tmp / "RANDOM.json").write_text(json.dumps(note, indent=1) + "\n")
        files = tuple(sorted(os.listdir(tmp)))
        total_bytes = sum((tmp / f).stat().st_size for f in files)
    return WrittenCheckpoint(
        output_dir, parameters, total_bytes, files, time.perf_counter() - started
    )


def _write_metadata(
    directory: Path,
    config: Any,
    dtype: torch.dtype,
    shards: list[list[TensorSpec]],
    names: list[str],
    itemsize: int,
) -> None:
    """config.json (with the weights' dtype) and, when sharded, HF's index of name -> file."""
    config.dtype = dtype  # transformers >= 5 writes it as "dtype" (formerly "torch_dtype")
    config.architectures = ["OPTForCausalLM"]
    config.save_pretrained(str(directory))
    if len(shards) == 1:
        return
    index = {
        "metadata": {"total_size": sum(t.numel for s in shards for t in s) * itemsize},
        "weight_map": {t.name: name for name, s in zip(names, shards, strict=True) for t in s},
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
