"""Default target vs the exact TensorRT variant: WikiText-2 perplexity of their PyTorch references.

The TensorRT variant (`--target tensorrt`, docs/tensorrt-rules.md "Implementation") folds every
cluster scale and zero point out of the Q/DQ, which changes no activation, but re-quantizes the
weights an activation scale folds into (symmetric, per output channel and scale group,
`--trt-weight-groups`, default 3, from diag(s)·W; bench/trt_outliers.py compares the group
counts on outlier models): that is the measured cost of TensorRT's rules. Each recipe is
calibrated once and scored with both references on the same windows; one row is also run in
ONNX Runtime on both exported graphs to confirm that the graphs compute their references, and
the variant's graph is checked against TensorRT's rules.

    python bench/trt_quality.py                       # W4A8, W4A4, W4A4KV; writes RESULTS.md
    python bench/trt_quality.py --nsamples 2 --limit 2 --no-write   # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
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
    require_model,
    shown,
    utc_now,
    write_section,
)

SECTION = "trt-quality"
# (label, wbits, abits, only_quant_kv)
SETTINGS: tuple[tuple[str, int, int, bool], ...] = (
    ("W4A8", 4, 8, False),
    ("W4A4", 4, 4, False),
    ("W4A4KV", 4, 4, True),
)


def _log(message: str) -> None:
    print(f"[{utc_now()}] {message}", file=sys.stderr, flush=True)


def _ort_ppl(graph, windows) -> tuple[float, float]:  # noqa: ANN001 (onnx.ModelProto, Tensor)
    """Perplexity of an in-memory graph in ORT CPU (default optimisations) and the seconds."""
    from rptq.runtime.ort import OrtLogits, make_session
    from rptq.runtime.perplexity import perplexity

    started = time.perf_counter()
    ppl = perplexity(OrtLogits(make_session(graph)), windows).ppl
    return ppl, time.perf_counter() - started


def measure(args: argparse.Namespace) -> dict[str, object]:
    """Calibrate each setting, score both references, and run ORT + the checker on `ort_row`."""
    from rptq.calib.runner import calibrate
    from rptq.check.rules import check_model, errors
    from rptq.data import calibration_windows, eval_tokens, eval_windows, load_tokenizer
    from rptq.model.load import load_model
    from rptq.plan import Recipe
    from rptq.runtime.perplexity import perplexity
    from rptq.runtime.reference import ReferenceModel
    from rptq.runtime.trt_reference import TrtReferenceModel
    from rptq.workflow import quantized_graph

    model = load_model(str(args.model))
    tokenizer = load_tokenizer(model.directory, args.data_dir)
    text = eval_tokens("wikitext2", tokenizer, args.data_dir, args.seq_len)
    windows = eval_windows(text.tokens, args.seq_len)[: args.limit]
    calib = calibration_windows(
        args.calib_dataset, tokenizer, args.nsamples, args.seq_len, args.seed, args.data_dir
    )
    out: dict[str, object] = {"windows": len(windows), "rows": []}
    started = time.perf_counter()
    out["fp_ppl"] = perplexity(ReferenceModel(model), windows).ppl
    _log(f"FP: ppl {out['fp_ppl']:.3f} ({time.perf_counter() - started:.0f} s)")
    for label, wbits, abits, kv in SETTINGS:
        recipe = Recipe(
            wbits=wbits,
            abits=abits,
            only_quant_kv=kv,
            calib_dataset=args.calib_dataset,
            nsamples=args.nsamples,
            seq_len=args.seq_len,
            seed=args.seed,
        )
        started = time.perf_counter()
        plan = calibrate(model, calib, recipe)
        row: dict[str, object] = {"label": label, "calibration_s": time.perf_counter() - started}
        for key, reference in (("default", ReferenceModel), ("trt", TrtReferenceModel)):
            started = time.perf_counter()
            row[f"{key}_ppl"] = perplexity(reference(model, plan), windows).ppl
            row[f"{key}_eval_s"] = time.perf_counter() - started
        # the same recipe calibrated for the variant: weights quantized as its graph holds them
        trt_plan = calibrate(model, calib, dataclasses.replace(recipe, target="trt"))
        row["trt_calibrated_ppl"] = perplexity(TrtReferenceModel(model, trt_plan), windows).ppl
        if label == args.ort_row:
            for key, target in (("default", "ort"), ("trt", "trt")):
                graph = quantized_graph(model, plan, target=target)
                row[f"{key}_onnx_bytes"] = graph.ByteSize()
                row[f"{key}_ort_ppl"], row[f"{key}_ort_s"] = _ort_ppl(graph, windows)
                if target == "trt":
                    violations = check_model(graph, "trt")
                    row["trt_check_errors"] = len(errors(violations))
                    row["trt_check_warnings"] = sorted(
                        {v.rule_id for v in violations if v.severity == "warning"}
                    )
                del graph
            graph = quantized_graph(model, plan, target="trt", int4_block_size=args.int4_block)
            row["trt_int4_onnx_bytes"] = graph.ByteSize()
            row["trt_int4_check_errors"] = len(errors(check_model(graph, "trt")))
            del graph
        _log(f"{label}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "label"))
        out["rows"].append(row)  # type: ignore[union-attr]
    return out


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _rel(a: float, b: float) -> str:
    return f"{abs(a - b) / b:.2e}"


def report(
    args: argparse.Namespace, data: dict[str, object], argv: list[str], total_s: float
) -> str:
    """The RESULTS.md block: table, ORT confirmation, checker, setup and command."""
    rows: list[dict] = data["rows"]  # type: ignore[assignment]
    lines = [
        "## Default target vs the exact TensorRT variant (`bench/trt_quality.py`)",
        "",
        f"WikiText-2 perplexity, first {data['windows']} windows of {args.seq_len} tokens, "
        f"model `{shown(args.model)}`; calibration {args.calib_dataset}, "
        f"{args.nsamples} x {args.seq_len} tokens, seed {args.seed}, RTN weights, default "
        f"clusters. FP: **{data['fp_ppl']:.3f}**. The first two columns are PyTorch references "
        "of one plan per row (calibrated for the default target); the variant differs only by "
        "re-quantizing, symmetrically per output channel and scale group (default 3), the weights "
        "an activation scale folds "
        "into (docs/tensorrt-rules.md). The last column calibrates the same recipe with "
        "`--target tensorrt`, whose weights are quantized as the variant's graph holds them "
        "(later layers then also calibrate on the variant's outputs).",
        "",
        "| recipe | default target | TensorRT variant | variant − default "
        "| variant, calibrated `--target tensorrt` | that − default |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        d, t, c = row["default_ppl"], row["trt_ppl"], row["trt_calibrated_ppl"]
        lines.append(
            f"| {row['label']} | {d:.3f} | {t:.3f} | {t - d:+.3f} ({(t - d) / d:+.2%}) "
            f"| {c:.3f} | {c - d:+.3f} ({(c - d) / d:+.2%}) |"
        )
    for row in rows:
        if "trt_ort_ppl" not in row:
            continue
        lines += [
            "",
            f"ONNX Runtime (CPU, default optimisations) on the exported graphs, {row['label']}: "
            f"default target {row['default_ort_ppl']:.3f} (reference {row['default_ppl']:.3f}, "
            f"rel. diff {_rel(row['default_ort_ppl'], row['default_ppl'])}), TensorRT variant "
            f"{row['trt_ort_ppl']:.3f} (reference {row['trt_ppl']:.3f}, rel. diff "
            f"{_rel(row['trt_ort_ppl'], row['trt_ppl'])}); `check --target tensorrt` on the "
            f"variant: {row['trt_check_errors']} errors, warnings "
            f"{', '.join(row['trt_check_warnings']) or 'none'} (fp32 export).",
            "",
            f"fp32 ONNX size, {row['label']}: default target (INT4 weights, per-row zero points) "
            f"{_mib(row['default_onnx_bytes'])}, TensorRT variant with INT8 weights "
            f"{_mib(row['trt_onnx_bytes'])}, with `--int4-block {args.int4_block}` "
            f"{_mib(row['trt_int4_onnx_bytes'])} ({row['trt_int4_check_errors']} checker "
            "errors); the fp32 token embedding dominates all three.",
        ]
    lines += ["", *machine_lines(), f"- total wall time: {total_s / 60:.1f} min"]
    lines += ["- command: `" + shlex.join(["python", "bench/trt_quality.py", *argv]) + "`"]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_calibration_args(parser, TINY_MODEL)
    parser.add_argument("--limit", type=int, default=32, help="evaluation windows")
    parser.add_argument("--ort-row", default="W4A4", help="the row also run in ONNX Runtime")
    parser.add_argument("--int4-block", type=int, default=128, choices=[64, 128])
    parser.add_argument("--json-out", type=Path, help="also write the raw numbers here")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    require_model(args.model)
    started = time.perf_counter()
    data = measure(args)
    body = report(args, data, argv, time.perf_counter() - started)
    if args.json_out:
        args.json_out.write_text(json.dumps(data, indent=1))
    if args.no_write:
        print(body)
    else:
        write_section(SECTION, body)
        _log(f"wrote block {SECTION} of bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
