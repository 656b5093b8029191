"""Generation with the KV cache in ONNX Runtime CPU, next to transformers' generate() (issue 11).

Rows per model: FP32, W4A16, W4A8, W4A4, W4A4KV with a float cache and W4A4KV with an int8 cache
(each exported as the inference-stack folder, `-o DIR/`, with the decoder-with-past graph), and
transformers' `generate()` of the FP32 model on the same CPU. Columns: prefill tokens/s of a
128-token prompt (batch 1), decode tokens/s of 128 greedy new tokens, cache MiB at 2048 tokens,
peak RSS of the process, and the issue's speed goal: one decode step with the cache at 256 tokens
of context against re-running the graph over all 256 tokens (what a cacheless decoder pays per
token), as milliseconds and their ratio (goal: >= 5x).

Models are random-weight checkpoints of published OPT shapes (bench/make_random_opt.py): speed
depends on shapes, not values. The trained tiny LM (bench/train_tiny_lm.py) is added with
--tiny-lm. Each export and each measurement is its own subprocess, one at a time.

    python bench/generation.py --sizes 125m,1.3b --tiny-lm bench/.cache/opt-tiny-lm
    python bench/generation.py --sizes 125m --layers 125m=2 --nsamples 2 --no-write   # a check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    CACHE,
    PYTHON,
    REPO,
    RPTQ_EXPORT,
    default_data_dir,
    machine_lines,
    run_measured,
    utc_now,
    write_section,
)

SCRIPT = str(Path(__file__).resolve())
MEMORY_LIMIT = 20 * 2**30
REPORT_TOKENS = 2048
# label -> (calibrate flags or None for FP, kv cache dtype)
RECIPES: dict[str, tuple[list[str] | None, str]] = {
    "FP32": (None, "float"),
    "W4A16": (["--wbits", "4"], "float"),
    "W4A8": (["--wbits", "4", "--abits", "8"], "float"),
    "W4A4": (["--wbits", "4", "--abits", "4"], "float"),
    "W4A4KV, float cache": (["--wbits", "4", "--abits", "4", "--only-quant-kv"], "float"),
    "W4A4KV, int8 cache": (["--wbits", "4", "--abits", "4", "--only-quant-kv"], "int8"),
}
HF_ROW = "transformers generate() FP32"


@dataclass
class Row:
    """One line of the table: where its model is, and what was measured."""

    label: str
    folder: Path | None
    result: dict | None = None
    peak_rss: int = 0
    error: str = ""


def _log(message: str) -> None:
    print(f"[{utc_now()}] {message}", file=sys.stderr, flush=True)


def _prompt(tokens: int, vocab: int):
    import numpy as np

    ids = np.random.default_rng(0).integers(3, min(vocab, 50000), size=(1, tokens))
    ids[0, 0] = 2  # OPT's "</s>" starts every text
    return ids.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# workers (each runs in its own subprocess)


def worker_export(model: Path, plan: Path | None, kv: str, folder: Path) -> None:
    """The stack folder of `model` (+ `plan`) with the decoder-with-past graph."""
    from rptq.calib_text import optional_data_dir
    from rptq.exporter.options import ExportOptions
    from rptq.model.load import load_model
    from rptq.plan import QuantPlan
    from rptq.stack_folder import export_folder

    loaded = load_model(str(model))
    quant = QuantPlan.load(plan, loaded.shape.config_hash()) if plan else None
    options = ExportOptions(past=True, kv_cache_dtype=kv, force=True)  # type: ignore[arg-type]
    export_folder(loaded, quant, folder, options, optional_data_dir(None))


def worker_time(folder: Path, args: argparse.Namespace, out: Path) -> None:
    """Prefill + greedy decode with the cache, and the 256-context step against a re-prefill."""
    import numpy as np
    import onnxruntime as ort

    from rptq.runtime.decode import DecoderSession
    from rptq.runtime.generate import generate
    from rptq.runtime.ort import session_options

    options = session_options(optimize=True)
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    decoder = DecoderSession(session)
    vocab = session.get_outputs()[0].shape[-1]
    prompt = _prompt(args.prompt_tokens, vocab if isinstance(vocab, int) else 50000)
    generate(decoder, prompt[:, :8], None, 4)  # warm-up
    result = generate(decoder, prompt, None, args.new_tokens)
    # the speed goal: a decode step at `context` tokens with the cache vs the graph re-run on
    # all `context` tokens (an empty cache: exactly the prefill-only graph's work)
    context = _prompt(args.context, vocab if isinstance(vocab, int) else 50000)
    mask = np.ones_like(context)
    _, cache = decoder.step(context[:, :-1], mask[:, :-1], decoder.empty_cache(1))
    step, full = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        decoder.step(context[:, -1:], mask, cache)
        step.append(time.perf_counter() - started)
        started = time.perf_counter()
        decoder.step(context, mask, decoder.empty_cache(1))
        full.append(time.perf_counter() - started)
    out.write_text(
        json.dumps(
            {
                "prefill_tok_s": result.prefill_tokens_per_s,
                "decode_tok_s": result.decode_tokens_per_s,
                "cache_dtype": str(decoder.cache_dtype),
                "cache_mib": decoder.cache_bytes_per_token * REPORT_TOKENS / 2**20,
                "step_ms": 1e3 * statistics.median(step),
                "reprefill_ms": 1e3 * statistics.median(full),
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        )
    )


def worker_hf(model: Path, args: argparse.Namespace, out: Path) -> None:
    """transformers' generate() of the FP32 model: prefill timed as one forward, decode as the
    rest of a fixed-length greedy generate()."""
    import torch
    from transformers import OPTForCausalLM

    torch.set_num_threads(args.threads)
    hf = OPTForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    prompt = torch.from_numpy(_prompt(args.prompt_tokens, hf.config.vocab_size))
    mask = torch.ones_like(prompt)
    kwargs = {"do_sample": False, "attention_mask": mask, "pad_token_id": 1}
    with torch.no_grad():
        hf.generate(prompt[:, :8], max_new_tokens=4, **kwargs | {"attention_mask": mask[:, :8]})
        started = time.perf_counter()
        hf(prompt, attention_mask=mask, use_cache=True)
        prefill_s = time.perf_counter() - started
        started = time.perf_counter()
        new = args.new_tokens
        hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, **kwargs)
        total_s = time.perf_counter() - started
    bytes_per_token = 2 * hf.config.num_hidden_layers * hf.config.hidden_size * 4
    out.write_text(
        json.dumps(
            {
                "prefill_tok_s": args.prompt_tokens / prefill_s,
                "decode_tok_s": (new - 1) / max(total_s - prefill_s, 1e-9),
                "cache_dtype": "float32",
                "cache_mib": bytes_per_token * REPORT_TOKENS / 2**20,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        )
    )


# ---------------------------------------------------------------------------------------------
# orchestration


def _sub(args: argparse.Namespace, name: str, cmd: list[str]):
    env_before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(REPO)
    try:
        return run_measured(cmd, MEMORY_LIMIT, args.work_dir / "logs", name)
    finally:
        if env_before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = env_before


def _checkpoint(args: argparse.Namespace, size: str) -> tuple[str, Path]:
    if size == "tiny-lm":
        return "tiny-lm", args.tiny_lm
    layers = args.layers.get(size)
    tag = f"{size}" + (f"-{layers}l" if layers else "")
    model = args.work_dir / tag / "checkpoint"
    if not (model / "config.json").exists():
        cmd = [PYTHON, str(REPO / "bench" / "make_random_opt.py"), "--size", size, "-o", str(model)]
        if layers:
            cmd += ["--layers", str(layers)]
        _log(f"{tag}: writing the random checkpoint")
        if not _sub(args, f"{tag}-checkpoint", cmd).ok:
            raise SystemExit(f"error: could not write the {size} checkpoint (see the logs)")
    return tag, model


def build_rows(args: argparse.Namespace, tag: str, model: Path) -> list[Row]:
    """Calibrate each recipe once (plans are shared by the float and int8 cache rows) and
    export its stack folder."""
    work = args.work_dir / tag
    calib = ["--calib-dataset", "c4-sample", "--data-dir", str(args.data_dir), "--nsamples",
             str(args.nsamples), "--seq-len", str(args.seq_len), "--seed", "2", "-q", "--force"]
    rows: list[Row] = []
    for label, (flags, kv) in RECIPES.items():
        if args.rows and label not in args.rows.split(","):
            continue
        slug = label.replace(", ", "-").replace(" ", "-")
        folder, plan = work / slug, None
        if flags is not None:
            plan = work / ("plan-" + "".join(flags).replace("--", "-"))
            if not (plan / "plan.json").exists():
                _log(f"{tag}: calibrating {label}")
                measured = _sub(args, f"{tag}-plan-{slug}",
                                [RPTQ_EXPORT, "calibrate", str(model), *flags, "-o", str(plan),
                                 *calib])
                if not measured.ok:
                    rows.append(Row(label, None, error=measured.error_line()))
                    continue
        if not (folder / "model.onnx").exists():
            _log(f"{tag}: exporting {label}")
            cmd = [PYTHON, SCRIPT, "export", str(model), str(folder), "--kv", kv]
            cmd += ["--plan", str(plan)] if plan else []
            measured = _sub(args, f"{tag}-export-{slug}", cmd)
            if not measured.ok:
                rows.append(Row(label, None, error=measured.error_line()))
                continue
        rows.append(Row(label, folder))
    return rows


def _common_flags(args: argparse.Namespace) -> list[str]:
    return ["--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
            "--new-tokens", str(args.new_tokens), "--context", str(args.context),
            "--repeats", str(args.repeats)]


def measure(args: argparse.Namespace, tag: str, model: Path, rows: list[Row]) -> None:
    """Time each row in its own process; then transformers' generate() of the FP32 model."""
    for i, row in enumerate(rows):
        if row.folder is None:
            continue
        out = args.work_dir / tag / f"time-{i}.json"
        _log(f"{tag}: timing {row.label}")
        cmd = [PYTHON, SCRIPT, "time", str(row.folder), "--out", str(out), *_common_flags(args)]
        measured = _sub(args, f"{tag}-time-{i}", cmd)
        if not measured.ok:
            row.error = measured.error_line()
            continue
        row.result, row.peak_rss = json.loads(out.read_text()), measured.peak_rss_bytes
    out = args.work_dir / tag / "time-hf.json"
    _log(f"{tag}: timing {HF_ROW}")
    hf = Row(HF_ROW, model)
    measured = _sub(args, f"{tag}-time-hf",
                    [PYTHON, SCRIPT, "hf", str(model), "--out", str(out), *_common_flags(args)])
    if measured.ok:
        hf.result, hf.peak_rss = json.loads(out.read_text()), measured.peak_rss_bytes
    else:
        hf.error = measured.error_line()
    rows.append(hf)


