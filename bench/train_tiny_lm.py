"""Train a small OPT language model for the quality benchmarks, when ../shared/models is empty.

No pretrained checkpoint can be downloaded here, and a random model's perplexity sits near the
vocabulary size whatever the quantization, which would hide every difference the benchmarks are
about. This trains a small OPT (OPT's real tokenizer and vocabulary) on pre-tokenized text and
saves it as a Hugging Face directory (sharded safetensors) that every rptq command accepts.

    python bench/train_tiny_lm.py tokenize --data-dir ../shared/data \
        -o bench/.cache/train_tokens.npy
    python bench/train_tiny_lm.py train bench/.cache/train_tokens.npy \
        -o bench/.cache/opt-tiny-lm --device cuda --minutes 2.5 --steps 1500 --batch 32
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch


def tokenize(data_dir: Path, output: Path) -> None:
    """C4 sample documents + WikiText-2 *validation* (tokenized release) -> uint16 token ids.

    The WikiText-2 test split (the benchmark's evaluation text) is never used for training.
    """
    import gzip

    from rptq.data import load_tokenizer

    tokenizer = load_tokenizer(None, data_dir)
    with gzip.open(data_dir / "c4" / "c4_validation_2k.json.gz", "rt") as handle:
        docs = [json.loads(line)["text"] for line in handle]
    wiki = (data_dir / "wikitext2-tokenized" / "wiki.valid.tokens").read_text()
    ids: list[int] = []
    for text in [*docs, wiki]:
        ids += tokenizer(text, verbose=False)["input_ids"]
    output.parent.mkdir(parents=True, exist_ok=True)
    np.save(output, np.asarray(ids, dtype=np.uint16))
    print(f"{len(ids)} tokens -> {output}")


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, windows: torch.Tensor, device: torch.device) -> float:
    """Mean next-token loss on held-out windows (eval mode, no dropout)."""
    model.eval()
    losses = [
        model(input_ids=w.to(device), labels=w.to(device)).loss.item() for w in windows.split(16)
    ]
    model.train()
    return sum(losses) / len(losses)


def train(args: argparse.Namespace) -> None:
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    tokens = torch.from_numpy(np.load(args.tokens).astype(np.int64))
    seq = args.max_positions
    windows = tokens[: len(tokens) // seq * seq].view(-1, seq)
    config = OPTConfig(
        vocab_size=50272,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        ffn_dim=4 * args.hidden,
        num_attention_heads=args.heads,
        max_position_embeddings=seq,
        word_embed_proj_dim=args.hidden,
        dropout=0.1,
        attention_dropout=0.0,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )
    model = OPTForCausalLM(config).to(device).train()
    # 5% of the windows are held out: the text is small (about 1.2M tokens), so the model
    # overfits within a few epochs; the checkpoint kept is the one with the best held-out loss.
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(args.seed))
    held_out, windows = windows[order[: len(windows) // 20]], windows[order[len(windows) // 20 :]]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95)
    )
    started = time.time()
    generator = torch.Generator().manual_seed(args.seed)
    best = (float("inf"), -1, None)
    for step in range(args.steps):
        lr = (
            args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = windows[torch.randint(0, len(windows), (args.batch,), generator=generator)].to(
            device
        )
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % args.eval_every == 0 or step == args.steps - 1:
            held = held_out_loss(model, held_out, device)
            if held < best[0]:
                best = (held, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
            print(
                f"step {step} loss {loss.item():.3f} held-out {held:.3f} lr {lr:.2e} "
                f"{time.time() - started:.0f}s",
                flush=True,
            )
        if time.time() - started > args.minutes * 60:
            print(f"stopping at step {step}: time limit", flush=True)
            break
    model.load_state_dict(best[2])
    print(f"kept step {best[1]}: held-out loss {best[0]:.3f}", flush=True)
    model = model.eval().to("cpu", torch.float16)
    model.save_pretrained(args.output, max_shard_size="15MB")
    (Path(args.output) / "TRAINING.json").write_text(
        json.dumps(
            {
                **vars(args),
                "steps_done": step + 1,
                "best_step": best[1],
                "held_out_loss": best[0],
                "train_tokens": int(windows.numel()),
                "wall_s": round(time.time() - started),
            },
            indent=1,
            default=str,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    tok = sub.add_parser("tokenize")
    tok.add_argument("--data-dir", type=Path, required=True)
    tok.add_argument("-o", "--output", type=Path, required=True)
    tr = sub.add_parser("train")
    tr.add_argument("tokens", type=Path)
    tr.add_argument("-o", "--output", type=Path, required=True)
    tr.add_argument("--layers", type=int, default=6)
    tr.add_argument("--hidden", type=int, default=256)
    tr.add_argument("--heads", type=int, default=8)
    tr.add_argument("--max-positions", type=int, default=512)
    tr.add_argument("--steps", type=int, default=3000)
    tr.add_argument("--batch", type=int, default=32)
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--minutes", type=float, default=4.0)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--eval-every", type=int, default=50)
    tr.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.command == "tokenize":
        tokenize(args.data_dir, args.output)
    else:
        train(args)


if __name__ == "__main__":
    main()
