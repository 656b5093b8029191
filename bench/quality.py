"""RPTQ quality ladder: WikiText-2 perplexity per bit setting and activation granularity.

RPTQ's claim is that per-cluster activation scales recover most of what per-channel scales
would give over a single per-tensor scale, at a cost TensorRT and ORT can run. So every bit
setting is calibrated three times (granularity tensor, cluster, channel) with the same data and
seed, and the table reports how much of the tensor -> channel perplexity gap the clusters close.

Each row (calibrate, then evaluate the plan with the PyTorch fake-quant reference) runs in its own
subprocess, one at a time, so its peak RSS is its own; calibration's peak is sampled in the worker
before evaluation starts.

    python bench/quality.py --limit 64 --nsamples 128
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    CACHE,
    PYTHON,
    add_calibration_args,
    default_model,
    gib,
    machine_lines,
    require_model,
    run_measured,
    shown,
    utc_now,
    write_section,
)

# (label, wbits, abits, only_quant_kv), in the paper's order
SETTINGS: tuple[tuple[str, int, int, bool], ...] = (
    ("W4A16", 4, 16, False),
    ("W4A8", 4, 8, False),
    ("W4A4", 4, 4, False),
    ("W4A4KV", 4, 4, True),
    ("W4A3KV", 4, 3, True),
    ("W3A3KV", 3, 3, True),
)
GRANULARITIES = ("tensor", "cluster", "channel")
FULL_SPLIT_WINDOWS = 561  # WikiText-2 test at 512 tokens with the OPT tokenizer
NO_ACTS = ("FP", "W4A16")  # rows without activation quantization: granularity does not apply
MEMORY_LIMIT_BYTES = 16 * 2**30  # far above a tiny-model row: a guard for the shared machine


@dataclass
class Row:
    """One table row: a calibrated recipe (or FP) and its perplexity."""

    label: str
    granularity: str
    wall_s: float | None = None  # the whole worker subprocess
    peak_rss: int | None = None  # the whole worker subprocess
    ppl: float | None = None
    windows: int | None = None
    calibration_s: float | None = None
    calibration_cpu_s: float | None = None
    calib_peak_rss: int | None = None
    load_1min: float | None = None
    eval_s: float | None = None
    full_ppl: float | None = None
    full_windows: int | None = None
    full_eval_s: float | None = None
    load_error: str = ""
    error: str = ""


def _log(message: str) -> None:
    print(f"[{utc_now()}] {message}", file=sys.stderr, flush=True)


def _row_cmd(args: argparse.Namespace, label: str, gran: str, work: Path) -> list[str]:
    """The worker command of one row (FP when `label` is FP)."""
    cmd = [PYTHON, str(Path(__file__).resolve()), "row", "--label", label, "--granularity", gran,
           "--model", str(args.model), "--data-dir", str(args.data_dir),
           "--calib-dataset", args.calib_dataset, "--nsamples", str(args.nsamples),
           "--seq-len", str(args.seq_len), "--seed", str(args.seed), "--limit", str(args.limit),
           "--act-metric", args.act_metric,
           "--plan-dir", str(work / "plans" / f"{label}-{gran}"),
           "--json-out", str(work / "rows" / f"{label}-{gran}.json")]
    wanted = f"{label}/{gran}" in args.full or (label == "FP" and "FP" in args.full)
    return cmd + (["--full-split"] if wanted else [])


def _run_row(args: argparse.Namespace, label: str, gran: str, work: Path) -> Row:
    cmd = _row_cmd(args, label, gran, work)
    name = f"{label}-{gran}"
    (work / "rows").mkdir(parents=True, exist_ok=True)
    (work / "plans").mkdir(parents=True, exist_ok=True)
    _log(f"{name}: {shlex.join(cmd)}")
    result = run_measured(cmd, MEMORY_LIMIT_BYTES, work / "logs", name)
    _log(f"{name}: {result.elapsed_s:.1f} s, peak RSS {gib(result.peak_rss_bytes)}, "
         + ("ok" if result.ok else f"FAILED: {result.error_line()}"))
    row = Row(label, gran, wall_s=result.elapsed_s, peak_rss=result.peak_rss_bytes,
              load_1min=result.load_1min)
    if not result.ok:
        row.error = result.error_line()
        return row
    data = json.loads((work / "rows" / f"{name}.json").read_text())
    for key, value in data.items():
        setattr(row, key, value)
    return row


def run_row(args: argparse.Namespace) -> int:
    """Worker: calibrate one recipe, then score the in-memory plan with the PyTorch reference.

    The plan is also saved and re-loaded, and a load failure is recorded rather than fatal, so
    a plan the loader rejects is still measured (the rejection is reported next to the row).
    Peak RSS is sampled right after calibration, before any evaluation memory is touched.
    """
    from rptq.calib.runner import calibrate
    from rptq.data import calibration_windows, eval_tokens, eval_windows, load_tokenizer
    from rptq.log import peak_rss_bytes
    from rptq.model.load import load_model
    from rptq.plan import QuantPlan, Recipe
    from rptq.runtime.perplexity import perplexity
    from rptq.runtime.reference import ReferenceModel

    model = load_model(str(args.model))
    tokenizer = load_tokenizer(model.directory, args.data_dir)
    out: dict[str, object] = {}
    plan = None
    if args.label != "FP":
        _, wbits, abits, kv = next(s for s in SETTINGS if s[0] == args.label)
        recipe = Recipe(wbits=wbits, abits=abits, only_quant_kv=kv, granularity=args.granularity,
                        act_metric=args.act_metric,
                        calib_dataset=args.calib_dataset, nsamples=args.nsamples,
                        seq_len=args.seq_len, seed=args.seed)
        windows = calibration_windows(args.calib_dataset, tokenizer, args.nsamples, args.seq_len,
                                      args.seed, args.data_dir)
        started, cpu_started = time.perf_counter(), time.process_time()
        plan = calibrate(model, windows, recipe)
        out["calibration_s"] = time.perf_counter() - started
        out["calibration_cpu_s"] = time.process_time() - cpu_started
        out["calib_peak_rss"] = peak_rss_bytes()
        del windows
        plan.save(args.plan_dir, force=True)
        try:
            QuantPlan.load(args.plan_dir, expect_hash=model.shape.config_hash())
        except Exception as exc:  # noqa: BLE001 (recorded for the report, not handled)
            out["load_error"] = f"{type(exc).__name__}: {exc}"
    text = eval_tokens("wikitext2", tokenizer, args.data_dir, args.seq_len)
    windows = eval_windows(text.tokens, args.seq_len)
    logits_fn = ReferenceModel(model, plan)
    started = time.perf_counter()
    result = perplexity(logits_fn, windows[: args.limit])
    out.update(ppl=result.ppl, windows=result.windows, eval_s=time.perf_counter() - started)
    if args.full_split:
        started = time.perf_counter()
        result = perplexity(logits_fn, windows)
        out.update(full_ppl=result.ppl, full_windows=result.windows,
                   full_eval_s=time.perf_counter() - started)
    args.json_out.write_text(json.dumps(out, indent=1))
    return 0


def _fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _gap_closed(rows: dict[tuple[str, str], Row], label: str) -> str:
    """(ppl_tensor - ppl_cluster) / (ppl_tensor - ppl_channel), as measured."""
    ppl = {g: rows[(label, g)].ppl if (label, g) in rows else None for g in GRANULARITIES}
    if any(v is None or not math.isfinite(v) for v in ppl.values()):
        return "—"
    gap = ppl["tensor"] - ppl["channel"]  # type: ignore[operator]
    if gap <= 0:
        gain = ppl["tensor"] - ppl["cluster"]  # type: ignore[operator]
        return (f"undefined: per-channel is {-gap:.2f} worse than per-tensor; "
                f"cluster is {gain:+.2f} better than per-tensor")
    closed = (ppl["tensor"] - ppl["cluster"]) / gap  # type: ignore[operator]
    note = "" if 0.0 <= closed <= 1.0 else " (outside tensor..channel)"
    return f"{100 * closed:.0f} %{note}"


def _table(rows: list[Row], limit: int) -> str:
    by_key = {(r.label, r.granularity): r for r in rows}
    lines = [
        f"| bits | activation scales | wikitext2 ppl ({limit} windows) | calibration s "
        "| calibration CPU s | calibration peak RSS | eval s | load | gap closed by RPTQ |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    seen: set[str] = set()
    for r in rows:
        gap = ""
        if r.label not in seen and (r.label, "cluster") in by_key and r.label not in NO_ACTS:
            gap = _gap_closed(by_key, r.label)
        seen.add(r.label)
        scales = "— (no activation quantization)" if r.label in NO_ACTS else r.granularity
        ppl = _fmt(r.ppl, 2) if not r.error else f"failed: {r.error}"
        rss = gib(r.calib_peak_rss) if r.calib_peak_rss is not None else "—"
        lines.append(f"| {r.label} | {scales} | {ppl} | {_fmt(r.calibration_s)} "
                     f"| {_fmt(r.calibration_cpu_s)} | {rss} | {_fmt(r.eval_s)} "
                     f"| {_fmt(r.load_1min)} | {gap} |")
    return "\n".join(lines)


def _full_table(rows: list[Row]) -> str:
    lines = ["| bits | activation scales | wikitext2 ppl (full split) | windows | eval s |",
             "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        if r.full_ppl is None:
            continue
        scales = "—" if r.label in NO_ACTS else r.granularity
        lines.append(f"| {r.label} | {scales} | {_fmt(r.full_ppl, 2)} | {r.full_windows} "
                     f"| {_fmt(r.full_eval_s)} |")
    return "\n".join(lines)


def _report(args: argparse.Namespace, rows: list[Row], argv: list[str], total_s: float) -> str:
    tiny = args.model.name == "opt-tiny-lm"
    parts = [
        "## Quality ladder (bench/quality.py)"
        + ("" if args.act_metric == "ema_minmax" else f", activation ranges {args.act_metric}"),
        "",
        *machine_lines(),
        f"- command: `python {shlex.join(argv)}` ({total_s / 60:.1f} min in all)",
        f"- model: `{shown(args.model)}`"
        + (" — the small OPT trained for these benchmarks (6 layers, hidden 256, 8 heads, "
           "ffn 1024, OPT vocabulary, 512 positions; about 1.2M training tokens of C4-sample "
           "+ WikiText-2 *validation*, best held-out loss 5.93; see its TRAINING.json). Its "
           "perplexities are those of a tiny, briefly trained model, far above any published "
           "OPT number; only the differences between rows mean something." if tiny else ""),
        "- FP: the checkpoint's fp16 weights, computed in fp32 (as every row is)",
        f"- calibration: `{args.calib_dataset}` (the only calibration text staged; the train "
        f"splits are missing), nsamples {args.nsamples}, seq_len {args.seq_len}, seed "
        f"{args.seed}; RTN weights; activation ranges `{args.act_metric}`; default clusters "
        "R1=32, R2=4/head, R3=4/head, R4=32, R5=32",
        f"- evaluation: PyTorch fake-quant reference (`rptq.runtime.reference.ReferenceModel`), "
        f"WikiText-2 test, the first {args.limit} non-overlapping windows of {args.seq_len} "
        f"tokens (the full split has {FULL_SPLIT_WINDOWS})",
        "- calibration s / CPU s: wall and process CPU time (user + system, both threads) of the "
        "`calibrate()` call; peak RSS: the worker's, sampled right after it (model load and "
        "calibration data included; each row is its own subprocess); eval s: the perplexity "
        "loop; load: 1-minute load average when the row ended. The 2 cores are shared with "
        "other engineers' test runs: at load > 2 wall times are inflated, and so are CPU "
        "times (OpenMP threads spin while they wait), so compare rows at similar load",
        "- gap closed = (ppl_tensor − ppl_cluster) / (ppl_tensor − ppl_channel), as measured",
        "",
        _table(rows, args.limit),
    ]
    if any(r.full_ppl is not None for r in rows):
        parts += ["", "Full WikiText-2 test split (same plans, same workers):", "",
                  _full_table(rows)]
    failed_loads = [r for r in rows if r.load_error]
    if failed_loads:
        parts += ["", "Plans that `QuantPlan.load` rejects after `save` (these rows were scored "
                  "from the in-memory plan returned by `calibrate`):", ""]
        parts += [f"- {r.label}/{r.granularity}: `{r.load_error}`" for r in failed_loads]
    return "\n".join(parts) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", choices=["ladder", "row"], default="ladder",
                        help="ladder (default): the whole table; row: one worker (internal)")
    add_calibration_args(parser, default_model(), nsamples=128)
    parser.add_argument("--act-metric", choices=["ema_minmax", "minmax", "mse", "percentile"],
                        default="ema_minmax",
                        help="how activation ranges combine across calibration rows")
    parser.add_argument("--limit", type=int, default=64, help="wikitext2 windows per row")
    parser.add_argument("--settings", default=",".join(s[0] for s in SETTINGS),
                        help="comma list of bit settings")
    parser.add_argument("--full", default="FP,W4A4/cluster",
                        help="rows also scored on the full split, e.g. FP,W4A4/tensor; '' none")
    parser.add_argument("--work-dir", type=Path, default=CACHE / "quality")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    worker = parser.add_argument_group("row worker (internal)")
    worker.add_argument("--label", choices=["FP", *(s[0] for s in SETTINGS)])
    worker.add_argument("--granularity", choices=GRANULARITIES, default="cluster")
    worker.add_argument("--plan-dir", type=Path)
    worker.add_argument("--json-out", type=Path)
    worker.add_argument("--full-split", dest="full_split", action="store_true")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options; bit settings are checked before any calibration starts."""
    parser = _parser()
    args = parser.parse_args(argv)
    known = {s[0] for s in SETTINGS}
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if unknown := set(args.settings) - known:
        parser.error(f"unknown settings {sorted(unknown)}; choose from {sorted(known)}")
    args.full = [s.strip() for s in args.full.split(",") if s.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    """Each setting x granularity as a worker subprocess, one at a time; write RESULTS.md."""
    raw = sys.argv[1:] if argv is None else argv
    args = parse_args(raw)
    args.model = require_model(args.model)
    if args.command == "row":
        return run_row(args)
    started = time.perf_counter()
    rows = [_run_row(args, "FP", "cluster", args.work_dir)]
    for setting in (s for s in SETTINGS if s[0] in args.settings):
        for gran in ("cluster",) if setting[2] >= 16 else GRANULARITIES:
            rows.append(_run_row(args, setting[0], gran, args.work_dir))
            print(_table(rows, args.limit), file=sys.stderr, flush=True)
    report = _report(args, rows, ["bench/quality.py", *raw], time.perf_counter() - started)
    print(report)
    if not args.no_write:
        suffix = "" if args.act_metric == "ema_minmax" else f"-{args.act_metric}"
        write_section(f"quality{suffix}", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
