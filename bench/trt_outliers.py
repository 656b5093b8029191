"""TensorRT variant on outlier models: weight forms by logit SQNR, next-token KL and ORT speed.

The variant folds each activation cluster's scale s into the weight's input channels
(W' = W·diag(s)) and re-quantizes W' symmetrically (docs/tensorrt-rules.md). With OPT-like
outlier channels (rptq/outliers.py) a few columns of W' are 10-100x the rest, and one 4-bit
scale per output row cannot hold both. For one plan per setting (calibrated for the default
target, RTN weights, default recipe otherwise), this scores against the FP model on the same
WikiText-2 windows (PyTorch references, which the graphs match: tests/parity):

- `default target`: the plan itself (per-row asymmetric weights on W, per-cluster activations);
- `TensorRT, G scale groups`: the variant's export with `trt_weight_groups=G` (G = 1 is the
  first variant, one scale per output row; G >= 2 one GEMM per group of clusters of similar
  scale, rptq.quant.trt_weights.scale_groups);
- `TensorRT, calibrated --target tensorrt` (RTN, and `…, GPTQ`): the same recipe calibrated
  in the folded domain, with the default scale groups such a plan now stores (before issue 13
  part 3: one scale per row);
- simulated, reference only (not exportable today): INT8 weights for the folded linears, and
  INT4 per-block scales (block 64 along the input dim in cluster order, clusters not aligned).

Then ORT CPU latency (one thread, median of --repeats forwards of one window) of the exported
graphs on a latency model (hidden 1024, 2 layers, vocabulary 512, so the LM head does not
dominate), as a proxy for what each extra GEMM costs.

    python bench/trt_outliers.py                                   # writes RESULTS.md
    python bench/trt_outliers.py --models outlier --limit 1 --nsamples 2 --no-write   # smoke
    python bench/trt_outliers.py --forms "default target,calibrated" --no-latency --no-write
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    TINY_MODEL,
    add_calibration_args,
    machine_lines,
    shown,
    utc_now,
    write_section,
)

SECTION = "trt-outliers"
SETTINGS = {"W4A8": (4, 8), "W4A4": (4, 4)}
GROUPS = (1, 2, 3, 4)
MODELS = {  # make_outlier_opt fields
    "outlier": {"num_layers": 4, "hidden_size": 256, "num_heads": 8, "ffn_dim": 1024,
                "vocab_size": 50272, "max_positions": 512, "weight_std": 0.05},
    "outlier-1024": {"num_layers": 2, "hidden_size": 1024, "num_heads": 16, "ffn_dim": 4096,
                     "vocab_size": 50272, "max_positions": 512, "weight_std": 0.05},
    # `outlier` with its outlier channels carrying half of each reader's input energy
    # (rptq/outliers.py, outlier_share): the ordinary channels matter too
    "outlier-balanced": {"num_layers": 4, "hidden_size": 256, "num_heads": 8, "ffn_dim": 1024,
                         "vocab_size": 50272, "max_positions": 512, "weight_std": 0.05,
                         "outlier_share": 0.5},
}
LATENCY_MODEL = {"num_layers": 2, "hidden_size": 1024, "num_heads": 16, "ffn_dim": 4096,
                 "vocab_size": 512, "max_positions": 512, "weight_std": 0.05}


def _log(message: str) -> None:
    print(f"[{utc_now()}] {message}", file=sys.stderr, flush=True)


def _load(name: str):  # noqa: ANN202 (LoadedModel)
    from rptq.model.load import from_module, load_model
    from rptq.outliers import make_outlier_opt

    if name in MODELS:
        return from_module(make_outlier_opt(**MODELS[name]), f"random-opt-{name}")
    return load_model(name)


def _simulated(model, plan, weight_fn):  # noqa: ANN001, ANN202
    """A reference whose folded linears multiply by weight_fn(W [out, in], s, rows perm)."""
    import torch

    from rptq.model.fakequant import FakeQuantTap
    from rptq.model.forward import read_layer
    from rptq.model.weights import layer_prefix
    from rptq.points import LINEARS
    from rptq.runtime.reference import ReferenceModel

    class Simulated(ReferenceModel):
        def layer(self, index):  # noqa: ANN001, ANN202
            weights = dict(read_layer(self.model.weights, index))
            for linear in LINEARS:
                quant = plan.weight(f"{layer_prefix(index)}.{linear}")
                if quant is None:
                    continue
                scale = plan.folded_input_scale(index, linear)
                w = weights[f"{linear}.weight"].detach().float().numpy()
                rows, _ = plan.linear_perms(index, linear)
                value = quant.values() if scale is None else weight_fn(w, scale, rows)
                weights[f"{linear}.weight"] = torch.from_numpy(np.ascontiguousarray(value))
            return weights, FakeQuantTap.from_plan(plan, index)

    return Simulated(model, plan)


def _by_columns(w, s, columns, bits):  # noqa: ANN001, ANN202
    """Symmetric RTN of W·diag(s) with one scale per (output row, column set), back / s."""
    from rptq.quant.trt_weights import requantize_folded

    out = np.zeros_like(w, dtype=np.float32)
    for cols in columns:
        codes, scale = requantize_folded(w[:, cols], s[cols], bits)
        out[:, cols] = codes.astype(np.float32) * scale[:, None] / s[cols][None, :]
    return out


def _int8_weights(w, s, rows):  # noqa: ANN001, ANN202
    return _by_columns(w, s, [np.arange(w.shape[1])], 8)


def _int4_blocks(w, s, rows, block=64):  # noqa: ANN001, ANN202
    order = np.arange(w.shape[1]) if rows is None else rows
    return _by_columns(w, s, [order[i : i + block] for i in range(0, len(order), block)], 4)


def _forms(model, plan, calib, recipe):  # noqa: ANN001, ANN202
    """(label, make the reference) for each weight form of one plan."""
    import dataclasses

    from rptq.calib.runner import calibrate
    from rptq.runtime.reference import ReferenceModel
    from rptq.runtime.trt_reference import TrtReferenceModel

    def trt_calibrated(method: str = "rtn"):  # noqa: ANN202
        trt = dataclasses.replace(recipe, target="trt", weight_method=method)
        return TrtReferenceModel(model, calibrate(model, calib, trt))

    forms = [("default target", lambda: ReferenceModel(model, plan))]
    forms += [(f"TensorRT, {g} scale group{'s' * (g > 1)}",
               lambda g=g: TrtReferenceModel(model, plan, weight_groups=g)) for g in GROUPS]
    forms += [
        ("TensorRT, calibrated --target tensorrt", trt_calibrated),
        ("TensorRT, calibrated --target tensorrt, GPTQ", lambda: trt_calibrated("gptq")),
        ("simulated: INT8 folded weights", lambda: _simulated(model, plan, _int8_weights)),
        ("simulated: INT4 block-64 scales", lambda: _simulated(model, plan, _int4_blocks)),
    ]
    return forms


def quality(args: argparse.Namespace) -> list[dict[str, object]]:
    """Every (model, setting, form) row: SQNR and KL against the FP model."""
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
        model = _load(model_name)

        def run(reference) -> torch.Tensor:  # noqa: ANN001
            return torch.cat([reference(evals[i : i + 1]) for i in range(evals.shape[0])])

        fp = run(ReferenceModel(model))
        for label in args.settings:
            wbits, abits = SETTINGS[label]
            recipe = Recipe(wbits=wbits, abits=abits, calib_dataset=args.calib_dataset,
                            nsamples=args.nsamples, seq_len=args.seq_len, seed=args.seed)
            plan = calibrate(model, calib, recipe)
            for form, make in _forms(model, plan, calib, recipe):
                if args.forms and not any(part in form for part in args.forms):
                    continue
                test = run(make())
                row = {"model": model_name, "setting": label, "form": form,
                       "sqnr_db": sqnr_db(fp, test), "kl": next_token_kl(fp, test)}
                rows.append(row)
                _log(json.dumps(row))
    return rows


def _latency_s(graph, ids, repeats: int) -> float:  # noqa: ANN001
    import onnxruntime as ort

    from rptq.runtime.ort import OrtLogits, session_options

    options = session_options(True)
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    logits = OrtLogits(ort.InferenceSession(graph.SerializeToString(), options,
                                            providers=["CPUExecutionProvider"]))
    logits(ids)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        logits(ids)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def latency(args: argparse.Namespace) -> list[dict[str, object]]:
    """ORT CPU latency, checker errors and MatMul count of each exported form (W4A8, W4A4)."""
    from collections import Counter

    import torch

    from rptq.calib.runner import calibrate
    from rptq.check.rules import check_model, errors
    from rptq.model.load import from_module
    from rptq.outliers import make_outlier_opt
    from rptq.plan import Recipe
    from rptq.workflow import quantized_graph

    model = from_module(make_outlier_opt(**LATENCY_MODEL), "random-opt-latency")
    generator = torch.Generator().manual_seed(0)
    calib = torch.randint(0, LATENCY_MODEL["vocab_size"], (4, args.seq_len), generator=generator)
    ids = torch.randint(0, LATENCY_MODEL["vocab_size"], (1, args.seq_len), generator=generator)
    rows: list[dict[str, object]] = []
    for label in args.settings:
        wbits, abits = SETTINGS[label]
        recipe = Recipe(wbits=wbits, abits=abits, calib_dataset="random", nsamples=4,
                        seq_len=args.seq_len, seed=args.seed)
        plan = calibrate(model, calib, recipe)
        forms = [("default target (ORT)", {"target": "ort"})]
        forms += [(f"TensorRT, {g} scale group{'s' * (g > 1)}",
                   {"target": "trt", "trt_weight_groups": g}) for g in GROUPS[:3]]
        for form, options in forms:
            graph = quantized_graph(model, plan, **options)
            ops = Counter(node.op_type for node in graph.graph.node)
            row = {"setting": label, "form": form, "matmuls": ops["MatMul"],
                   "latency_ms": 1e3 * _latency_s(graph, ids, args.repeats)}
            if options["target"] == "trt":
                row["check_errors"] = len(errors(check_model(graph, "trt")))
            rows.append(row)
            _log(json.dumps(row))
    return rows


def render(data: dict[str, object], args: argparse.Namespace, command: str, wall_s: float) -> str:
    """Markdown: quality per model (SQNR / KL by form and setting), then the latency table."""
    rows: list[dict] = data["quality"]  # type: ignore[assignment]
    lines = ["## TensorRT variant on outlier models (`bench/trt_outliers.py`)", ""]
    lines += machine_lines()
    lines += [
        f"- command: `{command}` ({wall_s / 60:.1f} min in all, one process)",
        f"- calibration: `{args.calib_dataset}`, {args.nsamples} x {args.seq_len} tokens, seed "
        f"{args.seed}; RTN weights, default recipe (`mse` activation ranges, default clusters)",
        f"- evaluation: WikiText-2 test, first {args.limit} windows of {args.seq_len} tokens; "
        "PyTorch references vs the FP model: logit SQNR in dB (higher is better) / KL(P_fp || "
        "P_q) of the next-token distribution in nats (lower is better)",
        "- models: random OPTs with 6 outlier channels in every decoder LayerNorm (gamma x25, "
        "beta +12.5; rptq/outliers.py), OPT vocabulary: "
        + "; ".join(f"`{m}` {MODELS[m]['num_layers']} layers, hidden {MODELS[m]['hidden_size']}"
                    + (f", outlier share {MODELS[m]['outlier_share']:.0%} of the readers' input "
                       "energy" if "outlier_share" in MODELS[m] else "")
                    for m in args.models if m in MODELS),
        "",
    ]
    for model_name in args.models:
        shown_name = shown(Path(model_name)) if "/" in model_name else model_name
        lines += [f"### {shown_name}", "", "| weight form | " + " | ".join(args.settings)
                  + " |", "| --- |" + " ---: |" * len(args.settings)]
        forms = list(dict.fromkeys(r["form"] for r in rows if r["model"] == model_name))
        for form in forms:
            cells = []
            for label in args.settings:
                hit = next((r for r in rows if r["model"] == model_name and r["form"] == form
                            and r["setting"] == label), None)
                cells.append("not run" if hit is None
                             else f"{hit['sqnr_db']:.2f} dB / {hit['kl']:.4f}")
            lines.append(f"| {form} | " + " | ".join(cells) + " |")
        lines.append("")
    speed: list[dict] = data.get("latency", [])  # type: ignore[assignment]
    if speed:
        shape = LATENCY_MODEL
        lines += [
            f"ORT CPU latency, latency model ({shape['num_layers']} layers, hidden "
            f"{shape['hidden_size']}, ffn {shape['ffn_dim']}, vocabulary {shape['vocab_size']}, "
            f"outlier channels; calibrated on random tokens), fp32 graph, one intra-op thread, "
            f"one window of {args.seq_len} tokens, median of {args.repeats} runs after a "
            "warm-up; MatMul nodes in the graph; `check --target tensorrt` errors:",
            "",
            "| setting | form | MatMul nodes | latency | checker errors |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for r in speed:
            lines.append(f"| {r['setting']} | {r['form']} | {r['matmuls']} | "
                         f"{r['latency_ms']:.1f} ms | {r.get('check_errors', 'n/a')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_calibration_args(parser, TINY_MODEL, nsamples=8, seq_len=256)
    parser.add_argument("--models", type=lambda s: s.split(","), default=["outlier"])
    parser.add_argument("--settings", type=lambda s: s.split(","), default=list(SETTINGS))
    parser.add_argument("--limit", type=int, default=4, help="WikiText-2 windows to score")
    parser.add_argument("--repeats", type=int, default=5, help="timed ORT forwards per form")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--forms", type=lambda s: s.split(","), default=[],
                        help="score only the forms whose label contains one of these")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    command = ("python bench/trt_outliers.py " + shlex.join(given)).strip()
    started = time.perf_counter()
    data: dict[str, object] = {"quality": quality(args)}
    if args.json_out:
        args.json_out.write_text(json.dumps(data, indent=1))
    if not args.no_latency:
        data["latency"] = latency(args)
    if args.json_out:
        args.json_out.write_text(json.dumps(data, indent=1))
    text = render(data, args, command, time.perf_counter() - started)
    print(text)
    if not args.no_write:
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
