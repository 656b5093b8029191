"""The CLI's subcommands: parse-free functions from argparse namespaces to summary dicts.

Every input is validated before the expensive work starts (recipe, output path, plan, model),
so a typo costs a second, not a calibration run.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rptq.errors import ConfigError, DataError
from rptq.io import check_output
from rptq.log import human_bytes, peak_rss_bytes, stage
from rptq.plan import QuantPlan, Recipe, Target

if TYPE_CHECKING:
    from rptq.exporter.options import ExportOptions

log = logging.getLogger(__name__)
Summary = dict[str, Any]


def _recipe(args: argparse.Namespace, max_positions: int | None = None) -> Recipe:
    """The recipe; with no --nsamples, RPTQ's 128 until the text's own default is known."""
    from rptq.defaults import PAPER_NSAMPLES

    seq_len = args.seq_len if args.seq_len is not None else (max_positions or 2048)
    fields: dict[str, Any] = {
        "wbits": args.wbits,
        "abits": args.abits,
        "only_quant_kv": args.only_quant_kv,
        "granularity": args.granularity,
        "act_metric": args.act_metric,
        "calib_dataset": args.calib_dataset,
        "nsamples": args.nsamples if args.nsamples is not None else PAPER_NSAMPLES,
        "seq_len": seq_len,
        "seed": args.seed,
        "weight_method": args.weight_method,
        "act_order": args.act_order,
        "weight_group_size": args.weight_group_size,
        "lorc_rank": args.lorc_rank,
        "lorc_bits": args.lorc_bits,
        # `calibrate --target` and `run --target`: weights quantized as that target's graph
        # holds them (a run with --plan keeps the plan's own target)
        "target": _cli_target(args),
    }
    if args.clusters is not None:
        fields["clusters"] = args.clusters
    groups = getattr(args, "trt_weight_groups", None)
    if groups is not None:
        if fields["target"] is not Target.TRT:
            raise ConfigError("--trt-weight-groups applies to --target tensorrt only")
        fields["trt_weight_groups"] = groups
    if args.only_quant_kv and args.abits >= 16:
        raise ConfigError("--only-quant-kv needs --abits 3, 4 or 8")
    return Recipe(**fields)


def _calibrate(args: argparse.Namespace, total_stages: int) -> tuple[Any, QuantPlan, Summary]:
    import dataclasses

    from rptq.calib.runner import check_recipe_fits
    from rptq.calib.shards import parse_devices
    from rptq.calib_text import calibration_text, optional_data_dir
    from rptq.data import load_tokenizer
    from rptq.defaults import announce_calibration, resolve_device
    from rptq.model.load import load_model
    from rptq.workflow import calibrate_windows

    _recipe(args)  # option errors before the model is even opened
    device_spec = resolve_device(args.device)
    devices = parse_devices(device_spec)
    data_dir = optional_data_dir(args.data_dir)
    with stage(1, total_stages, f"loading {args.model}"):
        model = load_model(args.model)
        recipe = _recipe(args, model.shape.max_positions)
        check_recipe_fits(recipe, model.shape)
    with stage(2, total_stages, f"calibration data: {recipe.calib_dataset}"):
        tokenizer = load_tokenizer(model.directory, data_dir)
        text = calibration_text(
            recipe.calib_dataset, tokenizer, args.nsamples, recipe.seq_len, recipe.seed, data_dir
        )
        recipe = dataclasses.replace(recipe, nsamples=int(text.windows.shape[0]))
    rows, seq_len = text.windows.shape
    announce_calibration(rows, seq_len, device_spec, model.shape.num_layers, text.source)
    started = time.perf_counter()
    with stage(3, total_stages, f"calibrating {recipe.label()}, {model.shape.num_layers} layers"):
        plan = calibrate_windows(model, text.windows, recipe, device=devices)
    info: Summary = {
        "calibration text": text.source
        + (f", {text.text_tokens:,} tokens" if text.text_tokens else ""),
        "calibration windows": f"{rows} x {seq_len} tokens",
        "device": device_spec,
        "calibration_s": round(time.perf_counter() - started, 1),
    }
    return model, plan, info


def _weight_method(recipe: Recipe) -> str:
    """e.g. `gptq, act-order, LoRC rank 8 (int8 factors)`."""
    parts = [str(recipe.weight_method)]
    if recipe.act_order:
        parts.append("act-order")
    if recipe.weight_group_size:
        parts.append(f"groups of {recipe.weight_group_size}")
    if recipe.lorc_rank:
        kind = "int8" if recipe.lorc_bits == 8 else "float"
        parts.append(f"LoRC rank {recipe.lorc_rank} ({kind} factors)")
    if recipe.target is Target.TRT:
        parts.append("calibrated for --target tensorrt")
    return ", ".join(parts)


def _plan_summary(plan: QuantPlan) -> Summary:
    clusters = {}
    for point in ("R1", "R2", "R3", "R4", "R5"):
        sizes = [len(s.sizes) for s in plan.sites if s.point == point]
        if sizes:
            clusters[point] = f"{min(sizes)}..{max(sizes)} clusters per layer"
    return {
        "model": plan.model.name,
        "recipe": plan.recipe.label(),
        "granularity": str(plan.recipe.granularity),
        "layers": plan.model.shape["num_layers"],
        "quantized activations per layer": len(plan.acts) // max(plan.model.shape["num_layers"], 1),
        "quantized weights": len(plan.weights),
        "weight method": _weight_method(plan.recipe),
        "clusters": clusters or "none (no activation quantization)",
    }


def cmd_calibrate(args: argparse.Namespace) -> Summary:
    """`calibrate`: write a plan directory."""
    output = Path(args.output)
    check_output(output, args.force)
    _, plan, info = _calibrate(args, 3)
    plan.save(output, force=args.force)
    return {
        "plan": str(output),
        **_plan_summary(plan),
        **info,
        "peak_rss": human_bytes(peak_rss_bytes()),
    }


def _cli_target(args: argparse.Namespace) -> Target:
    """The `--target` of a subcommand (ort where it has none)."""
    return Target.from_cli(args.target) if "target" in args else Target.ORT


def _pass_target(args: argparse.Namespace) -> Target:
    """The passes' target for `--target`; option clashes fail before any expensive work."""
    target = _cli_target(args)
    block = getattr(args, "int4_block", None)
    if block is not None and target is not Target.TRT:
        raise ConfigError("--int4-block applies to --target tensorrt only")
    if getattr(args, "trt_weight_groups", None) is not None and target is not Target.TRT:
        raise ConfigError("--trt-weight-groups applies to --target tensorrt only")
    if getattr(args, "act_quant_form", None) is not None and target is Target.TRT:
        raise ConfigError(
            "--act-quant-form applies to --target ort only (the TensorRT variant writes "
            "per-tensor Q/DQ); drop it"
        )
    return target


