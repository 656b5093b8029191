"""Write a random-weight OPT checkpoint of a published shape, streamed to safetensors.

Export cost and runtime latency depend on the shapes, not on the weight values, and no real
OPT checkpoint can be downloaded here; a random model of the real shape measures them honestly
(its perplexity means nothing). Shapes are those of the Hugging Face facebook/opt-* configs.
The writer (rptq.model.random_checkpoint) streams one chunk at a time, so any size fits in a
few hundred MiB of RAM; only the disk must hold the checkpoint.

    python bench/make_random_opt.py --size 1.3b -o bench/.cache/random-opt-1.3b
    python bench/make_random_opt.py --size 6.7b --layers 2 -o /tmp/opt-6.7b-2layers
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rptq.errors import RptqError
from rptq.model.random_checkpoint import (
    DTYPES,
    MAX_POSITIONS,
    POSITION_OFFSET,
    SHAPES,
    VOCAB_SIZE,
    WrittenCheckpoint,
    opt_config,
    parameter_count,
    write_random_checkpoint,
)

__all__ = [
    "MAX_POSITIONS",
    "POSITION_OFFSET",
    "SHAPES",
    "VOCAB_SIZE",
    "main",
    "make",
    "opt_config",
    "parameter_count",
]


def make(
    size: str,
    output: Path,
    seed: int = 0,
    force: bool = False,
    *,
    layers: int | None = None,
    dtype: str = "float16",
    shard_gib: float = 1.0,
) -> WrittenCheckpoint:
    """Write the checkpoint with a tqdm bytes bar on stderr (none outside a TTY)."""
    from tqdm import tqdm

    config = opt_config(size, num_layers=layers)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tqdm(
        total=0, unit="B", unit_scale=True, unit_divisor=1024, disable=None, desc=f"opt-{size}"
    ) as bar:

        def progress(written: int, total: int) -> None:
            bar.total = total
            bar.update(written - bar.n)

        return write_random_checkpoint(
            output,
            config,
            dtype=DTYPES[dtype],
            seed=seed,
            max_shard_bytes=max(1, int(shard_gib * 2**30)),
            force=force,
            progress=progress,
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python bench/make_random_opt.py --size 6.7b --layers 2 -o /tmp/opt",
    )
    parser.add_argument("--size", required=True, choices=list(SHAPES))
    parser.add_argument("--layers", type=int, help="decoder layers (default: the size's own)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-gib", type=float, default=1.0, help="max shard size (GiB)")
    parser.add_argument("-o", "--output", required=True, type=Path)
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Write the checkpoint and print what was written; exit 1 with a one-line error."""
    args = _parser().parse_args(argv)
    try:
        out = make(
            args.size,
            args.output,
            args.seed,
            args.force,
            layers=args.layers,
            dtype=args.dtype,
            shard_gib=args.shard_gib,
        )
    except RptqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    layers = args.layers or SHAPES[args.size][3]
    rate = out.total_bytes / 1e6 / max(out.wall_s, 1e-9)
    print(
        f"opt-{args.size} random ({out.parameters / 1e9:.2f}B parameters, {layers} layers, "
        f"{args.dtype}, seed {args.seed}) -> {out.directory}: {len(out.files)} files, "
        f"{out.total_bytes / 2**30:.2f} GiB in {out.wall_s:.1f} s ({rate:.0f} MB/s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
