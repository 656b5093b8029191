"""Weight methods: WikiText-2 perplexity of RTN, GPTQ and GPTQT, each with and without LoRC.

One row per (bit setting, weight method, LoRC rank): calibrate (RPTQ activations as the plan
says, the chosen weight method), then score the in-memory plan with the PyTorch fake-quant
reference, and export the ONNX graph to measure the bytes of the quantized linear weights
(codes or binary planes, scales, LoRC factors) at opset 21 and, for GPTQT, at opset 25 (INT2
planes). Each row is its own subprocess, one at a time, so timings and peak RSS are its own.

    python bench/weight_methods.py              # the whole table, written into RESULTS.md
    python bench/weight_methods.py --settings W4A16 --methods gptq --no-write
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    CACHE,
    PYTHON,
    TINY_MODEL,
    add_calibration_args,
    gib,
    machine_lines,
    require_model,
    run_measured,
    shown,
    utc_now,
    write_section,
)

# (label, wbits, abits, only_quant_kv): the settings
SETTINGS: tuple[tuple[str, int, int, bool], ...] = (
    ("W4A16", 4, 16, False),
    ("W3A16", 3, 16, False),
    ("W2A16", 2, 16, False),
    ("W4A4", 4, 4, False),
    ("W3A3KV", 3, 3, True),
)
METHODS = ("rtn", "gptq", "gptqt")
SECTION = "weight-methods"
MEMORY_LIMIT_BYTES = 16 * 2**30  # a guard for the shared machine, far above a tiny-model row


@dataclass
class Row:
    """One table row."""

    label: str
    method: str
    lorc_rank: int
    ppl: float | None = None
    windows: int | None = None
    calibration_s: float | None = None
    eval_s: float | None = None
    linear_bytes_fp32: int | None = None
    linear_bytes_21: int | None = None
    linear_bytes_25: int | None = None
    wall_s: float | None = None
    peak_rss: int | None = None
    error: str = ""


def _log(message: str) -> None:
    print(f"[{utc_now()}] {message}", file=sys.stderr, flush=True)


def _linear_bytes(model: object, plan: object, opset: int) -> tuple[int, int]:
    """(fp32 bytes, quantized bytes) of the six linears' weights in the exported graph."""
    from rptq.exporter.opt import build_fp_graph
    from rptq.passes.context import PassContext
    from rptq.passes.pipeline import run_passes

    graph = build_fp_graph(model, dtype="float32", opset=opset)  # type: ignore[arg-type]
    _, results = run_passes(graph, PassContext(plan=plan, opset=opset))  # type: ignore[arg-type]
    counts = {r.name: r.counts for r in results}
    before = sum(counts[p].get("weight_bytes_before", 0) for p in counts)
    after = sum(counts[p].get("weight_bytes_after", 0) for p in counts)
    return before, after + counts.get("lowrank_branches", {}).get("lorc_bytes", 0)


@dataclass
class Inputs:
    """What every row shares: the model, the calibration windows, the evaluation windows."""

    model: object
    calibration: object
    evaluation: object


def load_inputs(args: argparse.Namespace) -> Inputs:
    """Model, tokenizer-made calibration windows and the first `limit` WikiText-2 windows."""
    from rptq.data import calibration_windows, eval_tokens, eval_windows, load_tokenizer
    from rptq.model.load import load_model

    model = load_model(str(args.model))
    tokenizer = load_tokenizer(model.directory, args.data_dir)
    calibration = calibration_windows(
        args.calib_dataset, tokenizer, args.nsamples, args.seq_len, args.seed, args.data_dir
    )
    text = eval_tokens("wikitext2", tokenizer, args.data_dir, args.seq_len)
    return Inputs(model, calibration, eval_windows(text.tokens, args.seq_len)[: args.limit])


