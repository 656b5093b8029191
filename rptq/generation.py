"""`rptq-export generate`: continue a prompt with an exported with-past graph in ONNX Runtime.

Every input is checked before the session is built (a 6.7B session takes a minute): the file
kind, the graph kind (prefill-only graphs have no cache to decode with), the prompt and the
lengths against the model's context.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from rptq.errors import ConfigError
from rptq.stack_folder import MODEL_FILE, GraphInfo, read_graph_info

log = logging.getLogger(__name__)

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
CACHE_REPORT_TOKENS = 2048  # the "cache MiB at 2048 tokens"


def resolve_onnx(raw: str) -> Path:
    """The with-past .onnx behind MODEL_DIR_OR_ONNX (a stack folder or the file itself)."""
    path = Path(raw)
    if path.suffix in ENGINE_SUFFIXES:
        raise ConfigError(
            f"{path} is a TensorRT engine; `generate` runs ONNX graphs in ONNX Runtime: pass the "
            ".onnx file (or output folder) the engine was built from"
        )
    if not path.exists():
        raise ConfigError(f"{path} does not exist")
    if path.is_dir():
        onnx_path = path / MODEL_FILE
        if onnx_path.is_file():
            return onnx_path
        if (path / "config.json").is_file():
            raise ConfigError(
                f"{path} holds no {MODEL_FILE}: export it first (`rptq-export export {path} "
                f"-o OUT/`) and generate from OUT/"
            )
        raise ConfigError(f"{path} holds no {MODEL_FILE}; pass an rptq output folder or .onnx")
    return path


def check_graph(onnx_path: Path) -> GraphInfo:
    """The graph's rptq metadata; a prefill-only graph is refused with the fix."""
    info = read_graph_info(onnx_path)
    if not info.past:
        raise ConfigError(
            f"{onnx_path} is a prefill-only graph (no KV cache) and cannot generate; export it "
            "again without --no-cache"
        )
    return info


def sampling_of(args: argparse.Namespace) -> Any:
    """--greedy (the default) or --temperature/--top-p/--seed sampling."""
    from rptq.runtime.sampling import Sampling

    sampled = args.temperature is not None or args.top_p is not None
    if args.greedy and sampled:
        raise ConfigError("--greedy takes the arg-max; drop --temperature/--top-p, or --greedy")
    if not sampled:
        return Sampling()
    temperature = 1.0 if args.temperature is None else args.temperature
    top_p = 1.0 if args.top_p is None else args.top_p
    return Sampling(greedy=False, temperature=temperature, top_p=top_p, seed=args.seed)


def check_lengths(prompt_tokens: int, max_new_tokens: int, context: int) -> None:
    """Prompt plus new tokens must fit the model's learned positions."""
    if prompt_tokens >= context:
        raise ConfigError(
            f"the prompt is {prompt_tokens} tokens but the model's context is {context}: "
            "shorten the prompt"
        )
    if prompt_tokens + max_new_tokens > context:
        raise ConfigError(
            f"the prompt's {prompt_tokens} tokens plus --max-new-tokens {max_new_tokens} exceed "
            f"the model's {context} positions; use --max-new-tokens {context - prompt_tokens} "
            "or less"
        )


def _tokenizer(args: argparse.Namespace, onnx_path: Path) -> Any:
    from rptq.calib_text import optional_data_dir
    from rptq.data import load_tokenizer

    source = Path(args.tokenizer) if args.tokenizer else onnx_path.parent
    return load_tokenizer(source, optional_data_dir(args.data_dir))


def run_generate(args: argparse.Namespace) -> dict[str, Any]:
    """Generate and report the text, the speeds and the cache size."""
    import numpy as np

    from rptq.runtime.decode import DecoderSession
    from rptq.runtime.generate import generate
    from rptq.runtime.ort import make_session

    onnx_path = resolve_onnx(args.model)
    if not args.prompt.strip():
        raise ConfigError("--prompt is empty; give the text to continue")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    info = check_graph(onnx_path)
    context = info.shape["max_positions"]
    if args.max_new_tokens > context:
        raise ConfigError(
            f"--max-new-tokens {args.max_new_tokens} exceeds the model's {context} positions "
            "(prompt included); use fewer"
        )
    sampling = sampling_of(args)
    tokenizer = _tokenizer(args, onnx_path)
    prompt_ids = list(tokenizer(args.prompt)["input_ids"])
    check_lengths(len(prompt_ids), args.max_new_tokens, context)
    decoder = DecoderSession(make_session(onnx_path, [args.providers]))
    eos = tokenizer.eos_token_id
    result = generate(
        decoder,
        np.asarray([prompt_ids], dtype=np.int64),
        None,
        args.max_new_tokens,
        sampling,
        eos_token_id=eos,
    )
    new_ids = [int(t) for t in result.tokens[0]]
    shown = new_ids[:-1] if result.stopped_at_eos else new_ids
    mode = (
        "greedy"
        if sampling.greedy
        else f"temperature {sampling.temperature}, top-p {sampling.top_p}, seed {sampling.seed}"
    )
    summary: dict[str, Any] = {
        "text": args.prompt + tokenizer.decode(shown, skip_special_tokens=True),
        "model": str(onnx_path),
        "sampling": mode,
        "prompt tokens": len(prompt_ids),
        "new tokens": len(new_ids),
        "stopped": "end of sequence" if result.stopped_at_eos else "--max-new-tokens",
        "prefill tokens/s": round(result.prefill_tokens_per_s, 1),
        "decode tokens/s": round(result.decode_tokens_per_s, 1),
        "cache dtype": str(decoder.cache_dtype),
        "cache bytes/token": result.cache_bytes_per_token,
        f"cache MiB at {CACHE_REPORT_TOKENS} tokens": round(
            result.cache_bytes_per_token * CACHE_REPORT_TOKENS / 2**20, 2
        ),
    }
    if args.json:
        summary["prompt ids"] = prompt_ids
        summary["new ids"] = new_ids
    return summary
