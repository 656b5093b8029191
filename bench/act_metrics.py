"""Activation-range metrics on outlier models: the quality ladder by logit SQNR and next-token KL.

For each model, activation setting (W16: weights float, so only activation scales differ) and
metric (`ema_minmax`, `minmax`, `mse`, `percentile`), one plan per granularity (tensor, RPTQ
clusters, channel) is calibrated on the same windows and scored against the FP model on the
same WikiText-2 windows with the PyTorch fake-quant reference (which ORT's graph matches,
tests/parity): logit SQNR in dB (higher is better) and KL(P_fp || P_q) of the next-token
distribution in nats (lower is better). Everything runs in one process, one row at a time.

Models: `outlier` is a random OPT (OPT vocabulary) whose LayerNorms get OPT-like outlier
channels (rptq/outliers.py); `outlier-balanced` is that model with the weights that read the
outlier channels scaled so that they carry half of each linear's input energy (`outlier_share`,
rptq/outliers.py: otherwise they carry 86-95 % and the ordinary channels hardly matter); `plain` is
the same random OPT without outliers; `--model DIR` adds a
checkpoint (the trained tiny LM of bench/train_tiny_lm.py when it exists).

    python bench/act_metrics.py                                  # writes RESULTS.md
    python bench/act_metrics.py --models outlier --settings A8 --limit 2 --no-write   # smoke
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    TINY_MODEL,
    add_calibration_args,
    machine_lines,
    shown,
    utc_now,
    write_section,
)

SECTION = "act-metrics"
# (label, abits, only_quant_kv)
SETTINGS = {"A8": (8, False), "A4": (4, False), "A3": (3, False), "A4KV": (4, True)}
METRICS = ("ema_minmax", "minmax", "mse", "percentile")
GRANULARITIES = ("tensor", "cluster", "channel")
# The outlier model: hidden 256, 4 layers, 8 heads, OPT vocabulary.
RANDOM_SHAPE = {"num_layers": 4, "hidden_size": 256, "num_heads": 8, "ffn_dim": 1024,
                "vocab_size": 50272, "max_positions": 512, "weight_std": 0.05}
BALANCED_SHARE = 0.5  # `outlier-balanced`: the outlier channels' share of a linear's input energy


def _log(message: str) -> None:
    print(f"[{utc_now()}] {message}", file=sys.stderr, flush=True)


def _load(name: str, args: argparse.Namespace):  # noqa: ANN202 (LoadedModel)
    from rptq.model.load import from_module, load_model
    from rptq.outliers import make_outlier_opt
    from rptq.tiny import make_tiny_opt

    if name == "outlier":
        return from_module(make_outlier_opt(**RANDOM_SHAPE), "random-opt-outliers")
    if name == "outlier-balanced":
        model = make_outlier_opt(outlier_share=BALANCED_SHARE, **RANDOM_SHAPE)
        return from_module(model, "random-opt-outliers-balanced")
    if name == "plain":
        return from_module(make_tiny_opt(**RANDOM_SHAPE), "random-opt")
    return load_model(name)


def measure(args: argparse.Namespace) -> dict[str, object]:
    """Every (model, setting, metric, granularity) row; results also go to --json-out."""
    import torch

    from rptq.calib.runner import calibrate
    from rptq.data import calibration_windows, eval_tokens, eval_windows, load_tokenizer
    from rptq.plan import Recipe
    from rptq.runtime.divergence import next_token_kl
    from rptq.runtime.parity import sqnr_db
    from rptq.runtime.reference import ReferenceModel

    tokenizer = load_tokenizer(None, args.data_dir)
    calib = calibration_windows(args.calib_dataset, tokenizer, args.nsamples, args.seq_len,
                                args.seed, args.data_dir)
    text = eval_tokens("wikitext2", tokenizer, args.data_dir, args.seq_len)
    evals = eval_windows(text.tokens, args.seq_len)[: args.limit]
    rows: list[dict[str, object]] = []
    for model_name in args.models:
        model = _load(model_name, args)
        fp = ReferenceModel(model)
        fp_logits = [fp(evals[i : i + 1]) for i in range(evals.shape[0])]
        for label in args.settings:
            abits, kv = SETTINGS[label]
            for metric in args.metrics:
                for gran in GRANULARITIES:
                    recipe = Recipe(wbits=16, abits=abits, only_quant_kv=kv, granularity=gran,
                                    act_metric=metric, calib_dataset=args.calib_dataset,
                                    nsamples=args.nsamples, seq_len=args.seq_len, seed=args.seed)
                    started = time.perf_counter()
                    plan = calibrate(model, calib, recipe)
                    calib_s = time.perf_counter() - started
                    quant = ReferenceModel(model, plan)
                    test = [quant(evals[i : i + 1]) for i in range(evals.shape[0])]
                    ref_all, test_all = torch.cat(fp_logits), torch.cat(test)
                    row = {"model": model_name, "setting": label, "metric": metric,
                           "granularity": gran, "sqnr_db": sqnr_db(ref_all, test_all),
                           "kl": next_token_kl(ref_all, test_all), "calibration_s": calib_s}
                    rows.append(row)
                    _log(json.dumps(row))
                    if args.json_out:
                        Path(args.json_out).write_text(json.dumps(rows, indent=1))
    return {"rows": rows, "eval_windows": int(evals.shape[0])}


def _cell(rows: list[dict[str, object]], **key: str) -> dict[str, object] | None:
    return next((r for r in rows if all(r[k] == v for k, v in key.items())), None)


def render(result: dict[str, object], args: argparse.Namespace, command: str, wall_s: float) -> str:
    """Markdown: per model, one table of SQNR (dB) / KL (nats) by setting, metric, granularity."""
    rows = result["rows"]
    lines = ["## Activation-range metrics on outlier models (`bench/act_metrics.py`)", ""]
    lines += machine_lines()
    lines += [
        f"- command: `{command}` ({wall_s / 60:.1f} min in all, one process, rows in turn)",
        f"- calibration: `{args.calib_dataset}`, {args.nsamples} x {args.seq_len} tokens, seed "
        f"{args.seed}; W16 (float weights: only activation scales differ); default clusters",
        f"- evaluation: WikiText-2 test, first {result['eval_windows']} windows of "
        f"{args.seq_len} tokens, PyTorch fake-quant reference vs the FP model: logit SQNR in dB "
        "(higher is better) / KL(P_fp || P_q) of the next-token distribution in nats (lower is "
        "better)",
        "- `outlier`: random OPT (4 layers, hidden 256, 8 heads, ffn 1024, OPT vocabulary, "
        "weights N(0, 0.05)) with 6 outlier channels in every decoder LayerNorm (gamma x25, "
        "beta +12.5; rptq/outliers.py); `outlier-balanced`: that model with the weight columns "
        f"reading the outlier channels scaled so that they carry {BALANCED_SHARE:.0%} of each "
        "linear's input energy (`outlier_share`); `plain`: the same model without outliers",
        "",
    ]
    for model_name in args.models:
        lines += [f"### {shown(Path(model_name)) if '/' in model_name else model_name}", "",
                  "| setting | metric | per tensor | RPTQ clusters | per channel | "
                  "clusters − tensor |", "| --- | --- | ---: | ---: | ---: | ---: |"]
        for label in args.settings:
            for metric in args.metrics:
                cells = [_cell(rows, model=model_name, setting=label, metric=metric,
                               granularity=g) for g in GRANULARITIES]
                if all(c is None for c in cells):
                    continue
                text = ["not run" if c is None else f"{c['sqnr_db']:.1f} dB / {c['kl']:.4f}"
                        for c in cells]
                gain = ("" if cells[0] is None or cells[1] is None
                        else f"{cells[1]['sqnr_db'] - cells[0]['sqnr_db']:+.1f} dB")
                lines.append(f"| W16{label} | `{metric}` | " + " | ".join(text) + f" | {gain} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_calibration_args(parser, TINY_MODEL, nsamples=32, seq_len=256)
    parser.add_argument("--models", type=lambda s: s.split(","), default=["outlier", "plain"])
    parser.add_argument("--settings", type=lambda s: s.split(","), default=list(SETTINGS))
    parser.add_argument("--metrics", type=lambda s: s.split(","), default=list(METRICS))
    parser.add_argument("--limit", type=int, default=16, help="WikiText-2 windows to score")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--section", default=SECTION)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--from-json", type=Path,
                        help="render rows a previous run wrote with --json-out (no measuring)")
    parser.add_argument("--wall-min", type=float, default=0.0,
                        help="with --from-json: that run's wall time, for the report")
    parser.add_argument("--command", help="with --from-json: that run's command line")
    args = parser.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    command = "python bench/act_metrics.py " + shlex.join(given)
    started = time.perf_counter()
    if args.from_json:
        rows = json.loads(args.from_json.read_text())
        result = {"rows": rows, "eval_windows": args.limit}
        text = render(result, args, args.command or command.strip(), args.wall_min * 60)
    else:
        result = measure(args)
        text = render(result, args, command.strip(), time.perf_counter() - started)
    print(text)
    if not args.no_write:
        write_section(args.section, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
