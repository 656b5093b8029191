# ruff: noqa: E501  (a table: one case per entry reads better than wrapped arguments)
"""The fault battery's cases: a bad input or fault, the CLI call, and the exact one-line error.

Each case builds what it needs in its own temporary folder `tmp` (placeholders in `argv` and
`error`: {tmp}, {model} the tiny model directory, {plan} a valid plan of it, {data} the data
directory) and names every output it asks for `out*` so `no_half_written_output` can check that
none of them, nor a temporary of them, is left. docs/errors.md lists the same table
(tests/cli/test_fault_battery.py checks that the two agree).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Fault:
    """One bad input: `setup(tmp, env)` builds it, `argv` runs it, `error` is the whole line
    after `error: ` (a trailing `...` matches the start only, where a library's own words
    follow)."""

    id: str
    what: str
    argv: tuple[str, ...]
    error: str
    setup: Callable[[Path, dict[str, Path]], None] | None = None


def _copy_model(tmp: Path, env: dict[str, Path]) -> Path:
    target = tmp / "m"
    shutil.copytree(env["model"], target)
    return target


def _safetensors(tmp: Path, env: dict[str, Path], edit: Callable[[bytes], bytes]) -> None:
    target = _copy_model(tmp, env) / "model.safetensors"
    target.write_bytes(edit(target.read_bytes()))


def _poison(value: float) -> Callable[[Path, dict[str, Path]], None]:
    def setup(tmp: Path, env: dict[str, Path]) -> None:
        from safetensors.torch import load_file, save_file

        target = _copy_model(tmp, env) / "model.safetensors"
        tensors = load_file(str(target))
        key = next(k for k in tensors if k.endswith("layers.1.fc1.weight"))
        tensors[key][3, 5] = value
        save_file(tensors, str(target), metadata={"format": "pt"})

    return setup


def _config(edit: Callable[[dict], dict | str]) -> Callable[[Path, dict[str, Path]], None]:
    def setup(tmp: Path, env: dict[str, Path]) -> None:
        config = _copy_model(tmp, env) / "config.json"
        new = edit(json.loads(config.read_text()))
        config.write_text(new if isinstance(new, str) else json.dumps(new))

    return setup


def _plan(edit: Callable[[Path], None]) -> Callable[[Path, dict[str, Path]], None]:
    def setup(tmp: Path, env: dict[str, Path]) -> None:
        shutil.copytree(env["plan"], tmp / "p")
        edit(tmp / "p")

    return setup


def _plan_json(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(plan: Path) -> None:
        meta = json.loads((plan / "plan.json").read_text())
        edit(meta)
        (plan / "plan.json").write_text(json.dumps(meta))

    return apply


def _swap_perm(plan: Path) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(plan / "tensors.safetensors"))
    perm = tensors["layers.0.R1.perm"].copy()
    perm[1] = perm[0]  # a repeated channel: not a permutation
    tensors["layers.0.R1.perm"] = perm
    save_file(tensors, str(plan / "tensors.safetensors"))


def _truncate(name: str, keep: float) -> Callable[[Path], None]:
    def apply(plan: Path) -> None:
        data = (plan / name).read_bytes()
        (plan / name).write_bytes(data[: int(len(data) * keep)])

    return apply


def _write(name: str, content: bytes) -> Callable[[Path, dict[str, Path]], None]:
    def setup(tmp: Path, env: dict[str, Path]) -> None:
        (tmp / name).write_bytes(content)

    return setup


def _other_model(tmp: Path, env: dict[str, Path]) -> None:
    from rptq.tiny import make_tiny_opt

    make_tiny_opt(num_layers=3, vocab_size=50272, max_positions=256).save_pretrained(tmp / "m3")


def _make_dir(name: str) -> Callable[[Path, dict[str, Path]], None]:
    def setup(tmp: Path, env: dict[str, Path]) -> None:
        (tmp / name).mkdir()

    return setup


def _non_rptq_onnx(tmp: Path, env: dict[str, Path]) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), str(tmp / "relu.onnx"))


def _graph(past: bool) -> Callable[[Path, dict[str, Path]], None]:
    """{tmp}/g.onnx: the tiny model's FP graph, with the KV cache or prefill-only."""

    def setup(tmp: Path, env: dict[str, Path]) -> None:
        import onnx

        from rptq.model.load import load_model
        from rptq.workflow import quantized_graph

        # in memory, not export_onnx: its progress log would go to an earlier case's stderr
        graph = quantized_graph(load_model(str(env["model"])), None, past=past)
        onnx.save(graph, str(tmp / "g.onnx"))

    return setup


