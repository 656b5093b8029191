"""ONNX Runtime CPU speed of rptq's graphs next to FP32 and ORT's own quantizers (issue 12).

Rows: rptq's FP32 and FP16 exports, the default-target recipes (W4A16, W4A8, W4A4, W4A4KV,
W3A3KV; W4A8 also with `--act-quant-form qdq`, the per-axis Q/DQ form), the TensorRT variant
(W8A8, W4A8) run in ORT, and ORT's own `quantize_dynamic` (W8A8 dynamic) and
`MatMulNBitsQuantizer` (W4, block 32) applied to rptq's FP32 export; W4A16/W4A8 with weight
scales per 32 input channels (`--weight-group-size 32`, the peer's block) only when `--recipes`
names them ("W4A16 g32", "W4A8 g32"). Columns:
median latency of a batch-1 512-token prefill (empty KV cache) and of a decode step (1 token on
the 512-token cache the prefill returned; rptq.runtime.decode), the KV cache's bytes per token,
peak RSS of the process that creates the session and runs it, file size, logit SQNR against
the FP32 export on the same 512 tokens, and what ORT made of the weights (integer MatMuls,
weight DequantizeLinear nodes left in float; rptq.runtime.ort_kernels).

Models are random-weight checkpoints of published OPT shapes (bench/make_random_opt.py):
speed depends on shapes, not values; perplexity of a random model means nothing, so there is
no perplexity column. Every measurement is its own subprocess, one at a time.

    python bench/ort_speed.py --sizes 125m,1.3b --layers 1.3b=4
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
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    CACHE,
    PYTHON,
    REPO,
    default_data_dir,
    machine_lines,
    run_measured,
    utc_now,
    write_section,
)

SCRIPT = str(Path(__file__).resolve())
PREFILL_TOKENS = 512
MEMORY_LIMIT = 20 * 2**30
_W4A4KV = ["--wbits", "4", "--abits", "4", "--only-quant-kv"]
# label -> (rptq-export flags, ORT MatMulNBits accuracy level the session uses)
RECIPES: dict[str, list[str]] = {
    "W4A16": ["--wbits", "4"],
    "W4A8": ["--wbits", "4", "--abits", "8"],
    # the portable per-axis Q/DQ form of the same recipe (rptq's only form before issue 12)
    "W4A8, per-axis QDQ": ["--wbits", "4", "--abits", "8", "--act-quant-form", "qdq"],
    "W4A4": ["--wbits", "4", "--abits", "4"],
    "W4A4KV": _W4A4KV,
    "W4A4KV, int8 cache": [*_W4A4KV, "--kv-cache-dtype", "int8"],
    "W3A3KV": ["--wbits", "3", "--abits", "3", "--only-quant-kv"],
    "W8A8 tensorrt": ["--wbits", "8", "--abits", "8", "--target", "tensorrt"],
    "W4A8 tensorrt": ["--wbits", "4", "--abits", "8", "--target", "tensorrt"],
    # weight scales per 32 input channels, as ORT's MatMulNBitsQuantizer row (equal footing on
    # SQNR); not in the default run (--recipes names them)
    "W4A16 g32": ["--wbits", "4", "--weight-group-size", "32"],
    "W4A8 g32": ["--wbits", "4", "--abits", "8", "--weight-group-size", "32"],
}
# built only when --recipes names them
OPT_IN = ("W4A16 g32", "W4A8 g32")
# measured again at MatMulNBits accuracy level 4 (int8 activations per block: faster prefill,
# but no longer the graph's arithmetic)
LEVEL4 = ("W4A16", "W4A4")


def _log(message: str) -> None:
    print(f"[{utc_now()}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# workers (each runs in its own subprocess)


def worker_time(path: Path, threads: int, repeats: int, level: int, out: Path) -> None:
    """Session creation, prefill and decode-step medians; the prefill logits go to
    `out` with suffix .npy, and the driver computes their SQNR (in its own process, so that
    loading two vocabulary-wide logit arrays does not count in this process's peak RSS).

    A decoder-with-past graph (rptq's default export) is timed as a generator runs it: the
    prefill is 512 tokens on an empty cache, a decode step is 1 token on the 512-token cache
    that prefill returned. A prefill-only graph (--no-cache, or an older export) has no cache,
    so its "decode" is a 1-token call with no context, and the row says so.
    """
    import numpy as np
    import onnxruntime as ort

    from rptq.runtime.decode import DecoderSession, is_with_past
    from rptq.runtime.ort import session_options

    options = session_options(optimize=True)
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    started = time.perf_counter()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session_s = time.perf_counter() - started
    ids = np.random.default_rng(0).integers(3, 50000, size=(1, PREFILL_TOKENS), dtype=np.int64)
    next_token = ids[:, :1]
    with_past = is_with_past(session)
    decoder = DecoderSession(session) if with_past else None

    def prefill() -> tuple[float, np.ndarray, list]:
        start = time.perf_counter()
        if decoder is None:
            (logits,) = session.run(
                ["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            )
            return time.perf_counter() - start, logits, []
        logits, present = decoder.step(ids, np.ones_like(ids), decoder.empty_cache(1))
        return time.perf_counter() - start, logits, present

    def decode(cache: list) -> float:
        start = time.perf_counter()
        if decoder is None:
            session.run(
                ["logits"], {"input_ids": next_token, "attention_mask": np.ones_like(next_token)}
            )
        else:
            mask = np.ones((1, PREFILL_TOKENS + 1), np.int64)
            decoder.step(next_token, mask, cache)
        return time.perf_counter() - start

    _, logits, cache = prefill()  # warm-up, and the logits for SQNR
    prefills = [prefill()[0] for _ in range(repeats)]
    decode(cache)
    steps = [decode(cache) for _ in range(repeats * 4)]
    np.save(out.with_suffix(".npy"), np.asarray(logits, np.float32))
    out.write_text(
        json.dumps(
            {
                "session_s": session_s,
                "prefill_ms": 1e3 * statistics.median(prefills),
                "decode_ms": 1e3 * statistics.median(steps),
                "with_past": with_past,
                "cache_bytes_per_token": decoder.cache_bytes_per_token if decoder else None,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        )
    )


def worker_kernels(path: Path, out: Path) -> None:
    """What ORT made of the weights (rptq.runtime.ort_kernels) at accuracy level 1."""
    from rptq.runtime.ort_kernels import kernel_report

    report = kernel_report(path)
    out.write_text(
        json.dumps(
            {
                "integer_matmuls": report.integer_matmuls,
                "float_weight_dq": len(report.float_weight_dequantize),
                "ops": report.op_counts,
            }
        )
    )


def worker_peer(kind: str, fp32: Path, out: Path) -> None:
    """ORT's own quantizers on rptq's FP32 export."""
    if kind == "dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8)
        return
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), block_size=32, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)


# ---------------------------------------------------------------------------------------------
# driver


@dataclass
class Row:
    """One table row."""

    label: str
    path: Path | None
    level: int = 1
    note: str = ""
    result: dict | None = None
    kernels: dict | None = None
    peak_rss: int = 0
    error: str = ""
    rounds: list[dict] = field(default_factory=list)  # one timing result per round


def _sub(args: argparse.Namespace, name: str, cmd: list[str], env_repo: Path | None = None):
    log_dir = args.work_dir / "logs"
    if env_repo is not None:
        cmd = ["env", f"PYTHONPATH={env_repo}", *cmd]
    measured = run_measured(cmd, MEMORY_LIMIT, log_dir, name)
    if not measured.ok:
        _log(f"{name} failed: {measured.error_line()}")
    return measured


def _cli(args: argparse.Namespace, name: str, flags: list[str], repo: Path = REPO) -> str:
    """Run rptq-export (the given checkout's rptq) in a subprocess; '' or the error line."""
    code = "import sys; from rptq.cli import main; sys.exit(main(sys.argv[1:]))"
    measured = _sub(args, name, [PYTHON, "-c", code, *flags], env_repo=repo)
    return "" if measured.ok else measured.error_line()


def build_rows(args: argparse.Namespace, size: str) -> list[Row]:
    """Checkpoint, exports and peers of one model size (cached under --work-dir)."""
    layers = args.layers.get(size)
    tag = f"{size}" + (f"-{layers}l" if layers else "")
    work = args.work_dir / tag
    work.mkdir(parents=True, exist_ok=True)
    model = work / "checkpoint"
    if not (model / "config.json").exists():
        cmd = [PYTHON, str(REPO / "bench" / "make_random_opt.py"), "--size", size, "-o", str(model)]
        if layers:
            cmd += ["--layers", str(layers)]
        _log(f"{tag}: writing the random checkpoint")
        if not _sub(args, f"{tag}-checkpoint", cmd, env_repo=REPO).ok:
            raise SystemExit(f"error: could not write the {size} checkpoint (see {work}/logs)")
    rows: list[Row] = []
    calib = [
        "--calib-dataset",
        "c4-sample",
        "--data-dir",
        str(args.data_dir),
        "--nsamples",
        str(args.nsamples),
        "--seq-len",
        str(args.seq_len),
        "--seed",
        "2",
        "--force",
    ]

    def export(label: str, flags: list[str], repo: Path = REPO, note: str = "") -> Row:
        path = work / (label.replace(" ", "-").replace("(", "").replace(")", "") + ".onnx")
        error = ""
        if not path.exists():
            _log(f"{tag}: export {label}")
            error = _cli(args, f"{tag}-{path.stem}", [*flags, "-o", str(path)], repo)
        return Row(label, None if error else path, note=note, error=error)

    rows.append(export("FP32", ["export", str(model)]))
    rows.append(export("FP16", ["export", str(model), "--dtype", "float16"]))
    wanted = args.recipes.split(",") if args.recipes else [r for r in RECIPES if r not in OPT_IN]
    for label, flags in RECIPES.items():
        if label not in wanted:
            continue
        rows.append(export(label, ["run", str(model), *flags, *calib]))
        if label in LEVEL4 and rows[-1].path is not None:
            rows.append(
                Row(
                    f"{label}, accuracy_level 4",
                    rows[-1].path,
                    level=4,
                    note="int8 activations inside MatMulNBits: not the graph's arithmetic",
                )
            )
    if args.baseline_repo:
        rows.append(
            export(
                "W4A8 (before: DQ feeds MatMul)",
                ["run", str(model), *RECIPES["W4A8"], *calib],
                args.baseline_repo,
                note=f"rptq at {args.baseline_repo}",
            )
        )
    fp32 = rows[0].path
    for kind, label in (
        ("dynamic", "ORT quantize_dynamic W8A8"),
        ("nbits", "ORT MatMulNBitsQuantizer W4 b32"),
    ):
        path = work / f"peer-{kind}.onnx"
        error = ""
        if fp32 is None:
            error = "no FP32 export"
        elif not path.exists():
            _log(f"{tag}: {label}")
            measured = _sub(
                args,
                f"{tag}-peer-{kind}",
                [PYTHON, SCRIPT, "peer", kind, str(fp32), str(path)],
                env_repo=REPO,
            )
            error = "" if measured.ok else measured.error_line()
        rows.append(Row(label, None if error else path, error=error))
    return rows


def measure(args: argparse.Namespace, tag: str, rows: list[Row]) -> None:
    """Time every row (FP32 first: its logits are the SQNR reference), then read its kernels.

    With `--rounds N` the whole row sequence is timed N times over: the host's speed drifts
    by tens of percent over minutes, so each row's ratio to FP32 is taken within a round and
    the table shows the median over rounds (latencies likewise)."""
    ref = args.work_dir / tag / "time-0.npy"  # the FP32 row's prefill logits
    for rnd in range(args.rounds):
        for i, row in enumerate(rows):
            if row.path is None:
                continue
            suffix = "" if rnd == 0 else f"-round{rnd}"
            out = args.work_dir / tag / f"time-{i}{suffix}.json"
            if args.rows and row.label not in args.rows.split(","):
                row.error = "not run this time (--rows)"
                if not (args.reuse and out.exists()):
                    continue
            if args.reuse and out.exists():  # an earlier run's measurement of the same file
                row.rounds.append(json.loads(out.read_text()))
                row.peak_rss = max(row.peak_rss, row.rounds[-1].get("peak_rss_bytes", 0))
                kout = args.work_dir / tag / f"kernels-{i}.json"
                row.kernels = json.loads(kout.read_text()) if kout.exists() else None
                continue
            _log(f"{tag}: timing {row.label}" + (f" (round {rnd + 1})" if args.rounds > 1 else ""))
            if not _time_row(args, tag, i, row, out, ref):
                continue
            wanted = args.kernels == "all" or row.label in args.kernels.split(",")
            if rnd == 0 and row.level == 1 and wanted:
                _count_kernels(args, tag, i, row)
    for row in rows:
        _combine_rounds(row, rows[0])


def _time_row(args: argparse.Namespace, tag: str, i: int, row: Row, out: Path, ref: Path) -> bool:
    """One timing worker for one row; appends its result to `row.rounds`."""
    measured = _sub(
        args,
        f"{tag}-{out.stem}",
        [
            PYTHON,
            SCRIPT,
            "time",
            str(row.path),
            "--threads",
            str(args.threads),
            "--repeats",
            str(args.repeats),
            "--level",
            str(row.level),
            "--out",
            str(out),
        ],
        env_repo=REPO,
    )
    if not measured.ok:
        row.error = measured.error_line()
        return False
    result = json.loads(out.read_text())
    result["sqnr_db"] = _sqnr_db(out.with_suffix(".npy"), ref) if i else None
    result["peak_rss_bytes"] = measured.peak_rss_bytes
    out.write_text(json.dumps(result))
    row.rounds.append(result)
    row.peak_rss = max(row.peak_rss, measured.peak_rss_bytes)
    return True


def _count_kernels(args: argparse.Namespace, tag: str, i: int, row: Row) -> None:
    kout = args.work_dir / tag / f"kernels-{i}.json"
    command = [PYTHON, SCRIPT, "kernels", str(row.path), "--out", str(kout)]
    if _sub(args, f"{tag}-kernels-{i}", command, env_repo=REPO).ok:
        row.kernels = json.loads(kout.read_text())


def _combine_rounds(row: Row, fp: Row) -> None:
    """`row.result`: the first round's fields, with latencies and their ratios to FP32 as
    medians over the rounds (a ratio is taken within a round, against that round's FP32)."""
    if not row.rounds:
        return
    row.result = dict(row.rounds[0])
    for key in ("prefill_ms", "decode_ms"):
        row.result[key] = statistics.median(r[key] for r in row.rounds)
        pairs = list(zip(row.rounds, fp.rounds, strict=False))
        if pairs:
            row.result[f"{key}_ratio"] = statistics.median(r[key] / f[key] for r, f in pairs)
    row.result["rounds"] = len(row.rounds)


def _sqnr_db(logits_file: Path, ref_file: Path) -> float | None:
    """Logit SQNR (dB) of a row's prefill logits against the FP32 row's, in float64."""
    import numpy as np

    if not (logits_file.exists() and ref_file.exists()):
        return None
    reference = np.load(ref_file).astype(np.float64)
    noise = float(np.sum((np.load(logits_file).astype(np.float64) - reference) ** 2))
    return float(10 * np.log10(float(np.sum(reference**2)) / max(noise, 1e-30)))


def _size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def table(tag: str, rows: list[Row]) -> str:
    """The markdown table of one model size."""
    fp = rows[0]
    base = fp.result or {}
    lines = [
        f"#### {tag}",
        "",
        "| graph | prefill 512 (ms) | x FP32 | decode step, 512 cached (ms) | x FP32 | "
        "KV cache (KiB/token) | peak RSS (GiB) | x FP32 | file (MiB) | logit SQNR vs FP32 (dB) "
        "| integer MatMuls / weight DQ left |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        if row.result is None:
            lines.append(f"| {row.label} | not run: {row.error or 'no graph'} ||||||||||")
            continue
        r = row.result

        def ratio(key: str, r: dict = r) -> str:
            if f"{key}_ratio" in r:
                return f"{r[key + '_ratio']:.2f}"
            return f"{r[key] / base[key]:.2f}" if base.get(key) else ""

        rss_ratio = f"{row.peak_rss / fp.peak_rss:.2f}" if fp.peak_rss and row.peak_rss else ""
        rss = f"{row.peak_rss / 2**30:.2f}" if row.peak_rss else "n/a"
        sqnr = "ref" if row is fp else ("" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}")
        kernels = (
            f"{row.kernels['integer_matmuls']} / {row.kernels['float_weight_dq']}"
            if row.kernels
            else "not counted"
        )
        label = row.label + (f" ({row.note})" if row.note else "")
        if not r.get("with_past", False):
            label += " (no KV cache: the decode column is a 1-token call without context)"
        cache = r.get("cache_bytes_per_token")
        cache_text = "n/a" if cache is None else f"{cache / 1024:.0f}"
        lines.append(
            f"| {label} | {r['prefill_ms']:.0f} | {ratio('prefill_ms')} | "
            f"{r['decode_ms']:.1f} | {ratio('decode_ms')} | {cache_text} | {rss} | "
            f"{rss_ratio} | {_size(row.path) / 2**20:.0f} | {sqnr} | {kernels} |"
        )
    return "\n".join(lines)


def _body(
    args: argparse.Namespace, argv: list[str] | None, started: float, load: str, sections: list
) -> str:
    """The RESULTS.md section: context lines, then one table per model size."""
    minutes = (time.perf_counter() - started) / 60
    argv_text = " ".join(sys.argv[1:] if argv is None else argv)
    title = "## ONNX Runtime CPU speed of the quantized graphs (bench/ort_speed.py, issue 12)"
    if args.recipes:
        title += f": {args.recipes.replace(',', ', ')} against FP32 and ORT's quantizers"
    return "\n".join(
        [
            title,
            "",
            *machine_lines(),
            f"- load average when the run started: {load}",
            f"- command: `python bench/ort_speed.py {argv_text}` ({minutes:.0f} min so far)",
            f"- ORT CPU provider, {args.threads} intra-op threads, batch 1, default optimisations "
            "(ORT_ENABLE_ALL) with rptq's session options (MatMulNBits accuracy_level 1 unless the "
            "row says 4); prefill: median of "
            f"{args.repeats} runs of {PREFILL_TOKENS} tokens after a warm-up, on an empty KV "
            "cache; decode step: 1 token on the prefill's 512-token cache, median of "
            f"{args.repeats * 4}; peak RSS: the whole worker process (Python, ORT, session "
            "creation, runs); SQNR: logits of the same 512 tokens against the FP32 export."
            + (
                f" The whole row sequence was timed {args.rounds} times in turn: latencies are "
                "medians over the rounds, and each x FP32 is the median of the ratios taken "
                "within a round (the host's speed drifts over minutes); peak RSS is the "
                "largest of the rounds."
                if args.rounds > 1
                else ""
            ),
            f"- calibration for the quantized rows: c4-sample, {args.nsamples} windows of "
            f"{args.seq_len} tokens, RTN weights, default clusters (speed does not depend on "
            "them).",
            "",
            *sections,
        ]
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="worker")
    t = sub.add_parser("time", help="worker: latency, logits")
    t.add_argument("path", type=Path)
    t.add_argument("--threads", type=int, required=True)
    t.add_argument("--repeats", type=int, required=True)
    t.add_argument("--level", type=int, required=True)
    t.add_argument("--out", type=Path, required=True)
    k = sub.add_parser("kernels", help="worker: ORT's optimized graph")
    k.add_argument("path", type=Path)
    k.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("peer", help="worker: ORT's quantizers")
    p.add_argument("kind", choices=["dynamic", "nbits"])
    p.add_argument("fp32", type=Path)
    p.add_argument("out", type=Path)
    parser.add_argument("--sizes", default="125m,1.3b", help="comma-separated OPT sizes")
    parser.add_argument(
        "--layers", default="1.3b=4", help="decoder layers per size, e.g. 1.3b=4 (default: all)"
    )
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed prefills (x4 decode steps)")
    parser.add_argument("--nsamples", type=int, default=4, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=128, help="calibration window length")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--work-dir", type=Path, default=CACHE / "ort_speed")
    parser.add_argument(
        "--baseline-repo",
        type=Path,
        help="another rptq checkout: add its W4A8 export as a 'before' row",
    )
    parser.add_argument(
        "--kernels", default="all", help="rows (labels, comma-separated) whose kernels are counted"
    )
    parser.add_argument("--rows", default="", help="time only these rows (labels, comma-separated)")
    parser.add_argument(
        "--recipes", default="", help="build only these rptq recipes (labels; default: all)"
    )
    parser.add_argument("--section", default="ort_speed", help="bench/RESULTS.md section")
    parser.add_argument(
        "--rounds", type=int, default=1, help="time the whole row sequence this many times"
    )
    parser.add_argument(
        "--reuse", action="store_true", help="keep timings an earlier run left in --work-dir"
    )
    parser.add_argument("--keep", action="store_true", help="keep the models and graphs")
    parser.add_argument("--no-write", action="store_true", help="print only, no RESULTS.md")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a worker, or the whole benchmark and write its RESULTS.md section."""
    args = _parser().parse_args(argv)
    if args.worker == "time":
        worker_time(args.path, args.threads, args.repeats, args.level, args.out)
        return 0
    if args.worker == "kernels":
        worker_kernels(args.path, args.out)
        return 0
    if args.worker == "peer":
        worker_peer(args.kind, args.fp32, args.out)
        return 0
    args.layers = dict(item.split("=") for item in args.layers.split(",") if item)
    args.layers = {k: int(v) for k, v in args.layers.items()}
    started = time.perf_counter()
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    sections = []
    for size in args.sizes.split(","):
        layers = args.layers.get(size)
        tag = f"{size}" + (f"-{layers}l" if layers else "")
        rows = build_rows(args, size)
        measure(args, tag, rows)
        name = f"random OPT-{size} shape" + (f", first {layers} decoder layers" if layers else "")
        sections.append(table(name, rows))
        print(sections[-1], flush=True)
        if not args.no_write:  # after each size, so a long run keeps what it measured
            write_section(args.section, _body(args, argv, started, load_before, sections))
    if not args.keep:
        shutil.rmtree(args.work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