def measure(
    args: argparse.Namespace, inputs: Inputs, label: str, method: str, rank: int
) -> dict[str, object]:
    """Calibrate one recipe (none for FP), measure its weight bytes, score it on WikiText-2."""
    from rptq.calib.runner import calibrate
    from rptq.plan import Recipe
    from rptq.runtime.perplexity import perplexity
    from rptq.runtime.reference import ReferenceModel

    out: dict[str, object] = {}
    plan = None
    if label != "FP":
        _, wbits, abits, kv = next(s for s in SETTINGS if s[0] == label)
        recipe = Recipe(
            wbits=wbits, abits=abits, only_quant_kv=kv, weight_method=method, lorc_rank=rank,
            lorc_bits=args.lorc_bits, calib_dataset=args.calib_dataset, nsamples=args.nsamples,
            seq_len=args.seq_len, seed=args.seed,
        )  # fmt: skip
        started = time.perf_counter()
        plan = calibrate(inputs.model, inputs.calibration, recipe, device=args.device)  # type: ignore[arg-type]
        out["calibration_s"] = time.perf_counter() - started
        out["linear_bytes_fp32"], out["linear_bytes_21"] = _linear_bytes(inputs.model, plan, 21)
        if method == "gptqt":
            out["linear_bytes_25"] = _linear_bytes(inputs.model, plan, 25)[1]
    started = time.perf_counter()
    result = perplexity(ReferenceModel(inputs.model, plan), inputs.evaluation)  # type: ignore[arg-type]
    out.update(ppl=result.ppl, windows=result.windows, eval_s=time.perf_counter() - started)
    return out


def run_row(args: argparse.Namespace) -> int:
    """Worker: one row in its own process (its own timings and peak RSS)."""
    out = measure(args, load_inputs(args), args.label, args.method, args.lorc_rank)
    args.json_out.write_text(json.dumps(out, indent=1))
    return 0