def _export_options(args: argparse.Namespace, target: Target) -> ExportOptions:
    """The export flags of `run` and `export` as one ExportOptions."""
    from rptq.exporter.options import ExportOptions

    groups = {} if args.trt_weight_groups is None else {"trt_weight_groups": args.trt_weight_groups}
    return ExportOptions(
        args.dtype,
        args.opset,
        target,
        args.int4_block or 0,
        force=args.force,
        past=not args.no_cache,
        kv_cache_dtype=args.kv_cache_dtype,
        act_quant_form=args.act_quant_form or "auto",
        **groups,
    )


def _cache_summary(options: ExportOptions) -> str:
    """The summary's `kv cache` line: what the graph's cache inputs/outputs hold."""
    if not options.past:
        return "none (prefill-only graph, --no-cache)"
    if options.kv_cache_dtype == "float":
        return f"{options.dtype} (past_key_values.* -> present.*)"
    return f"{options.kv_cache_dtype} codes of the plan's K/V grid, 1 byte per element"


def _destination(args: argparse.Namespace) -> tuple[Path, bool]:
    """`-o` checked before any work: (path, True) for the stack folder (`-o DIR/` or an
    existing directory), else (the .onnx path, False)."""
    from rptq import stack_folder

    if stack_folder.wants_folder(args.output):
        folder = stack_folder.folder_path(args.output)
        stack_folder.check_folder(folder, args.force)
        return folder, True
    output = Path(args.output)
    check_output(output, args.force)
    if stack_folder.writes_side_files(output):
        stack_folder.check_side_files(output.parent, args.force)
    return output, False


def _write(
    model: Any,
    plan: QuantPlan | None,
    output: Path,
    folder: bool,
    options: ExportOptions,
    args: argparse.Namespace,
) -> tuple[Any, list[tuple[Path, int]]]:
    """Export to `output`: the whole stack folder, or the .onnx file (with the side files
    beside it when it is named model.onnx). Returns the summary and every file written."""
    from rptq import stack_folder
    from rptq.calib_text import optional_data_dir
    from rptq.workflow import export_onnx

    data_dir = optional_data_dir(getattr(args, "data_dir", None))
    if folder:
        return stack_folder.export_folder(model, plan, output, options, data_dir)
    summary = export_onnx(model, plan, output, options)
    files = list(summary.files)
    if stack_folder.writes_side_files(output):
        side = stack_folder.write_side_files(output.parent, output, model, plan, data_dir)
        files += [(p, p.stat().st_size) for p in side]
    return summary, files


