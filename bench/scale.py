"""Scale: peak RSS and wall time of rptq calibrate+export on OPT-1.3B and OPT-6.7B shapes.

The question is whether rptq quantizes and exports a 6.7B model on a 24 GiB machine, so the
goal column divides each step's peak RSS by the fp16 checkpoint size (goal for 6.7B: <= 1.25).
Next to rptq run the cost of `torch.onnx.export` of the same FP model (where fp32 fits in the
memory limit) and the floor: reading and writing the checkpoint's bytes once. The W4A4 graph is
then checked (`rptq-export check --target ort`) and run for one prefill window in ONNX Runtime.

Checkpoints are random fp16 weights of the published shapes (make_random_opt.py). Every
measured step is its own subprocess (peak RSS from os.wait4), one at a time; a watchdog kills a
step above --memory-limit-gib, because the machine is shared. Before each step the checkpoint's
pages are dropped from the page cache (posix_fadvise), so every step reads it from disk alike.
Big files are deleted at the end unless --keep.

    python bench/scale.py
    python bench/scale.py --sizes 1.3b --skip-torch
    python bench/scale.py --sizes 125m --layers 2 --nsamples 2 --seq-len 128 --no-write
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    CACHE,
    PYTHON,
    RPTQ_EXPORT,
    Measured,
    default_data_dir,
    gib,
    machine_lines,
    run_measured,
    shown,
    utc_now,
    write_section,
)

SCRIPT = str(Path(__file__).resolve())
MAKE_RANDOM = str(Path(__file__).resolve().with_name("make_random_opt.py"))
FLOOR_CHUNK_BYTES = 64 * 2**20
TORCH_FIT_FACTOR = 2  # torch.onnx.export holds about 2x the fp32 weights (8.33 GiB on 1.3B)
GOAL_RATIO = 1.25


def _log(message: str) -> None:
    print(f"[{utc_now()}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# workers (each runs in its own subprocess)


def worker_floor(model_dir: Path, output: Path, json_out: Path) -> None:
    """Read every safetensors byte once and write as many bytes: the least any export costs.

    Chunked so the floor's own RSS stays one chunk; fsync so the write reaches the disk rather
    than stopping in the page cache (an export's output has to be on disk too).
    """
    read_s = write_s = 0.0
    total = 0
    with open(output, "wb") as sink:
        for path in sorted(model_dir.glob("*.safetensors")):
            with open(path, "rb", buffering=0) as source:
                while True:
                    started = time.perf_counter()
                    chunk = source.read(FLOOR_CHUNK_BYTES)
                    read_s += time.perf_counter() - started
                    if not chunk:
                        break
                    started = time.perf_counter()
                    sink.write(chunk)
                    write_s += time.perf_counter() - started
                    total += len(chunk)
        started = time.perf_counter()
        sink.flush()
        os.fsync(sink.fileno())
        write_s += time.perf_counter() - started
    json_out.write_text(json.dumps({"bytes": total, "read_s": read_s, "write_s": write_s}))


def worker_fp_export(model_dir: Path, output: Path, dtype: str) -> None:
    """Plan-less export through rptq's streamed exporter (`rptq-export export` needs a plan)."""
    from rptq.exporter.options import ExportOptions
    from rptq.model.load import load_model
    from rptq.workflow import export_onnx

    export_onnx(load_model(str(model_dir)), None, output, ExportOptions(dtype, force=True))


# ---------------------------------------------------------------------------------------------
# orchestration


@dataclass
class Step:
    """One measured subprocess (or one that was not run, with the reason)."""

    what: str
    result: Measured | None = None
    skipped: str = ""
    output_bytes: int = 0  # .onnx + external data, taken before the files are deleted
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether the step ran and exited with status 0."""
        return self.result is not None and self.result.ok


@dataclass
class SizeRun:
    """Everything measured for one model size."""

    label: str
    parameters: int
    checkpoint_bytes: int = 0
    make: Step | None = None
    steps: list[Step] = field(default_factory=list)


def _evict_page_cache(directory: Path) -> None:
    """Drop the checkpoint's pages from the page cache so each step reads it from disk.

    Without this the first reader pays for the disk and the later ones read RAM: the order of
    the steps would decide the timings. Needs no privileges (clean pages of our own files).
    """
    for path in directory.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _checkpoint_parameters(model_dir: Path) -> int:
    """Elements in the checkpoint's safetensors headers.

    Read from the headers rather than computed with rptq (which imports torch): a child's
    ru_maxrss starts at this process's peak RSS (see common.run_measured), so the orchestrating
    process must stay small until the last step has been measured.
    """
    total = 0
    for path in model_dir.glob("*.safetensors"):
        with open(path, "rb") as file:
            header = json.loads(file.read(int.from_bytes(file.read(8), "little")))
        total += sum(math.prod(entry["shape"]) for key, entry in header.items()
                     if key != "__metadata__")
    return total


def _files_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def _fresh(directory: Path) -> Path:
    """An empty directory (each ONNX output gets its own, so its files can be counted)."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory


def _run(args: argparse.Namespace, run: SizeRun, what: str, cmd: list[str],
         model_dir: Path | None = None) -> Step:
    """Run one measured step; evict `model_dir` from the page cache first."""
    if model_dir is not None and not args.warm_cache:
        _evict_page_cache(model_dir)
    name = f"{run.label}-{what}".replace(" ", "_").replace("/", "_").replace(".", "_")
    _log(f"{name}: {shlex.join(cmd)}")
    result = run_measured(cmd, int(args.memory_limit_gib * 2**30), args.work_dir / "logs", name)
    _log(f"{name}: {result.elapsed_s:.1f} s, peak RSS {gib(result.peak_rss_bytes)}, "
         + ("ok" if result.ok else f"FAILED: {result.error_line()}"))
    return Step(what, result)


def _disk_short(directory: Path, need_bytes: int) -> str:
    """A 'not run' reason when the disk under `directory` has less than `need_bytes` free."""
    free = shutil.disk_usage(directory).free
    if free >= need_bytes:
        return ""
    return f"not run: needs {gib(need_bytes)} of disk, {gib(free)} free"


def _stage_lines(stderr: str) -> list[str]:
    """rptq's `[i/n] what` / `done in X s, peak RSS Y GiB` log lines: where the peak happens."""
    stage_start = re.compile(r"\[\d+/\d+\] ")
    return [ln.strip() for ln in stderr.splitlines()
            if stage_start.search(ln) or "done in" in ln]


def _floor(args: argparse.Namespace, run: SizeRun, model_dir: Path, work: Path) -> Step:
    """Read + write the checkpoint's bytes once (the copy is deleted at once)."""
    what = "floor: read + write the checkpoint once"
    if reason := _disk_short(work, run.checkpoint_bytes):
        return Step(what, skipped=reason)
    output, json_out = work / "floor.bin", work / "floor.json"
    step = _run(args, run, what, [PYTHON, SCRIPT, "floor", str(model_dir), str(output),
                "--json-out", str(json_out)], model_dir)
    if step.ok:
        step.extra = json.loads(json_out.read_text())
    output.unlink(missing_ok=True)
    return step


def _w4a4(args: argparse.Namespace, run: SizeRun, model_dir: Path, work: Path) -> list[Step]:
    """rptq calibrate + export in one process, then check the graph and run one prefill."""
    w4a4 = _fresh(work / "w4a4") / "model.onnx"
    cmd = [RPTQ_EXPORT, str(model_dir), "--wbits", "4", "--abits", "4", "--calib-dataset",
           "c4-sample", "--nsamples", str(args.nsamples), "--seq-len", str(args.seq_len),
           "--seed", "2", "--data-dir", str(args.data_dir), "--dtype", args.export_dtype,
           "-o", str(w4a4), "--force"]
    main = _run(args, run, f"rptq calibrate + export W4A4 ({args.export_dtype})", cmd,
                model_dir)
    stages = _stage_lines(main.result.stderr) if main.result else []
    main.extra["stages"] = [ln.replace(str(work), shown(work)) for ln in stages]
    check_what = "rptq-export check --target ort (W4A4 graph)"
    prefill_what = f"ORT CPU prefill, W4A4 graph ({args.ort_seq_len} tokens)"
    if not main.ok:
        reason = "not run: the W4A4 export failed"
        return [main, Step(check_what, skipped=reason), Step(prefill_what, skipped=reason)]
    main.output_bytes = _files_bytes(w4a4.parent)
    check = _run(args, run, check_what,
                 [RPTQ_EXPORT, "check", str(w4a4), "--target", "ort", "--json"])
    with contextlib.suppress(json.JSONDecodeError):  # a crash leaves no JSON
        check.extra = json.loads(check.result.stdout) if check.result else {}
    json_out = work / "prefill.json"
    prefill = _run(args, run, prefill_what,
                   [PYTHON, SCRIPT, "prefill", str(w4a4), "--seq-len", str(args.ort_seq_len),
                    "--runs", str(args.ort_runs), "--json-out", str(json_out)])
    if prefill.ok:
        prefill.extra = json.loads(json_out.read_text())
    if not args.keep:
        shutil.rmtree(w4a4.parent, ignore_errors=True)
    return [main, check, prefill]


def _fp_export(args: argparse.Namespace, run: SizeRun, model_dir: Path, work: Path) -> Step:
    """rptq's streamed exporter without a plan."""
    what = f"rptq FP export ({args.export_dtype}, no plan)"
    if reason := _disk_short(work, run.parameters * (4 if args.export_dtype == "float32" else 2)):
        return Step(what, skipped=reason)
    output = _fresh(work / "fp") / "model.onnx"
    step = _run(args, run, what, [PYTHON, SCRIPT, "fp-export", str(model_dir), str(output),
                "--dtype", args.export_dtype], model_dir)
    step.output_bytes = _files_bytes(output.parent) if step.ok else 0
    if not args.keep:
        shutil.rmtree(output.parent, ignore_errors=True)
    return step


def _torch_export(args: argparse.Namespace, run: SizeRun, model_dir: Path, work: Path) -> Step:
    """torch.onnx.export of the FP model, where twice its fp32 weights fit under the limit."""
    what = "torch.onnx.export FP32 (dynamo=False)"
    need = TORCH_FIT_FACTOR * 4 * run.parameters
    if args.skip_torch:
        return Step(what, skipped="not run: --skip-torch")
    if need > args.memory_limit_gib * 2**30:
        return Step(what, skipped=f"not run: {TORCH_FIT_FACTOR} x fp32 weights = {gib(need)} "
                    f"exceeds the {args.memory_limit_gib:g} GiB memory limit")
    if reason := _disk_short(work, 4 * run.parameters):
        return Step(what, skipped=reason)
    output = _fresh(work / "torch") / "model.onnx"
    step = _run(args, run, what, [PYTHON, SCRIPT, "torch-export", str(model_dir), str(output)],
                model_dir)
    step.output_bytes = _files_bytes(output.parent) if step.ok else 0
    if not args.keep:
        shutil.rmtree(output.parent, ignore_errors=True)
    return step


def bench_size(args: argparse.Namespace, size: str) -> SizeRun:
    """Checkpoint, floor, rptq W4A4 run + check + prefill, rptq FP export, torch export.

    Each output is deleted as soon as its step is done (unless --keep): the 6.7B checkpoint,
    its fp32 FP export and the W4A4 graph together would need about 45 GiB of disk.
    """
    layers = args.layers
    label = f"opt-{size}" + (f" ({layers} layer{'s' * (layers != 1)})" if layers else "")
    run = SizeRun(label, 0)
    work = _fresh(args.work_dir / f"opt-{size}")
    model_dir = work / "checkpoint"
    try:
        make = [PYTHON, MAKE_RANDOM, "--size", size, "-o", str(model_dir)]
        make += ["--layers", str(layers)] if layers else []
        run.make = _run(args, run, "make checkpoint", make)
        if not run.make.ok:
            return run
        run.checkpoint_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
        run.parameters = _checkpoint_parameters(model_dir)
        run.steps.append(_floor(args, run, model_dir, work))
        run.steps += _w4a4(args, run, model_dir, work)
        run.steps.append(_fp_export(args, run, model_dir, work))
        run.steps.append(_torch_export(args, run, model_dir, work))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return run


# ---------------------------------------------------------------------------------------------
# report


def _result_cell(step: Step) -> str:
    if step.result is None:
        return step.skipped
    if not step.result.ok:
        return f"failed: `{step.result.error_line()}`"
    e = step.extra
    if "read_s" in e:
        size_bytes = float(e["bytes"])  # type: ignore[arg-type]
        rate = size_bytes / 1e6 / step.result.elapsed_s
        return (f"ok: {size_bytes / 2**30:.2f} GiB at {rate:,.0f} MB/s (read "
                f"{e['read_s']:.1f} s, write + fsync {e['write_s']:.1f} s)")
    if "status" in e:
        return f"{e['status']}: {e['errors']} errors, {e['warnings']} warnings"
    if "session_s" in e:
        return (f"ok: session {e['session_s']:.1f} s, prefill {e['median_s']:.2f} s "
                f"(warm-up {e['warmup_s']:.2f} s)")
    return "ok"


def _table(runs: list[SizeRun]) -> str:
    lines = ["| model | step | wall s | CPU s | load | peak RSS | peak RSS / fp16 checkpoint "
             "| output | result |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for run in runs:
        for step in run.steps:
            if step.result is None:
                lines.append(f"| {run.label} | {step.what} | — | — | — | — | — | — "
                             f"| {step.skipped} |")
                continue
            r = step.result
            ratio = (f"{r.peak_rss_bytes / run.checkpoint_bytes:.2f}" if run.checkpoint_bytes
                     else "—")
            size = f"{step.output_bytes / 2**30:.2f} GiB" if step.output_bytes else "—"
            lines.append(f"| {run.label} | {step.what} | {r.elapsed_s:.1f} | {r.cpu_s:.1f} "
                         f"| {r.load_1min:.1f} | {gib(r.peak_rss_bytes)} | {ratio} | {size} "
                         f"| {_result_cell(step)} |")
    return "\n".join(lines)


def _size_lines(args: argparse.Namespace, run: SizeRun) -> list[str]:
    """Per size: parameters, checkpoint, how it was made, the goal verdict, rptq's stages."""
    lines = [f"- **{run.label}**: {run.parameters / 1e9:.3f} B parameters, fp16 checkpoint "
             f"{gib(run.checkpoint_bytes)}"]
    if run.make and run.make.result:
        m = run.make.result
        made = (f"written in {m.elapsed_s:.1f} s, peak RSS {gib(m.peak_rss_bytes)}" if m.ok
                else f"make_random_opt.py failed: `{m.error_line()}`")
        lines[-1] += f" ({made})"
    main = next((s for s in run.steps if s.what.startswith("rptq calibrate")), None)
    if main and main.ok and run.checkpoint_bytes:
        ratio = main.result.peak_rss_bytes / run.checkpoint_bytes  # type: ignore[union-attr]
        verdict = "met" if ratio <= GOAL_RATIO else "NOT met"
        scope = "" if not args.layers else " (a truncated model: the goal is for the full one)"
        lines.append(f"  - calibrate + export peak RSS / fp16 checkpoint = {ratio:.2f}: goal "
                     f"<= {GOAL_RATIO} {verdict}{scope}")
    if main and main.extra.get("stages"):
        lines.append("  - rptq's own stage log (peak RSS so far after each stage): "
                     + "; ".join(f"`{s}`" for s in main.extra["stages"]))  # type: ignore[union-attr]
    return lines


def _report(args: argparse.Namespace, runs: list[SizeRun], argv: list[str],
            total_s: float) -> str:
    parts = [
        "## Scale: calibrate + export of OPT-1.3B and OPT-6.7B shapes (bench/scale.py)",
        "",
        *machine_lines(),
        f"- command: `python {shlex.join(argv)}` ({total_s / 60:.1f} min in all), memory "
        f"watchdog {args.memory_limit_gib:g} GiB, work dir `{shown(args.work_dir)}`",
        "- checkpoints: random fp16 weights in the published facebook/opt-* shapes, written by "
        "`python bench/make_random_opt.py --size SIZE"
        + (f" --layers {args.layers}" if args.layers else "") + " -o DIR` (not a measurement "
        "of rptq; its time is given per size below)",
        "- floor: `python bench/scale.py floor CKPT OUT`: read every safetensors byte once and "
        f"write as many bytes to one file ({FLOOR_CHUNK_BYTES // 2**20} MiB chunks, fsync at the "
        "end); MB/s = checkpoint bytes / wall s",
        f"- rptq calibrate + export, one process: `rptq-export MODEL --wbits 4 --abits 4 "
        f"--calib-dataset c4-sample --nsamples {args.nsamples} --seq-len {args.seq_len} --seed 2 "
        f"--dtype {args.export_dtype} -o OUT` (RTN weights, default clusters; few calibration "
        "windows, so calibration compute is small next to a real run while its memory pattern, "
        "one layer's inputs at a time, is the same)",
        "- rptq FP export: `python bench/scale.py fp-export MODEL OUT` = "
        "`rptq.workflow.export_onnx(load_model(MODEL), None, OUT, "
        f"ExportOptions({args.export_dtype!r}))`"
        " (the streamed exporter without a plan; `rptq-export export` requires --plan)",
        "- torch.onnx.export: bench/export.py's `worker_torch_export` (OPTForCausalLM loaded as "
        "fp32, eager attention, opset 21, logits only, dynamo=False, external data); run only "
        f"when {TORCH_FIT_FACTOR} x the fp32 weights fit under the memory watchdog",
        "- check: `rptq-export check W4A4.onnx --target ort --json` (onnx.checker); prefill: "
        f"bench/export.py's `worker_latency` on the W4A4 graph, ORT CPU, batch 1, "
        f"{args.ort_seq_len} tokens, one warm-up then {args.ort_runs} timed run(s) (prefill s "
        "is their median; session s is InferenceSession creation)",
        "- wall s, CPU s and peak RSS are those of each whole subprocess (os.wait4; interpreter "
        "start and model load included); load = 1-minute load average when the step ended; "
        "output = .onnx file plus external data; "
        + ("the page cache was not cleared between steps" if args.warm_cache else
           "the checkpoint's pages were dropped from the page cache before each step that "
           "reads it (posix_fadvise DONTNEED), so each read it from disk"),
        "",
    ]
    for run in runs:
        parts += _size_lines(args, run)
    parts += ["", _table(runs)]
    return "\n".join(parts) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    floor = sub.add_parser("floor", help="worker: read + write the checkpoint's bytes once")
    floor.add_argument("model", type=Path)
    floor.add_argument("output", type=Path)
    floor.add_argument("--json-out", type=Path, required=True)
    fp = sub.add_parser("fp-export", help="worker: rptq FP export (no plan)")
    fp.add_argument("model", type=Path)
    fp.add_argument("output", type=Path)
    fp.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    torch_ = sub.add_parser("torch-export", help="worker: torch.onnx.export (bench/export.py)")
    torch_.add_argument("model", type=Path)
    torch_.add_argument("output", type=Path)
    pre = sub.add_parser("prefill", help="worker: ORT CPU prefill (bench/export.py)")
    pre.add_argument("onnx", type=Path)
    pre.add_argument("--seq-len", type=int, default=128)
    pre.add_argument("--runs", type=int, default=1)
    pre.add_argument("--json-out", type=Path, required=True)

    parser.add_argument("--sizes", default="1.3b,6.7b", help="comma list of make_random_opt sizes")
    parser.add_argument("--layers", type=int, help="decoder layers (smoke runs; default: all)")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--work-dir", type=Path, default=CACHE / "scale")
    parser.add_argument("--nsamples", type=int, default=8, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--export-dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--ort-seq-len", type=int, default=128, help="prefill tokens in ORT")
    parser.add_argument("--ort-runs", type=int, default=1, help="timed prefills after a warm-up")
    parser.add_argument("--memory-limit-gib", type=float, default=22.0,
                        help="kill a step above this RSS (the machine is shared)")
    parser.add_argument("--skip-torch", action="store_true", help="no torch.onnx.export step")
    parser.add_argument("--warm-cache", action="store_true",
                        help="do not drop the checkpoint from the page cache before each step")
    parser.add_argument("--keep", action="store_true", help="keep checkpoints and ONNX files")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a worker, or run the whole benchmark and write its RESULTS.md section."""
    raw = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(raw)
    if args.command == "floor":
        worker_floor(args.model, args.output, args.json_out)
        return 0
    if args.command == "fp-export":
        worker_fp_export(args.model, args.output, args.dtype)
        return 0
    if args.command == "torch-export":
        from export import worker_torch_export

        worker_torch_export(args.model, args.output, dynamo=False)
        return 0
    if args.command == "prefill":
        from export import worker_latency

        worker_latency(args.onnx, args.seq_len, args.runs, args.json_out)
        return 0
    args.work_dir = args.work_dir.resolve()
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    started = time.perf_counter()
    runs = [bench_size(args, size) for size in sizes]
    report = _report(args, runs, ["bench/scale.py", *raw], time.perf_counter() - started)
    print(report)
    if not args.no_write:
        write_section("scale", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
