"""Export cost and ONNX Runtime CPU latency: rptq's exporter next to torch.onnx.export.

rptq builds the ONNX graph directly from the checkpoint, one layer at a time, instead of tracing
the Hugging Face module; this measures what that buys (wall time, peak RSS, file size) against
`torch.onnx.export` of the same FP model, and what the W4A4 Q/DQ graph costs at run time on CPU.
Every step is its own subprocess (peak RSS from os.wait4), run one at a time; a watchdog kills a
step whose RSS passes --memory-limit-gib, because the machine is shared.

Models: the trained tiny OPT and a random-weight OPT-1.3B-shaped checkpoint written by
make_random_opt.py under --work-dir. Big files are deleted at the end unless --keep.

    python bench/export.py
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    CACHE,
    PYTHON,
    RPTQ_EXPORT,
    TINY_MODEL,
    Measured,
    default_data_dir,
    gib,
    machine_lines,
    require_model,
    run_measured,
    shown,
    utc_now,
    write_section,
)

SCRIPT = str(Path(__file__).resolve())
OPSET = 21


def _log(message: str) -> None:
    print(f"[{utc_now()}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# workers (each runs in its own subprocess)


def worker_fp_export(model_dir: Path, output: Path) -> None:
    """Plan-less FP export through rptq (the graph every quantized export starts from)."""
    from rptq.exporter.options import ExportOptions
    from rptq.model.load import load_model
    from rptq.workflow import export_onnx

    export_onnx(load_model(str(model_dir)), None, output, ExportOptions(force=True))


def worker_torch_export(model_dir: Path, output: Path, dynamo: bool) -> None:
    """torch.onnx.export of OPTForCausalLM (fp32, eager attention, logits only)."""
    import torch
    from transformers import OPTForCausalLM

    model = OPTForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="eager"
    ).eval()

    class LogitsOnly(torch.nn.Module):
        """Drop the KV cache outputs so both exports have the same interface."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).logits

    ids = torch.randint(3, 1000, (1, 16))
    axes = {"batch": torch.export.Dim("batch"), "sequence": torch.export.Dim("sequence")}
    with torch.no_grad():
        torch.onnx.export(
            LogitsOnly(model),
            (ids, torch.ones_like(ids)),
            str(output),
            opset_version=OPSET,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes=None if dynamo else {
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "logits": {0: "batch", 1: "sequence"},
            },
            dynamic_shapes=(
                {"input_ids": {0: axes["batch"], 1: axes["sequence"]},
                 "attention_mask": {0: axes["batch"], 1: axes["sequence"]}}
                if dynamo else None
            ),
            dynamo=dynamo,
            external_data=True,
        )