def _export_summary(
    summary: Any,
    plan: QuantPlan | None,
    target: Target = Target.ORT,
    plan_where: str | None = None,
    files: list[tuple[Path, int]] | None = None,
) -> Summary:
    """`plan_where`: the plan directory given, or where a plan calibrated in this run went."""
    return {
        "files": [f"{path} ({human_bytes(size)})" for path, size in files or summary.files],
        "bits": summary.label,
        "target": target.cli,
        "elementwise activation quantizers": summary.op_counts.get("Round", 0),
        "QuantizeLinear nodes": summary.op_counts.get("QuantizeLinear", 0),
        "DequantizeLinear nodes": summary.op_counts.get("DequantizeLinear", 0),
        "plan": plan_where if plan is not None else "none (FP export)",
        "peak_rss": human_bytes(peak_rss_bytes()),
    }


def cmd_run(args: argparse.Namespace) -> Summary:
    """`run` (the default command): calibrate, or load --plan, then export."""
    from rptq.model.load import load_model

    output, folder = _destination(args)
    target = _pass_target(args)
    options = _export_options(args, target)
    if options.kv_cache_dtype != "float" and args.abits >= 16 and not args.plan:
        raise ConfigError(
            f"--kv-cache-dtype {options.kv_cache_dtype} stores quantized K/V, but --abits "
            f"{args.abits} leaves them float; use --abits 8 or lower, or --kv-cache-dtype float"
        )
    info: Summary = {}
    if args.plan:
        model = load_model(args.model)
        plan = QuantPlan.load(Path(args.plan), expect_hash=model.shape.config_hash())
        plan_where = str(args.plan)
    else:
        model, plan, info = _calibrate(args, 4)
        plan_where = (
            "calibrated in this run, kept in memory (not saved: `calibrate -o DIR` saves one)"
        )
    with stage(4, 4, f"exporting {output}"):
        summary, files = _write(model, plan, output, folder, options, args)
    return {
        **_export_summary(summary, plan, target, plan_where, files),
        "kv cache": _cache_summary(options),
        **info,
    }


def cmd_export(args: argparse.Namespace) -> Summary:
    """`export`: MODEL and an optional --plan to ONNX (FP without a plan)."""
    from rptq.model.load import load_model

    output, folder = _destination(args)
    target = _pass_target(args)
    options = _export_options(args, target)
    plan: QuantPlan | None = None
    with stage(1, 2, f"loading {args.model}" + (f" and plan {args.plan}" if args.plan else "")):
        model = load_model(args.model)
        if args.plan:
            plan = QuantPlan.load(Path(args.plan), expect_hash=model.shape.config_hash())
    with stage(2, 2, f"exporting {output}"):
        summary, files = _write(model, plan, output, folder, options, args)
    return {
        **_export_summary(summary, plan, target, args.plan, files),
        "kv cache": _cache_summary(options),
    }


def _onnx_seq_len(path: Path) -> tuple[int, Path | None]:
    """The context length an rptq graph was exported for (its shape metadata)."""
    from rptq.stack_folder import read_graph_info

    return read_graph_info(path).shape["max_positions"], None


