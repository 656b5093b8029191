"""`rptq-export`: calibrate an OPT model with RPTQ and export it to ONNX.

Exit codes: 0 success, 1 a user error (printed as one `error: ...` line), 2 usage, 130 Ctrl-C.
stdout carries only the final summary (`--json` makes it machine-readable); progress and logs
go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from rptq import __version__
from rptq import log as rlog
from rptq.defaults import AUTO_DEVICE, PAPER_NSAMPLES
from rptq.defaults import BUILTIN_CALIB_DATASET as DEFAULT_CALIB_DATASET
from rptq.errors import RptqError
from rptq.plan import CLI_TARGETS, Target
from rptq.points import DEFAULT_CLUSTERS, Reorder

log = logging.getLogger("rptq.cli")

SUBCOMMANDS = (
    "run",
    "calibrate",
    "export",
    "eval",
    "inspect",
    "demo",
    "check",
    "build-engine",
    "generate",
)
EXAMPLES = {
    "run": "rptq-export facebook/opt-125m --abits 4 -o model.onnx",
    "calibrate": "rptq-export calibrate ./opt-125m --wbits 4 --abits 4 -o plans/opt-125m-w4a4",
    "export": "rptq-export export ./opt-125m --plan plans/opt-125m-w4a4 -o opt-125m-w4a4.onnx",
    "eval": "rptq-export eval opt-125m-w4a4.onnx --datasets wikitext2 --tokenizer ./opt-125m",
    "inspect": "rptq-export inspect plans/opt-125m-w4a4",
    "demo": "rptq-export demo",
    "check": "rptq-export check opt-125m-w4a4.onnx --target tensorrt --json",
    "build-engine": "rptq-export build-engine opt-125m-w4a4.onnx -o opt-125m-w4a4.engine",
    "generate": 'rptq-export generate opt-125m-w4a4/ --prompt "The capital of France is"',
}


def _clusters(text: str) -> dict[str, int]:
    """'R1=32,R5=16' -> defaults overridden at R1 and R5."""
    clusters = {str(k): v for k, v in DEFAULT_CLUSTERS.items()}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key.strip() not in {str(r) for r in Reorder} or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(
                f"bad cluster spec {item!r}; expected e.g. R1=32,R5=16"
            )
        clusters[key.strip()] = int(value)
    return clusters


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def _data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="datasets directory (default: $RPTQ_DATA_DIR)")


def _calib_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("quantization recipe")
    group.add_argument("--wbits", type=int, default=4, help="weight bits 2..8, 16 = float")
    group.add_argument("--abits", type=int, default=16, help="activation bits 3, 4, 8; 16 = float")
    group.add_argument(
        "--only-quant-kv", action="store_true", help="quantize only K and V (W4A4KV)"
    )
    group.add_argument(
        "--clusters",
        type=_clusters,
        default=None,
        help="clusters per reorder point, e.g. R1=32,R2=4 (R2/R3 per head; default RPTQ's)",
    )
    group.add_argument(
        "--granularity",
        choices=["cluster", "tensor", "channel"],
        default="cluster",
        help="activation scales per RPTQ cluster, per tensor, or per channel",
    )
    group.add_argument(
        "--act-metric",
        choices=["ema_minmax", "minmax", "mse", "percentile"],
        default="mse",
        help="activation ranges per cluster: mse (default) searches the clipped range with the "
        "least quantization error; ema_minmax reproduces RPTQ's published setting",
    )
    group.add_argument(
        "--weight-method",
        choices=["rtn", "gptq", "gptqt"],
        default="rtn",
        help="weights: round to nearest, GPTQ, or GPTQT binary planes (GPTQ at wbits+1, BCQ)",
    )
    group.add_argument(
        "--act-order", action="store_true", help="GPTQ/GPTQT: columns by decreasing Hessian"
    )
    group.add_argument(
        "--weight-group-size",
        type=int,
        default=0,
        help="input channels per weight scale, cut in the reordered order (0: one per row)",
    )
    group.add_argument(
        "--lorc-rank", type=int, default=0, help="LoRC low-rank error compensation rank (0: none)"
    )
    group.add_argument(
        "--lorc-bits", type=int, choices=[8, 16], default=16, help="LoRC factors int8 or float"
    )
    group.add_argument(
        "--calib-dataset",
        default=DEFAULT_CALIB_DATASET,
        help=f"{DEFAULT_CALIB_DATASET} (default: C4 text shipped with rptq), or wikitext2, ptb, "
        "c4, mix (from --data-dir, else the datasets library online), c4-sample, a .txt file",
    )
    group.add_argument(
        "--nsamples",
        type=int,
        default=None,
        help=f"calibration windows (default: {PAPER_NSAMPLES}, capped for {DEFAULT_CALIB_DATASET} "
        "at the windows its text holds without overlap)",
    )
    group.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per window (default: the model's context length)",
    )
    group.add_argument("--seed", type=int, default=2, help="calibration sampling seed")
    group.add_argument(
        "--device",
        default=AUTO_DEVICE,
        help="calibration device: auto (default: the first CUDA GPU, else cpu), cpu, cuda, "
        "cuda:N, or several sharing the windows "
        "(cuda:0,cuda:1 or cuda:all, every visible GPU)",
    )
    _data_args(parser)


def _export_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        help="output .onnx path, or a folder (DIR/ or an existing directory) that inference "
        "stacks load: model.onnx, config.json, tokenizer, genai_config.json, rptq_plan.json",
    )
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--opset", type=int, default=21)
    parser.add_argument(
        "--target",
        choices=CLI_TARGETS,
        default=Target.ORT.cli,
        help="ort: per-cluster asymmetric Q/DQ; tensorrt: the TensorRT variant (scales folded, "
        "per-tensor INT8 Q/DQ, symmetric weights; docs/tensorrt-rules.md)",
    )
    parser.add_argument(
        "--int4-block",
        type=int,
        choices=[64, 128],
        default=None,
        help="with --target tensorrt: INT4 weights in blocks of this many input channels "
        "(default: INT8 per output channel)",
    )
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="write the prefill-only graph (input_ids, attention_mask -> logits) instead of the "
        "decoder with a KV cache (docs/graph.md)",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        choices=["float", "int8", "uint8"],
        default="float",
        help="type of the KV cache inputs/outputs: float (the export dtype), or int8/uint8: the "
        "plan's K/V codes, 1 byte per element (needs quantized K/V; ONNX Runtime target)",
    )
    parser.add_argument(
        "--act-quant-form",
        choices=["auto", "elementwise", "qdq"],
        default=None,
        help="ONNX Runtime target: write per-cluster activation quantizers as elementwise "
        "Div/Round/Max/Min/Mul (ORT's CPU provider runs per-axis Q/DQ 30-50x slower) or as "
        "per-axis QuantizeLinear/DequantizeLinear pairs (portable QDQ, for execution providers "
        "that consume them); both compute the same values. auto (default): elementwise for "
        "float32, qdq for float16",
    )
    parser.add_argument(
        "--trt-weight-groups",
        type=int,
        default=None,
        metavar="N",
        help="with --target tensorrt: weight scales per output channel and group of activation "
        "clusters of similar scale, in one GEMM (default 3; 1: one scale per output channel, "
        "the first variant, which loses on models with outlier channels); a plan calibrated "
        "with --target tensorrt keeps the groups it was calibrated with",
    )
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")


def build_parser() -> argparse.ArgumentParser:
    """The `rptq-export` parser: one subparser per command, each with an example."""
    parser = argparse.ArgumentParser(
        prog="rptq-export",
        description="RPTQ quantization of OPT models to ONNX. With no subcommand, "
        "`rptq-export MODEL ...` calibrates and exports in one go (the `run` subcommand).",
        epilog="examples:\n  " + "\n  ".join(EXAMPLES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rptq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=f"example:\n  {EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _common(p)
        return p

    run = add("run", "calibrate (or take --plan) and export a quantized ONNX model")
    run.add_argument("model", help="Hugging Face OPT directory or hub id (e.g. facebook/opt-1.3b)")
    run.add_argument("--plan", help="use this plan instead of calibrating")
    _calib_args(run)
    _export_args(run)

    cal = add("calibrate", "run RPTQ calibration and write a quantization plan directory")
    cal.add_argument("model", help="Hugging Face OPT directory or hub id")
    cal.add_argument("-o", "--output", required=True, help="plan directory to write")
    cal.add_argument("--force", action="store_true", help="overwrite an existing plan")
    cal.add_argument(
        "--target",
        choices=CLI_TARGETS,
        default=Target.ORT.cli,
        help="the export target the weights are calibrated for: tensorrt quantizes them as the "
        "TensorRT variant holds them (activation scales folded in, symmetric; export the plan "
        "with --target tensorrt)",
    )
    cal.add_argument(
        "--trt-weight-groups",
        type=int,
        default=None,
        metavar="N",
        help="with --target tensorrt: weight scales per output channel and group of activation "
        "clusters of similar scale (default 3; 1: one scale per output channel)",
    )
    _calib_args(cal)

    exp = add(
        "export", "export MODEL with a plan to ONNX (folded reorders, per-cluster Q/DQ); FP without"
    )
    exp.add_argument("model", help="Hugging Face OPT directory or hub id")
    exp.add_argument("--plan", help="plan directory from `calibrate` (omit: the FP graph)")
    _export_args(exp)
    _data_args(exp)  # OPT's tokenizer for the output folder when the model has none

    ev = add("eval", "perplexity of a model, a model + plan (PyTorch reference) or an .onnx file")
    ev.add_argument(
        "model", help="OPT directory / hub id, an exported .onnx file, or a TensorRT .engine"
    )
    ev.add_argument("--plan", help="evaluate the fake-quant reference of this plan")
    ev.add_argument(
        "--target",
        choices=CLI_TARGETS,
        default=Target.ORT.cli,
        help="with --plan: the reference of the default export (ort) or of the TensorRT variant",
    )
    ev.add_argument("--datasets", default="wikitext2", help="comma list of wikitext2, ptb, c4")
    ev.add_argument("--seq-len", type=int, default=None, help="window length (default: context)")
    ev.add_argument(
        "--limit",
        type=int,
        default=None,
        help="evaluate only the first N windows (quick look; not paper-comparable)",
    )
    ev.add_argument("--tokenizer", help="tokenizer directory (default: the model's, else OPT's)")
    ev.add_argument("--providers", default="cpu", help="ONNX Runtime providers: cpu or cuda")
    _data_args(ev)

    ins = add("inspect", "summarize a plan directory")
    ins.add_argument("plan", help="plan directory")

    demo = add("demo", "the whole pipeline on an embedded tiny model, offline, in about a minute")
    demo.add_argument("--output-dir", help="keep the plans and .onnx files here")
    demo.add_argument("--steps", type=int, default=200, help="training steps of the tiny model")

    chk = add("check", "check an ONNX file against a runtime's rules (exit 1 on a violation)")
    chk.add_argument("onnx", help="ONNX file (external data is read from beside it)")
    chk.add_argument(
        "--target",
        choices=CLI_TARGETS,
        default=Target.TRT.cli,
        help="tensorrt: TensorRT's Q/DQ and op rules (docs/tensorrt-rules.md); ort: onnx.checker",
    )

    eng = add("build-engine", "build a TensorRT engine from an ONNX file (needs TensorRT + GPU)")
    eng.add_argument("onnx", help="ONNX file that passes `check --target tensorrt`")
    eng.add_argument("-o", "--output", required=True, help="engine file to write")
    eng.add_argument("--workspace-gib", type=float, default=8.0, help="builder workspace limit")
    eng.add_argument("--timing-cache", help="timing cache file: read if present, then updated")
    eng.add_argument("--max-seq-len", type=int, default=None, help="default: model context")
    eng.add_argument("--max-batch", type=int, default=1, help="largest batch of the profile")
    eng.add_argument(
        "--opt-level", type=int, default=3, help="builder optimization level 0..5 (3 default)"
    )
    eng.add_argument("--force", action="store_true", help="overwrite an existing engine")

    gen = add(
        "generate",
        "continue a prompt with an exported graph and its KV cache in ONNX Runtime; prints the "
        "text, prefill and decode tokens/s and the cache bytes per token",
    )
    gen.add_argument("model", help="output folder of `export -o DIR/`, or a with-past .onnx file")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="at most this many tokens")
    gen.add_argument("--greedy", action="store_true", help="arg-max decoding (the default)")
    gen.add_argument("--temperature", type=float, default=None, help="sample at this temperature")
    gen.add_argument("--top-p", type=float, default=None, help="sample from this nucleus mass")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--tokenizer", help="tokenizer directory (default: the folder's, else OPT's)")
    gen.add_argument("--providers", default="cpu", help="ONNX Runtime providers: cpu or cuda")
    _data_args(gen)
    return parser


def _normalize_argv(argv: list[str]) -> list[str]:
    """`rptq-export MODEL ...` means `rptq-export run MODEL ...`."""
    if argv and argv[0] not in SUBCOMMANDS and not argv[0].startswith("-"):
        return ["run", *argv]
    return argv


def _emit(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=1, default=str))
        return
    for key, value in summary.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        elif isinstance(value, list):
            print(f"{key}:")
            for item in value:
                print(f"  {item}")
        else:
            print(f"{key}: {value}")


class _InterruptWatch:
    """Remembers a Ctrl-C while a command runs. A SIGINT that lands inside a library's native
    call can come back as that library's own error (safetensors' reader turns it into a
    TypeError, which rptq reports as an unreadable checkpoint), so the exit code is decided by
    whether SIGINT arrived, not by which exception surfaced."""

    def __init__(self) -> None:
        self.seen = False
        self._previous: Any = None

    def __enter__(self) -> _InterruptWatch:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `rptq-export` with `argv`; the exit code: 0 ok, 1 user error, 2 usage, 130 Ctrl-C."""
    parser = build_parser()
    args_list = _normalize_argv(list(sys.argv[1:] if argv is None else argv))
    if not args_list:
        parser.print_help()
        return 2
    args = parser.parse_args(args_list)
    rlog.setup(-1 if args.quiet else min(args.verbose, 1))
    from rptq import commands

    handler = getattr(commands, f"cmd_{args.command.replace('-', '_')}")
    with _InterruptWatch() as watch:
        try:
            summary = handler(args)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except Exception as exc:
            if watch.seen:  # an interrupt a library reported as its own error
                print("interrupted", file=sys.stderr)
                return 130
            if not isinstance(exc, RptqError):
                raise
            print(f"error: {exc}", file=sys.stderr)
            return 1
    _emit(summary, args.json)
    return 1 if summary.get("status") == "fail" else 0  # a failed `check`