def worker_latency(path: Path, seq_len: int, runs: int, json_out: Path) -> None:
    """Median wall time of one batch-1 prefill in ORT CPU (default optimisations)."""
    import numpy as np

    from rptq.log import peak_rss_bytes
    from rptq.runtime.ort import make_session

    started = time.perf_counter()
    session = make_session(path)
    session_s = time.perf_counter() - started
    ids = np.random.default_rng(0).integers(3, 50000, size=(1, seq_len), dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    times, cpu_times = [], []
    for _ in range(runs + 1):  # the first is the warm-up
        started, cpu_started = time.perf_counter(), time.process_time()
        session.run(None, feed)
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
    json_out.write_text(json.dumps({
        "session_s": session_s, "warmup_s": times[0], "runs_s": times[1:],
        "median_s": statistics.median(times[1:]), "median_cpu_s": statistics.median(cpu_times[1:]),
        "peak_rss": peak_rss_bytes(),
    }))


# ---------------------------------------------------------------------------------------------
# orchestration


@dataclass
class Step:
    """One measured subprocess and what it produced."""

    model: str
    what: str
    result: Measured
    files: list[Path] = field(default_factory=list)
    size_bytes: int = 0  # .onnx + external data, taken before the files are deleted
    extra: dict[str, object] = field(default_factory=dict)


def _onnx_files(path: Path) -> list[Path]:
    """The model file and every external-data file beside it in its own directory."""
    return sorted(p for p in path.parent.iterdir() if p.is_file()) if path.exists() else []


def _run(args: argparse.Namespace, model: str, what: str, cmd: list[str]) -> Step:
    name = f"{model}-{what}".replace(" ", "_").replace("/", "_")
    _log(f"{name}: {shlex.join(cmd)}")
    result = run_measured(cmd, int(args.memory_limit_gib * 2**30), args.work_dir / "logs", name)
    _log(f"{name}: {result.elapsed_s:.1f} s, peak RSS {gib(result.peak_rss_bytes)}, "
         + ("ok" if result.ok else f"FAILED: {result.error_line()}"))
    return Step(model, what, result)


def _fresh(directory: Path) -> Path:
    """An empty directory (each ONNX output gets its own, so its files can be listed)."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory


def bench_model(args: argparse.Namespace, label: str, model_dir: Path) -> list[Step]:
    """Calibrate a W4A4 plan (not measured), then the three exports and the ORT latencies."""
    work = args.work_dir / label
    steps: list[Step] = []
    plan = work / "plan-w4a4"
    _fresh(work)
    calib = [RPTQ_EXPORT, "calibrate", str(model_dir), "--wbits", "4", "--abits", "4",
             "--calib-dataset", "c4-sample", "--nsamples", str(args.nsamples), "--seq-len",
             str(args.calib_seq_len), "--seed", "2", "--data-dir", str(args.data_dir),
             "-o", str(plan), "--force"]
    steps.append(_run(args, label, "calibrate W4A4 plan (context only)", calib))
    outputs = {
        "rptq FP32 export (no plan)": _fresh(work / "rptq-fp32") / "model.onnx",
        "rptq W4A4 export": _fresh(work / "rptq-w4a4") / "model.onnx",
        f"torch.onnx.export FP32 (dynamo={args.dynamo})": _fresh(work / "torch-fp32")
        / "model.onnx",
    }
    commands = [
        [PYTHON, SCRIPT, "fp-export", str(model_dir), str(outputs["rptq FP32 export (no plan)"])],
        [RPTQ_EXPORT, "export", str(model_dir), "--plan", str(plan), "-o",
         str(outputs["rptq W4A4 export"]), "--force"],
        [PYTHON, SCRIPT, "torch-export", str(model_dir), str(list(outputs.values())[2])]
        + (["--dynamo"] if args.dynamo else []),
    ]
    for (what, output), cmd in zip(outputs.items(), commands, strict=True):
        if what == "rptq W4A4 export" and not steps[0].result.ok:
            continue
        step = _run(args, label, what, cmd)
        step.files = _onnx_files(output) if step.result.ok else []
        step.size_bytes = sum(p.stat().st_size for p in step.files)
        steps.append(step)
    for step in [s for s in steps if s.files]:
        json_out = args.work_dir / "logs" / f"{label}-latency-{len(steps)}.json"
        cmd = [PYTHON, SCRIPT, "latency", str(step.files[0].parent / "model.onnx"),
               "--seq-len", str(args.seq_len), "--runs", str(args.runs), "--json-out",
               str(json_out)]
        latency = _run(args, label, f"ORT latency of {step.what}", cmd)
        if latency.result.ok:
            latency.extra = json.loads(json_out.read_text())
        latency.extra["graph"] = step.what
        steps.append(latency)
    return steps


def _cell(step: Step) -> str:
    return f"{step.result.elapsed_s:.1f}" if step.result.ok else "failed"


def _export_table(steps: list[Step]) -> str:
    lines = ["| model | step | wall s | CPU s | load | peak RSS | output size | result |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for s in steps:
        if s.what.startswith("ORT latency"):
            continue
        size = f"{s.size_bytes / 2**20:,.1f} MiB" if s.files else "—"
        result = "ok" if s.result.ok else f"`{s.result.error_line()}`"
        lines.append(f"| {s.model} | {s.what} | {s.result.elapsed_s:.1f} "
                     f"| {s.result.cpu_s:.1f} | {s.result.load_1min:.1f} "
                     f"| {gib(s.result.peak_rss_bytes)} | {size} | {result} |")
    return "\n".join(lines)


def _latency_table(steps: list[Step], seq_len: int) -> str:
    lines = [f"| model | graph | median prefill s ({seq_len} tokens, batch 1) | runs s "
             "| median CPU s per run | warm-up s | session s | peak RSS | load |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for s in (s for s in steps if s.what.startswith("ORT latency")):
        e = s.extra
        if not s.result.ok:
            lines.append(f"| {s.model} | {e['graph']} | failed: `{s.result.error_line()}` "
                         "| | | | | | |")
            continue
        runs = ", ".join(f"{t:.2f}" for t in e["runs_s"])  # type: ignore[union-attr]
        lines.append(f"| {s.model} | {e['graph']} | {e['median_s']:.3f} | {runs} "
                     f"| {e['median_cpu_s']:.2f} | {e['warmup_s']:.2f} | {e['session_s']:.1f} "
                     f"| {gib(s.result.peak_rss_bytes)} | {s.result.load_1min:.1f} |")
    return "\n".join(lines)


def _report(args: argparse.Namespace, steps: list[Step], argv: list[str], total_s: float,
            setup: list[Step]) -> str:
    parts = [
        "## Export cost and ORT CPU latency (bench/export.py)",
        "",
        *machine_lines(),
        f"- command: `python {shlex.join(argv)}` ({total_s / 60:.1f} min in all)",
        f"- models: `tiny` = `{shown(args.tiny_model)}` (the trained 6-layer OPT); `opt-1.3b "
        "random` = random fp16 weights in the shape of facebook/opt-1.3b (24 layers, hidden "
        "2048, 32 heads, ffn 8192), written by `python bench/make_random_opt.py --size 1.3b "
        "-o DIR` under the work directory and deleted afterwards",
        f"- W4A4 plans: `rptq-export calibrate MODEL --wbits 4 --abits 4 --calib-dataset "
        f"c4-sample --nsamples {args.nsamples} --seq-len {args.calib_seq_len} --seed 2`: very "
        "few samples on purpose, since calibration cost is not what is measured here (its row "
        "is context only)",
        "- rptq FP32 export: `python bench/export.py fp-export MODEL OUT` = "
        "`rptq.workflow.export_onnx(load_model(MODEL), None, OUT)`; rptq W4A4 export: "
        "`rptq-export export MODEL --plan PLAN -o OUT`; torch.onnx.export: "
        "`python bench/export.py torch-export MODEL OUT` (OPTForCausalLM fp32, eager attention, "
        f"opset {OPSET}, inputs input_ids + attention_mask, logits only, "
        f"dynamo={args.dynamo}, external data)",
        "- wall s, CPU s (user + system, all threads) and peak RSS are those of each whole "
        "subprocess (interpreter start and model load included); load = 1-minute load average "
        "when the step ended (2 cores shared with other engineers' test runs: above 2, wall "
        "and CPU times are both inflated, the latter by OpenMP spin-waiting); output size "
        "counts the .onnx file and its external data",
        f"- latency: `python bench/export.py latency ONNX --seq-len {args.seq_len} --runs "
        f"{args.runs}`: `rptq.runtime.ort.make_session` (CPU, default ORT optimisations), one "
        f"warm-up then {args.runs} timed runs of a {args.seq_len}-token prefill, batch 1",
    ]
    if setup:
        parts.append("- setup (not a measurement of rptq): " + "; ".join(
            f"{s.what}: {s.result.elapsed_s:.1f} s, peak RSS {gib(s.result.peak_rss_bytes)}"
            + ("" if s.result.ok else f", FAILED `{s.result.error_line()}`") for s in setup))
    parts += ["", _export_table(steps), "", _latency_table(steps, args.seq_len)]
    return "\n".join(parts) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    fp = sub.add_parser("fp-export", help="worker: rptq FP export")
    torch_ = sub.add_parser("torch-export", help="worker: torch.onnx.export")
    for p in (fp, torch_):
        p.add_argument("model", type=Path)
        p.add_argument("output", type=Path)
    torch_.add_argument("--dynamo", action="store_true")
    lat = sub.add_parser("latency", help="worker: ORT prefill latency")
    lat.add_argument("onnx", type=Path)
    lat.add_argument("--seq-len", type=int, default=512)
    lat.add_argument("--runs", type=int, default=5)
    lat.add_argument("--json-out", type=Path, required=True)

    parser.add_argument("--models", default="tiny,1.3b", help="comma list of tiny, 1.3b")
    parser.add_argument("--tiny-model", type=Path, default=TINY_MODEL)
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--work-dir", type=Path, default=CACHE / "export")
    parser.add_argument("--nsamples", type=int, default=4, help="calibration windows (plan only)")
    parser.add_argument("--calib-seq-len", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512, help="prefill tokens for latency")
    parser.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up")
    parser.add_argument("--dynamo", action="store_true", help="torch.onnx.export(dynamo=True)")
    parser.add_argument("--memory-limit-gib", type=float, default=19.0,
                        help="kill a step above this RSS (the machine is shared)")
    parser.add_argument("--keep", action="store_true", help="keep checkpoints and ONNX files")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a worker, or run the whole benchmark and write its RESULTS.md section."""
    raw = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(raw)
    if args.command == "fp-export":
        worker_fp_export(args.model, args.output)
        return 0
    if args.command == "torch-export":
        worker_torch_export(args.model, args.output, args.dynamo)
        return 0
    if args.command == "latency":
        worker_latency(args.onnx, args.seq_len, args.runs, args.json_out)
        return 0
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    started = time.perf_counter()
    steps: list[Step] = []
    setup: list[Step] = []
    try:
        if "tiny" in models:
            steps += bench_model(args, "tiny", require_model(args.tiny_model))
        if "1.3b" in models:
            random_dir = args.work_dir / "random-opt-1.3b"
            shutil.rmtree(random_dir, ignore_errors=True)
            make = [PYTHON, str(Path(SCRIPT).with_name("make_random_opt.py")), "--size", "1.3b",
                    "-o", str(random_dir)]
            setup.append(_run(args, "opt-1.3b random", "make_random_opt.py --size 1.3b", make))
            if setup[-1].result.ok:
                steps += bench_model(args, "opt-1.3b random", random_dir)
    finally:
        if not args.keep:
            for label in ("tiny", "opt-1.3b random", "random-opt-1.3b"):
                shutil.rmtree(args.work_dir / label, ignore_errors=True)
    report = _report(args, steps, ["bench/export.py", *raw], time.perf_counter() - started, setup)
    print(report)
    if not args.no_write:
        write_section("export", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