def cmd_eval(args: argparse.Namespace) -> Summary:
    """`eval`: perplexity of a model, its plan's reference, an .onnx file or an engine."""
    from rptq.calib_text import eval_text, optional_data_dir
    from rptq.data import EVAL_DATASETS, eval_windows, load_tokenizer
    from rptq.workflow import LogitsFn, evaluate, parse_list

    datasets = parse_list(args.datasets, EVAL_DATASETS, "dataset")
    path = Path(args.model)
    logits_fn: LogitsFn
    if _cli_target(args) is Target.TRT and not args.plan:
        raise ConfigError(
            "--target tensorrt evaluates the TensorRT variant's reference of a --plan; an .onnx "
            "or .engine file already is one target's graph"
        )
    if path.suffix == ".onnx":
        if not path.is_file():
            raise ConfigError(f"{path} does not exist")
        if args.plan:
            raise ConfigError("--plan applies to a PyTorch model, not to an .onnx file")
        from rptq.runtime.ort import OrtLogits, make_session

        max_positions, model_dir = _onnx_seq_len(path)
        backend, logits_fn = "onnxruntime", OrtLogits(make_session(path, [args.providers]))
    elif path.suffix == ".engine":
        if args.plan:
            raise ConfigError("--plan applies to a PyTorch model, not to a TensorRT engine")
        from rptq.runtime.trt import TrtLogits

        engine = TrtLogits(path)
        max_positions, model_dir = engine.max_seq_len, None
        backend, logits_fn = "tensorrt", engine
    else:
        from rptq.model.load import load_model
        from rptq.runtime.reference import ReferenceModel

        model = load_model(args.model)
        plan = QuantPlan.load(Path(args.plan), model.shape.config_hash()) if args.plan else None
        max_positions, model_dir = model.shape.max_positions, model.directory
        backend = "pytorch-reference" if plan is not None else "pytorch-fp"
        logits_fn = ReferenceModel(model, plan)
        if plan is not None and _cli_target(args) is Target.TRT:
            from rptq.runtime.trt_reference import TrtReferenceModel

            backend, logits_fn = "pytorch-reference-tensorrt", TrtReferenceModel(model, plan)
    seq_len = args.seq_len or max_positions
    data_dir = optional_data_dir(args.data_dir)
    tokenizer = load_tokenizer(Path(args.tokenizer) if args.tokenizer else model_dir, data_dir)
    windows, sources = {}, {}
    for name in datasets:
        text = eval_text(name, tokenizer, data_dir, seq_len)
        sources[name] = f"{text.source} ({text.tokens.numel():,} tokens)"
        windows[name] = eval_windows(text.tokens, seq_len)[: args.limit]
        if len(windows[name]) == 0:
            raise DataError(f"--limit {args.limit} leaves no {name} windows; use 1 or more")
    results = evaluate(logits_fn, windows, backend)
    return {
        "model": str(args.model),
        "backend": backend,
        "seq_len": seq_len,
        "perplexity": {name: round(r.ppl, 4) for name, r in results.items()},
        "windows": {name: r.windows for name, r in results.items()},
        "text": sources,
    }


def cmd_inspect(args: argparse.Namespace) -> Summary:
    """`inspect`: summarize a plan directory."""
    plan = QuantPlan.load(Path(args.plan))
    return {"plan": args.plan, **_plan_summary(plan), "provenance": plan.provenance}


def cmd_demo(args: argparse.Namespace) -> Summary:
    """`demo`: the whole pipeline on an embedded tiny model, offline."""
    from rptq.demo import run_demo

    return run_demo(Path(args.output_dir) if args.output_dir else None, steps=args.steps)


def cmd_check(args: argparse.Namespace) -> Summary:
    """Check an ONNX file against TensorRT's rules (or the ONNX checker for ORT)."""
    from rptq.check.rules import check_file, errors

    path = Path(args.onnx)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    violations = check_file(path, _cli_target(args))
    failed = errors(violations)
    summary: Summary = {
        "model": str(path),
        "target": args.target,
        "status": "fail" if failed else "pass",
        "errors": len(failed),
        "warnings": len(violations) - len(failed),
    }
    if args.json:
        summary["violations"] = [v.as_dict() for v in violations]
    elif violations:
        summary["violations"] = [v.line() for v in violations]
    return summary


def cmd_build_engine(args: argparse.Namespace) -> Summary:
    """Build a TensorRT engine after checking the ONNX file against TensorRT's rules."""
    from rptq.check.rules import check_file, errors
    from rptq.log import human_bytes
    from rptq.runtime.trt import EngineOptions, build_engine, import_tensorrt

    source, output = Path(args.onnx), Path(args.output)
    if not source.is_file():
        raise ConfigError(f"{source} does not exist")
    check_output(output, args.force)
    max_seq_len = args.max_seq_len or _onnx_seq_len(source)[0]
    options = EngineOptions(
        workspace_gib=args.workspace_gib,
        max_batch=args.max_batch,
        max_seq_len=max_seq_len,
        optimization_level=args.opt_level,
        timing_cache=Path(args.timing_cache) if args.timing_cache else None,
    )
    import_tensorrt()  # fail in a second, before the check of a large model
    failed = errors(check_file(source, Target.TRT))
    if failed:
        from rptq.errors import TargetRuleError

        raise TargetRuleError(
            f"{source} breaks {len(failed)} TensorRT rules (first: {failed[0].line()}); "
            f"see `rptq-export check {source} --target tensorrt`"
        )
    with stage(1, 1, f"building {output} (TensorRT)"):
        built = build_engine(source, output, options, force=args.force)
    return {
        "engine": f"{built.engine} ({human_bytes(built.size_bytes)})",
        "tensorrt": built.tensorrt_version,
        "max_seq_len": max_seq_len,
        "timing_cache": str(built.timing_cache) if built.timing_cache else "none",
        "build_s": round(built.build_s, 1),
    }


def cmd_generate(args: argparse.Namespace) -> Summary:
    """`generate`: continue a prompt with a with-past graph (rptq.generation)."""
    from rptq.generation import run_generate

    return run_generate(args)
