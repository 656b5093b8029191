"""Write a random-weight OPT checkpoint of a published shape, as fp16 safetensors.

Export cost and runtime latency depend on the shapes, not on the weight values, and no real
OPT checkpoint can be downloaded here; a random model of the real shape measures them honestly
(its perplexity means nothing). Shapes are those of the Hugging Face facebook/opt-* configs.

The model is built in memory and written with `save_pretrained` (sharded), so it needs about
the checkpoint's fp16 size in RAM: fine up to 1.3b on 24 GiB; streaming larger sizes layer by
layer is a later issue, and the script refuses sizes that would not fit.

    python bench/make_random_opt.py --size 1.3b -o bench/.cache/random-opt-1.3b
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

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
FIT_FRACTION = 0.6  # of MemAvailable: the model plus save_pretrained's transient copies


def parameter_count(size: str) -> int:
    """Parameters of the OPT of `size` (tied LM head counted once)."""
    hidden, _, ffn, layers = SHAPES[size]
    per_layer = 4 * (hidden * hidden + hidden) + 2 * hidden * ffn + ffn + hidden + 4 * hidden
    embeddings = VOCAB_SIZE * hidden + (MAX_POSITIONS + POSITION_OFFSET) * hidden
    return embeddings + layers * per_layer + 2 * hidden


def opt_config(size: str):  # noqa: ANN201 (transformers is imported lazily)
    """The OPTConfig of facebook/opt-<size>."""
    from transformers import OPTConfig

    hidden, heads, ffn, layers = SHAPES[size]
    return OPTConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        num_attention_heads=heads,
        ffn_dim=ffn,
        num_hidden_layers=layers,
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


def _available_bytes() -> int:
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"MemAvailable:\s+(\d+)", text).group(1)) * 1024  # type: ignore[union-attr]


def make(size: str, output: Path, seed: int, force: bool) -> Path:
    """Build the random model in fp16 and save it; returns the output directory."""
    import torch
    from transformers import OPTForCausalLM

    if output.exists() and any(output.iterdir()) and not force:
        sys.exit(f"error: {output} exists and is not empty; pass --force to overwrite")
    fp16_bytes = 2 * parameter_count(size)
    if fp16_bytes > FIT_FRACTION * _available_bytes():
        sys.exit(
            f"error: opt-{size} needs about {fp16_bytes / 2**30:.1f} GiB in fp16, more than "
            f"{FIT_FRACTION:.0%} of the available memory; streaming it layer by layer is not "
            "implemented yet"
        )
    started = time.perf_counter()
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        model = OPTForCausalLM(opt_config(size)).eval()
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(output, max_shard_size="1GB")
    note = {
        "what": f"random-weight OPT with the shape of facebook/opt-{size}; perplexity is "
        "meaningless, use it for export cost and latency only",
        "size": size,
        "seed": seed,
        "parameters": parameter_count(size),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    (output / "RANDOM.json").write_text(json.dumps(note, indent=1))
    return output


def main(argv: list[str] | None = None) -> int:
    """Parse `--size` and `-o`, write the checkpoint, print its size."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", required=True, choices=list(SHAPES))
    parser.add_argument("-o", "--output", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    out = make(args.size, args.output, args.seed, args.force)
    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"opt-{args.size} ({parameter_count(args.size) / 1e9:.2f}B parameters, random) -> "
          f"{out} ({total / 2**30:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