def _put(name: str) -> Callable[[Path, dict[str, Path]], None]:
    """{tmp}/out/<name>: an output folder that already holds something."""

    def setup(tmp: Path, env: dict[str, Path]) -> None:
        (tmp / "out").mkdir()
        (tmp / "out" / name).write_bytes(b"keep")

    return setup


LONG_PROMPT = " ".join(["word"] * 300)  # 301 tokens with OPT's "</s>": over the 256 positions
GEN = ("--data-dir", "{data}", "-q")
CAL = ("calibrate", "{model}", "-o", "{tmp}/out", "-q")
FAST = ("--nsamples", "2", "--seq-len", "32", "--clusters", "R1=8,R2=4,R3=4,R4=8,R5=16")
RUN = ("{model}", "--abits", "4", "-o", "{tmp}/out.onnx", "-q", *FAST)
EXPORT = ("export", "{tmp}/m", "--plan", "{plan}", "-o", "{tmp}/out.onnx", "-q")
EVAL = ("--seq-len", "32", "--limit", "1", "-q")
_RECALIBRATE = "recalibrate with `rptq-export calibrate`"

FAULTS: tuple[Fault, ...] = (
    # --- the model -------------------------------------------------------------------------
    Fault("model-missing", "model path that does not exist",
          ("calibrate", "{tmp}/nope", "-o", "{tmp}/out"),
          "model path {tmp}/nope does not exist; pass a Hugging Face OPT directory"),
    Fault("model-is-file", "model path that is a file", ("export", "{tmp}/w.bin", "-o", "{tmp}/out.onnx"),
          "model path {tmp}/w.bin is a file; pass the model directory", _write("w.bin", b"x")),
    Fault("hub-id-offline", "hub id not in the cache, offline",
          ("export", "opt-6.7b", "-o", "{tmp}/out.onnx"),
          "model facebook/opt-6.7b is neither a local directory nor in the Hugging Face cache "
          "(LocalEntryNotFoundError); run `huggingface-cli download facebook/opt-6.7b` where "
          "there is network, or pass a local directory"),
    Fault("no-config", "directory without config.json", ("export", "{tmp}/e", "-o", "{tmp}/out.onnx"),
          "no config.json in {tmp}/e; pass a Hugging Face model directory", _make_dir("e")),
    Fault("config-not-json", "config.json that is not JSON", ("export", "{tmp}/m", "-o", "{tmp}/out.onnx"),
          "{tmp}/m/config.json is not valid JSON (Expecting value); fix it or re-download the model",
          _config(lambda c: "]")),
    Fault("config-llama", "config.json of another architecture",
          ("export", "{tmp}/m", "-o", "{tmp}/out.onnx"),
          "unsupported architecture llama in {tmp}/m; supported: OPT",
          _config(lambda c: {**c, "model_type": "llama"})),
    Fault("config-post-ln", "post-LayerNorm OPT (opt-350m)", ("export", "{tmp}/m", "-o", "{tmp}/out.onnx"),
          "unsupported OPT variant in {tmp}/m: do_layer_norm_before=False (RPTQ's reorder points "
          "need do_layer_norm_before=True; post-LN opt-350m is not supported)",
          _config(lambda c: {**c, "do_layer_norm_before": False})),
    Fault("weights-missing", "no weight file", ("export", "{tmp}/m", "-o", "{tmp}/out.onnx"),
          "no weights in {tmp}/m: expected model.safetensors, model.safetensors.index.json or "
          "pytorch_model.bin",
          lambda tmp, env: (_copy_model(tmp, env) / "model.safetensors").unlink()),
    Fault("weights-corrupt", "safetensors file of random bytes",
          ("export", "{tmp}/m", "-o", "{tmp}/out.onnx"),
          "{tmp}/m/model.safetensors is not a readable safetensors file (...",
          lambda tmp, env: _safetensors(tmp, env, lambda b: bytes(range(256)) * 64)),
    Fault("weights-truncated", "safetensors file cut in half",
          ("export", "{tmp}/m", "-o", "{tmp}/out.onnx"),
          "{tmp}/m/model.safetensors is not a readable safetensors file (...",
          lambda tmp, env: _safetensors(tmp, env, lambda b: b[: len(b) // 2])),
    Fault("weights-empty", "empty safetensors file", ("export", "{tmp}/m", "-o", "{tmp}/out.onnx"),
          "{tmp}/m/model.safetensors is not a readable safetensors file (...",
          lambda tmp, env: _safetensors(tmp, env, lambda b: b"")),
    Fault("weights-nan", "a NaN weight", ("export", "{tmp}/m", "-o", "{tmp}/out.onnx", "-q"),
          "model.decoder.layers.1.fc1.weight in {tmp}/m/model.safetensors holds NaN or Inf "
          "values: the checkpoint is damaged; re-download it or fix the training run that wrote it",
          _poison(float("nan"))),
    Fault("weights-inf", "an Inf weight, found during calibration",
          ("{tmp}/m", "--abits", "4", "-o", "{tmp}/out.onnx", "-q", *FAST[:4], "--data-dir", "{data}"),
          "model.decoder.layers.1.fc1.weight in {tmp}/m/model.safetensors holds NaN or Inf "
          "values: the checkpoint is damaged; re-download it or fix the training run that wrote it",
          _poison(float("inf"))),
    # --- options -----------------------------------------------------------------------------
    Fault("wbits-1", "weight bits below range", (*CAL, "--wbits", "1"),
          "--wbits 1 is not supported; use 2..8, or 16 for float"),
    Fault("wbits-9", "weight bits above range", (*CAL, "--wbits", "9"),
          "--wbits 9 is not supported; use 2..8, or 16 for float"),
    Fault("abits-5", "activation bits not 3/4/8/16", (*CAL, "--abits", "5"),
          "--abits 5 is not supported; use one of 3, 4, 8, or 16 for float"),
    Fault("abits-2", "activation bits below range", (*CAL, "--abits", "2"),
          "--abits 2 is not supported; use one of 3, 4, 8, or 16 for float"),
    Fault("clusters-gt-channels", "more clusters than channels",
          (*CAL, "--abits", "4", "--clusters", "R1=100"),
          "--clusters R1=100 is more than the model has (64 channels); use at most 64"),
    Fault("clusters-gt-head", "more R2 clusters than a head has",
          (*CAL, "--abits", "4", "--clusters", "R2=17"),
          "--clusters R2=17 is more than the model has (per head (16 channels each)); use at most 16"),
    Fault("clusters-zero", "zero clusters", (*CAL, "--abits", "4", "--clusters", "R1=0"),
          "--clusters for R1 must be >= 1, got 0"),
    Fault("seq-len-too-long", "windows longer than the model's context",
          (*CAL, "--abits", "4", "--seq-len", "4096"),
          "--seq-len 4096 exceeds the model's 256 positions"),
    Fault("seq-len-1", "one-token windows", (*CAL, "--abits", "4", "--seq-len", "1"),
          "--nsamples must be >= 1 and --seq-len >= 2"),
    Fault("nsamples-0", "no calibration windows", (*CAL, "--abits", "4", "--nsamples", "0"),
          "--nsamples must be >= 1 and --seq-len >= 2"),
    Fault("group-size-7", "weight group that does not divide the widths",
          (*CAL, "--weight-group-size", "7"),
          "--weight-group-size 7 must divide the linears' input widths (64 and 256)"),
    Fault("int4-block-ort", "--int4-block without --target tensorrt",
          ("export", "{model}", "-o", "{tmp}/out.onnx", "--int4-block", "64"),
          "--int4-block applies to --target tensorrt only"),
    Fault("kv-int-no-cache", "integer KV cache with the prefill-only graph",
          ("export", "{model}", "-o", "{tmp}/out.onnx", "--no-cache", "--kv-cache-dtype", "int8"),
          "--kv-cache-dtype int8 needs the KV-cache graph; drop --no-cache or use --kv-cache-dtype float"),
    Fault("kv-int-trt", "integer KV cache for TensorRT",
          ("export", "{model}", "--plan", "{plan}", "-o", "{tmp}/out.onnx", "--target", "tensorrt",
           "--kv-cache-dtype", "int8"),
          "--kv-cache-dtype int8 is for the ONNX Runtime target only (TensorRT keeps a float cache); "
          "use --kv-cache-dtype float with --target tensorrt"),
    Fault("kv-int-fp", "integer KV cache without a plan",
          ("export", "{model}", "-o", "{tmp}/out.onnx", "--kv-cache-dtype", "uint8"),
          "--kv-cache-dtype uint8 stores the plan's K/V codes, but layer 0's k is not quantized to "
          "8 bits or fewer; quantize K/V (--abits 8 or lower, or --only-quant-kv) or use "
          "--kv-cache-dtype float"),
    Fault("kv-int-a16", "integer KV cache with float activations",
          ("{model}", "-o", "{tmp}/out.onnx", "--kv-cache-dtype", "int8"),
          "--kv-cache-dtype int8 stores quantized K/V, but --abits 16 leaves them float; use "
          "--abits 8 or lower, or --kv-cache-dtype float"),
    Fault("trt-groups-ort", "--trt-weight-groups without --target tensorrt",
          ("export", "{model}", "-o", "{tmp}/out.onnx", "--trt-weight-groups", "2"),
          "--trt-weight-groups applies to --target tensorrt only"),
    Fault("act-form-trt", "--act-quant-form with --target tensorrt",
          ("export", "{model}", "-o", "{tmp}/out.onnx", "--target", "tensorrt",
           "--act-quant-form", "qdq"),
          "--act-quant-form applies to --target ort only (the TensorRT variant writes per-tensor "
          "Q/DQ); drop it"),
    Fault("trt-groups-0", "no weight scale group",
          ("export", "{model}", "-o", "{tmp}/out.onnx", "--target", "tensorrt",
           "--trt-weight-groups", "0"),
          "--trt-weight-groups must be >= 1, got 0"),
    Fault("kv-only-a16", "--only-quant-kv with float activations", (*CAL, "--only-quant-kv"),
          "--only-quant-kv needs --abits 3, 4 or 8"),
    Fault("lorc-negative", "negative LoRC rank", (*CAL, "--lorc-rank", "-1"),
          "--lorc-rank must be >= 0, got -1"),
    Fault("device-tpu", "a device that is neither cpu nor cuda", (*CAL, "--device", "tpu"),
          "--device 'tpu' is not a device; use cpu, cuda, cuda:N, a comma-separated list such as "
          "cuda:0,cuda:1, or cuda:all"),
    Fault("device-all-in-list", "cuda:all inside a device list",
          (*CAL, "--device", "cpu,cuda:all"),
          "--device cuda:all stands alone; to pick GPUs list them: cuda:0,cuda:1"),
    # --- calibration and evaluation data --------------------------------------------------------
    Fault("calib-unknown", "unknown calibration set",
          (*CAL, "--abits", "4", *FAST, "--calib-dataset", "imagenet", "--data-dir", "{data}"),
          "unknown calibration set 'imagenet': choose one of wikitext2, ptb, c4, mix, c4-sample "
          "or a path to a .txt file"),
    Fault("calib-txt-missing", "calibration .txt that does not exist",
          (*CAL, "--abits", "4", *FAST, "--calib-dataset", "{tmp}/none.txt", "--data-dir", "{data}"),
          "calibration text {tmp}/none.txt does not exist: check the path"),
    Fault("calib-txt-empty", "empty calibration text",
          (*CAL, "--abits", "4", *FAST, "--calib-dataset", "{tmp}/c.txt", "--data-dir", "{data}"),
          "{tmp}/c.txt is empty: give a text with at least 33 tokens", _write("c.txt", b"")),
    Fault("calib-txt-binary", "binary file as calibration text",
          (*CAL, "--abits", "4", *FAST, "--calib-dataset", "{tmp}/c.txt", "--data-dir", "{data}"),
          "{tmp}/c.txt is not UTF-8 text (invalid start byte): convert it to UTF-8",
          _write("c.txt", bytes([0x89, 0x50, 0x4E, 0x47, 0xFF, 0xFE, 0x00, 0x01]) * 64)),
    Fault("calib-txt-short", "calibration text shorter than one window",
          (*CAL, "--abits", "4", *FAST, "--calib-dataset", "{tmp}/c.txt", "--data-dir", "{data}"),
          "{tmp}/c.txt has 3 tokens but a 32-token window needs 33: use a longer text or a "
          "smaller --seq-len", _write("c.txt", b"too short")),
    Fault("calib-named-offline", "named set not in --data-dir, no datasets library or offline",
          (*CAL, "--abits", "4", *FAST, "--calib-dataset", "wikitext2", "--data-dir", "{data}"),
          "wikitext2 train text is not in {data} and ..."),
    Fault("data-dir-missing", "--data-dir that does not exist",
          (*CAL, "--abits", "4", *FAST, "--data-dir", "{tmp}/nodata"),
          "data directory {tmp}/nodata does not exist: pass --data-dir or set RPTQ_DATA_DIR to "
          "the folder that holds wikitext2/, ptb/, c4/ and tokenizers/"),
    Fault("eval-unknown-set", "unknown evaluation set",
          ("eval", "{model}", "--datasets", "wikitext3", "--data-dir", "{data}"),
          "unknown dataset 'wikitext3'; choose from wikitext2, ptb, c4"),
    Fault("eval-limit-0", "--limit 0", ("eval", "{model}", *EVAL[:2], "--limit", "0", "--data-dir", "{data}"),
          "--limit 0 leaves no wikitext2 windows; use 1 or more"),
    Fault("eval-not-rptq-onnx", "eval of an ONNX file rptq did not write",
          ("eval", "{tmp}/relu.onnx", *EVAL, "--data-dir", "{data}"),
          "{tmp}/relu.onnx was not exported by rptq (no rptq.shape metadata)", _non_rptq_onnx),
    Fault("eval-onnx-missing", "eval of an .onnx that does not exist", ("eval", "{tmp}/no.onnx"),
          "{tmp}/no.onnx does not exist"),
    Fault("eval-onnx-garbage", "eval of an .onnx of random bytes",
          ("eval", "{tmp}/g.onnx", *EVAL, "--data-dir", "{data}"),
          "{tmp}/g.onnx is not an ONNX model (DecodeError): pass a file written by `rptq-export`",
          _write("g.onnx", bytes(range(256)) * 8)),
    Fault("check-garbage", "check of a file that is not ONNX", ("check", "{tmp}/g.onnx"),
          "{tmp}/g.onnx is not a readable ONNX model (DecodeError)",
          _write("g.onnx", bytes(range(256)) * 8)),
    Fault("check-missing", "check of a missing file", ("check", "{tmp}/no.onnx"),
          "{tmp}/no.onnx does not exist"),
    Fault("build-engine-not-onnx", "build-engine of a file that is not ONNX",
          ("build-engine", "{tmp}/g.onnx", "-o", "{tmp}/out.engine"),
          "{tmp}/g.onnx is not an ONNX model (DecodeError): pass a file written by `rptq-export`",
          _write("g.onnx", bytes(range(256)) * 8)),
    # --- plans ---------------------------------------------------------------------------------
    Fault("plan-missing", "plan directory that does not exist",
          ("export", "{model}", "--plan", "{tmp}/nope", "-o", "{tmp}/out.onnx"),
          "{tmp}/nope is not a plan directory (expected plan.json and tensors.safetensors); make "
          "one with `rptq-export calibrate`"),
    Fault("plan-other-model", "plan of another model",
          ("export", "{tmp}/m3", "--plan", "{plan}", "-o", "{tmp}/out.onnx"),
          "plan {plan} was made for model tiny-opt (2 layers, hidden 64), which does not match "
          "this model; calibrate a plan for this model", _other_model),
    Fault("plan-other-version", "plan of another schema version",
          ("export", "{model}", "--plan", "{tmp}/p", "-o", "{tmp}/out.onnx"),
          "{tmp}/p/plan.json has schema version 99; this rptq reads version 1: recalibrate with "
          "this rptq, or use the rptq that wrote the plan",
          _plan(_plan_json(lambda m: m.update(schema_version=99)))),
    Fault("plan-json-corrupt", "plan.json that is not JSON",
          ("export", "{model}", "--plan", "{tmp}/p", "-o", "{tmp}/out.onnx"),
          "{tmp}/p/plan.json is not valid JSON (Expecting value); recalibrate",
          _plan(lambda p: (p / "plan.json").write_text("]"))),
    Fault("plan-tensors-truncated", "truncated tensors.safetensors",
          ("export", "{model}", "--plan", "{tmp}/p", "-o", "{tmp}/out.onnx"),
          "{tmp}/p/tensors.safetensors is unreadable (SafetensorError); recalibrate",
          _plan(_truncate("tensors.safetensors", 0.5))),
    Fault("plan-not-permutation", "a plan edited to hold a non-permutation",
          ("export", "{model}", "--plan", "{tmp}/p", "-o", "{tmp}/out.onnx"),
          "{tmp}/p: layers.0.R1.perm is not a permutation of 64 channels; " + _RECALIBRATE,
          _plan(_swap_perm)),
    Fault("plan-bits-edited", "a plan edited to 12-bit weights",
          ("export", "{model}", "--plan", "{tmp}/p", "-o", "{tmp}/out.onnx"),
          "{tmp}/p/plan.json is malformed (ConfigError: --wbits 12 is not supported; use 2..8, "
          "or 16 for float); recalibrate", _plan(_plan_json(lambda m: m["recipe"].update(wbits=12)))),
    # --- outputs -------------------------------------------------------------------------------
    Fault("output-exists", "output exists, no --force",
          ("export", "{model}", "-o", "{tmp}/out.onnx"),
          "{tmp}/out.onnx exists; pass --force to overwrite it", _write("out.onnx", b"keep")),
    Fault("output-is-dir", "output path that is a directory",
          ("export", "{model}", "-o", "{tmp}/out.onnx", "--force"),
          "could not write {tmp}/out.onnx (Is a directory); check free space and permissions",
          _make_dir("out.onnx")),
    Fault("output-dir-missing", "output in a directory that does not exist",
          ("export", "{model}", "-o", "{tmp}/a/out.onnx"),
          "output directory {tmp}/a does not exist; create it first"),
    Fault("output-folder-not-empty", "output folder that holds files, no --force",
          ("export", "{model}", "-o", "{tmp}/out/"),
          "{tmp}/out exists; pass --force to overwrite it", _put("keep.txt")),
    Fault("output-folder-is-file", "output folder path that is a file",
          ("export", "{model}", "-o", "{tmp}/out.onnx/"),
          "{tmp}/out.onnx is a file; pass a folder (-o DIR/) or a .onnx path",
          _write("out.onnx", b"keep")),
    # --- generate ------------------------------------------------------------------------------
    Fault("generate-prefill-only", "generate with a prefill-only graph (--no-cache)",
          ("generate", "{tmp}/g.onnx", "--prompt", "Hello", *GEN),
          "{tmp}/g.onnx is a prefill-only graph (no KV cache) and cannot generate; export it "
          "again without --no-cache", _graph(past=False)),
    Fault("generate-engine", "generate with a TensorRT engine file",
          ("generate", "{tmp}/m.engine", "--prompt", "Hello", *GEN),
          "{tmp}/m.engine is a TensorRT engine; `generate` runs ONNX graphs in ONNX Runtime: pass "
          "the .onnx file (or output folder) the engine was built from", _write("m.engine", b"x")),
    Fault("generate-model-dir", "generate with a Hugging Face model directory (not exported)",
          ("generate", "{model}", "--prompt", "Hello", *GEN),
          "{model} holds no model.onnx: export it first (`rptq-export export {model} -o OUT/`) "
          "and generate from OUT/"),
    Fault("generate-empty-prompt", "generate with an empty prompt",
          ("generate", "{tmp}/g.onnx", "--prompt", " ", *GEN),
          "--prompt is empty; give the text to continue", _graph(past=True)),
    Fault("generate-too-many-tokens", "--max-new-tokens beyond the context length",
          ("generate", "{tmp}/g.onnx", "--prompt", "Hello", "--max-new-tokens", "300", *GEN),
          "--max-new-tokens 300 exceeds the model's 256 positions (prompt included); use fewer",
          _graph(past=True)),
    Fault("generate-prompt-too-long", "a prompt longer than the context",
          ("generate", "{tmp}/g.onnx", "--prompt", LONG_PROMPT, *GEN),
          "the prompt is 301 tokens but the model's context is 256: shorten the prompt",
          _graph(past=True)),
    Fault("generate-no-room", "prompt plus --max-new-tokens beyond the context",
          ("generate", "{tmp}/g.onnx", "--prompt", "Hello there", "--max-new-tokens", "255",
           *GEN),
          "the prompt's 3 tokens plus --max-new-tokens 255 exceed the model's 256 positions; use "
          "--max-new-tokens 253 or less", _graph(past=True)),
    Fault("eval-onnx-target", "eval --target tensorrt of an .onnx file (no plan)",
          ("eval", "{tmp}/relu.onnx", "--target", "tensorrt"),
          "--target tensorrt evaluates the TensorRT variant's reference of a --plan; an .onnx or "
          ".engine file already is one target's graph", _non_rptq_onnx),
)  # fmt: skip


def expand(text: str, tmp: Path, env: dict[str, Path]) -> str:
    return text.format(tmp=tmp, **{k: str(v) for k, v in env.items()})


def matches(expected: str, line: str) -> bool:
    """The whole line, or its start where `expected` ends with `...`."""
    if expected.endswith("..."):
        return line.startswith(expected[:-3]) and bool(expected[:-3])
    return line == expected


def leftovers(tmp: Path) -> list[str]:
    """Outputs (`out*`) and their temporaries (`.out*`) under `tmp`: none may remain."""
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith(("out", ".out")))


def file_sizes(tmp: Path) -> dict[str, int]:
    return {str(p.relative_to(tmp)): p.stat().st_size for p in tmp.rglob("*") if p.is_file()}


__all__ = ["FAULTS", "Fault", "expand", "file_sizes", "leftovers", "matches", "np"]