def _run_row(args: argparse.Namespace, label: str, method: str, rank: int) -> Row:
    name = f"{label}-{method}-r{rank}"
    work = args.work_dir
    for sub in ("rows", "logs"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    cmd = [PYTHON, str(Path(__file__).resolve()), "row", "--label", label, "--method", method,
           "--lorc-rank", str(rank), "--lorc-bits", str(args.lorc_bits), "--device", args.device,
           "--model", str(args.model), "--data-dir", str(args.data_dir),
           "--calib-dataset", args.calib_dataset, "--nsamples", str(args.nsamples),
           "--seq-len", str(args.seq_len), "--seed", str(args.seed), "--limit", str(args.limit),
           "--json-out", str(work / "rows" / f"{name}.json")]  # fmt: skip
    _log(f"{name}: {shlex.join(cmd)}")
    result = run_measured(cmd, MEMORY_LIMIT_BYTES, work / "logs", name)
    _log(f"{name}: {result.elapsed_s:.1f} s, " + ("ok" if result.ok else result.error_line()))
    row = Row(label, method, rank, wall_s=result.elapsed_s, peak_rss=result.peak_rss_bytes)
    if not result.ok:
        row.error = result.error_line()
        return row
    for key, value in json.loads((work / "rows" / f"{name}.json").read_text()).items():
        setattr(row, key, value)
    return row


def _fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _rss(value: int | None) -> str:
    return "—" if value is None else gib(value)


def _kib(value: int | None) -> str:
    return "—" if value is None else f"{value / 1024:.0f}"


def _table(rows: list[Row], limit: int) -> str:
    lines = [
        f"| bits | weights | LoRC | wikitext2 ppl ({limit} × 512) | Δ vs RTN | calibration s "
        "| linear weights KiB (opset 21) | (opset 25) | peak RSS |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rtn = {(r.label, r.lorc_rank): r.ppl for r in rows if r.method == "rtn"}
    for r in rows:
        if r.label == "FP":
            lines.append(f"| FP | fp32 | — | {_fmt(r.ppl, 2)} | | | | | {_rss(r.peak_rss)} |")
            continue
        base = rtn.get((r.label, r.lorc_rank))
        delta = "" if r.ppl is None or base is None or r.method == "rtn" else f"{r.ppl - base:+.2f}"
        lorc = f"rank {r.lorc_rank}" if r.lorc_rank else "—"
        ppl = _fmt(r.ppl, 2) if not r.error else f"failed: {r.error}"
        lines.append(
            f"| {r.label} | {r.method} | {lorc} | {ppl} | {delta} | {_fmt(r.calibration_s)} "
            f"| {_kib(r.linear_bytes_21)} | {_kib(r.linear_bytes_25)} | {_rss(r.peak_rss)} |"
        )
    return "\n".join(lines)


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"


def _report(args: argparse.Namespace, rows: list[Row], argv: list[str], total_s: float) -> str:
    fp32 = next((r.linear_bytes_fp32 for r in rows if r.linear_bytes_fp32), None)
    return "\n".join([
        "## Weight methods: RTN, GPTQ, GPTQT, ± LoRC (bench/weight_methods.py)",
        "",
        *machine_lines(),
        f"- rows: {'all in one process' if args.in_process else 'one subprocess each'}; "
        f"calibration on `{args.device}`"
        + (f" ({_gpu_name()})" if args.device.startswith("cuda") else "")
        + "; perplexity on the CPU",
        f"- command: `python {shlex.join(argv)}` ({total_s / 60:.1f} min in all)",
        f"- model: `{shown(args.model)}` (6 layers, hidden 256, ffn 1024; the tiny OPT trained "
        "for these benchmarks: only differences between rows mean something)",
        f"- calibration: `{args.calib_dataset}`, nsamples {args.nsamples}, seq_len "
        f"{args.seq_len}, seed {args.seed}; RPTQ default clusters for activations; GPTQ "
        "percdamp 0.01, block 128, no act-order; GPTQT: GPTQ at wbits+1, BCQ, second sweep "
        f"on the BCQ grid; LoRC factors {'int8 per row' if args.lorc_bits == 8 else 'float'}",
        f"- evaluation: PyTorch fake-quant reference, WikiText-2 test, first {args.limit} "
        "windows of 512 tokens; Δ vs RTN: the same bits and LoRC rank with RTN weights",
        "- calibration s: the `calibrate()` call (statistics, clustering, Hessians, weights)",
        "- linear weights KiB: what the ONNX graph stores for the 36 linears (codes or binary "
        "planes, scales, zero points, LoRC factors)"
        + (f"; fp32 they take {fp32 / 1024:.0f} KiB" if fp32 else "")
        + ". Codes use INT4 containers up to 4 bits; GPTQT planes INT4 at opset 21, INT2 at 25",
        "",
        _table(rows, args.limit),
    ]) + "\n"  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", choices=["table", "row"], default="table")
    add_calibration_args(parser, TINY_MODEL)
    parser.add_argument("--limit", type=int, default=32, help="wikitext2 windows per row")
    parser.add_argument("--settings", default=",".join(s[0] for s in SETTINGS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--lorc-ranks", default="0,8", help="comma list; 0 = no LoRC")
    parser.add_argument("--lorc-bits", type=int, choices=[8, 16], default=8)
    parser.add_argument("--work-dir", type=Path, default=CACHE / "weight_methods")
    parser.add_argument("--device", default="cpu", help="torch device for calibration")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="all rows in this process (faster; no per-row peak RSS)",
    )
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    worker = parser.add_argument_group("row worker (internal)")
    worker.add_argument("--label", choices=["FP", *(s[0] for s in SETTINGS)])
    worker.add_argument("--method", choices=METHODS, default="rtn")
    worker.add_argument("--lorc-rank", type=int, default=0)
    worker.add_argument("--json-out", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Every setting × method × LoRC rank as a worker subprocess; write RESULTS.md."""
    raw = sys.argv[1:] if argv is None else argv
    parser = _parser()
    args = parser.parse_args(raw)
    args.model = require_model(args.model)
    if args.command == "row":
        return run_row(args)
    settings = [s for s in args.settings.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    ranks = [int(r) for r in args.lorc_ranks.split(",") if r]
    if bad := set(settings) - {s[0] for s in SETTINGS} or set(methods) - set(METHODS):
        parser.error(f"unknown settings or methods: {sorted(bad)}")
    started = time.perf_counter()
    inputs = load_inputs(args) if args.in_process else None

    def row(label: str, method: str, rank: int) -> Row:
        if inputs is None:
            return _run_row(args, label, method, rank)
        _log(f"{label} {method} LoRC {rank}")
        try:
            return Row(label, method, rank, **measure(args, inputs, label, method, rank))  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 (a failed row is reported in the table)
            return Row(label, method, rank, error=f"{type(exc).__name__}: {exc}"[:300])

    rows = [row("FP", "rtn", 0)]
    for label in settings:
        for rank in ranks:
            for method in methods:
                rows.append(row(label, method, rank))
                print(_table(rows, args.limit), file=sys.stderr, flush=True)
    report = _report(args, rows, ["bench/weight_methods.py", *raw], time.perf_counter() - started)
    print(report)
    if not args.no_write:
        write_section(SECTION, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