def table(name: str, rows: list[Row], args: argparse.Namespace) -> str:
    """The markdown table of one model."""
    lines = [
        f"### {name}",
        "",
        f"| row | prefill tok/s ({args.prompt_tokens}-token prompt) | decode tok/s "
        f"({args.new_tokens} new) | cache MiB at {REPORT_TOKENS} tokens | peak RSS | decode "
        f"step at {args.context} ctx (ms) | re-run over {args.context} tokens (ms) | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        r = row.result
        if r is None:
            lines.append(f"| {row.label} | {row.error or 'not measured'} | | | | | | |")
            continue
        step, full = r.get("step_ms"), r.get("reprefill_ms")
        ratio = f"{full / step:.1f}x" if step and full else ""
        lines.append(
            f"| {row.label} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
            f"{r['cache_mib']:.1f} ({r['cache_dtype']}) | {row.peak_rss / 2**20:.0f} MiB | "
            f"{f'{step:.2f}' if step else ''} | {f'{full:.2f}' if full else ''} | {ratio} |"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="worker")
    e = sub.add_parser("export", help="worker: the stack folder")
    e.add_argument("model", type=Path)
    e.add_argument("folder", type=Path)
    e.add_argument("--plan", type=Path)
    e.add_argument("--kv", default="float")
    for name in ("time", "hf"):
        w = sub.add_parser(name, help=f"worker: {name} timing")
        w.add_argument("path", type=Path)
        w.add_argument("--out", type=Path, required=True)
        for flag, default in (("--threads", 2), ("--prompt-tokens", 128), ("--new-tokens", 128),
                              ("--context", 256), ("--repeats", 5)):
            w.add_argument(flag, type=int, default=default)
    parser.add_argument("--sizes", default="125m,1.3b", help="comma-separated OPT sizes")
    parser.add_argument("--layers", default="", help="decoder layers per size, e.g. 1.3b=4")
    parser.add_argument("--tiny-lm", type=Path, help="also the trained tiny LM at this path")
    parser.add_argument("--threads", type=int, default=2, help="ORT and torch intra-op threads")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--context", type=int, default=256, help="context of the speed-goal step")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps (median)")
    parser.add_argument("--nsamples", type=int, default=16, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256, help="calibration window length")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--work-dir", type=Path, default=CACHE / "generation")
    parser.add_argument("--rows", default="", help="only these rows (labels, comma-separated)")
    parser.add_argument("--keep", action="store_true", help="keep the models and folders")
    parser.add_argument("--no-write", action="store_true", help="print only, no RESULTS.md")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a worker, or the whole benchmark and write its RESULTS.md section."""
    args = _parser().parse_args(argv)
    if args.worker == "export":
        worker_export(args.model, args.plan, args.kv, args.folder)
        return 0
    if args.worker == "time":
        worker_time(args.path, args, args.out)
        return 0
    if args.worker == "hf":
        worker_hf(args.path, args, args.out)
        return 0
    args.layers = {k: int(v) for k, v in (i.split("=") for i in args.layers.split(",") if i)}
    started = time.perf_counter()
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    sizes = [s for s in args.sizes.split(",") if s] + (["tiny-lm"] if args.tiny_lm else [])
    sections = []
    for size in sizes:
        tag, model = _checkpoint(args, size)
        rows = build_rows(args, tag, model)
        measure(args, tag, model, rows)
        name = "trained tiny LM" if size == "tiny-lm" else f"random OPT-{size} shape"
        if args.layers.get(size):
            name += f", first {args.layers[size]} decoder layers"
        sections.append(table(name, rows, args))
        print(sections[-1], flush=True)
        if not args.no_write:
            body = [
                "## Generation with the KV cache (bench/generation.py, issue 11)",
                "",
                *machine_lines(),
                f"- load average before the run: {load_before}; wall time "
                f"{(time.perf_counter() - started) / 60:.1f} min",
                f"- command: `python bench/generation.py {' '.join(argv or sys.argv[1:])}`",
                "- ORT CPU, batch 1, greedy; prefill = the prompt in one step, decode = the other "
                "new tokens one step each; ratio = re-running the graph over the whole context "
                "(no cache) / one decode step with the cache (issue goal: >= 5x)",
                "",
                *sections,
            ]
            write_section("generation", "\n".join(body))
    if not args.keep:
        shutil.rmtree(args.work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
