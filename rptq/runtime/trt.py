"""TensorRT engines: build one from an rptq ONNX file, and run it as a logits function.

TensorRT is optional and imported lazily: its PyPI packages are stubs that download from
NVIDIA's index, which CI cannot reach, and it needs a CUDA GPU. Without it every entry point
raises MissingDependencyError with the install line; nothing is installed automatically.

The builder follows the TensorRT 10/11 Python API: a strongly typed network (TensorRT 11 is
always strongly typed and ignores the flag, 10.x needs it so that the FP16 written into the
ONNX is what runs and Q/DQ alone choose INT8), the ONNX parser reading from the file path (so
external data is found beside the model), one optimization profile over [batch, sequence], a
workspace limit, an optional timing cache that is loaded and saved back, and the serialized
engine written atomically. The runner keeps every buffer in torch CUDA tensors and enqueues on
torch's current stream, so it composes with torch code and `rptq.runtime.perplexity`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from rptq import names
from rptq.errors import ConfigError, MissingDependencyError, TargetRuleError
from rptq.io import atomic_files, check_output

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "TensorRT is not installed: pip install tensorrt (NVIDIA index) on a machine with a CUDA GPU"
)
GIB = 2**30


def import_tensorrt() -> ModuleType:
    """The `tensorrt` module, or a one-line MissingDependencyError naming the install."""
    try:
        import tensorrt
    except (ImportError, OSError):  # OSError: the wheel is there but libnvinfer is not
        raise MissingDependencyError(INSTALL_HINT) from None
    return tensorrt


def require_cuda() -> None:
    """TensorRT builds and runs only on a CUDA device."""
    if not torch.cuda.is_available():
        raise MissingDependencyError(
            "TensorRT needs a CUDA GPU and a CUDA build of PyTorch; none is available here"
        )


@dataclass(frozen=True)
class EngineOptions:
    """Builder settings: memory limit, shape range of the profile, timing cache, effort."""

    workspace_gib: float = 8.0
    max_batch: int = 1
    max_seq_len: int = 2048
    opt_seq_len: int | None = None  # default: max_seq_len (perplexity windows are full length)
    optimization_level: int = 3  # TensorRT's default; 0 builds fastest, 5 searches most
    timing_cache: Path | None = None

    def __post_init__(self) -> None:
        if not self.workspace_gib > 0:
            raise ConfigError(f"--workspace-gib must be > 0, got {self.workspace_gib}")
        if self.max_batch < 1 or self.max_seq_len < 2:
            raise ConfigError("--max-batch must be >= 1 and --max-seq-len >= 2")
        opt = self.opt_seq_len
        if opt is not None and not 1 <= opt <= self.max_seq_len:
            raise ConfigError(f"--opt-seq-len {opt} must lie in 1..{self.max_seq_len}")
        if not 0 <= self.optimization_level <= 5:
            raise ConfigError(f"--opt-level must be 0..5, got {self.optimization_level}")

    @property
    def workspace_bytes(self) -> int:
        """The builder's workspace limit in bytes."""
        return int(self.workspace_gib * GIB)


@dataclass(frozen=True)
class BuildSummary:
    """What `build_engine` wrote."""

    engine: Path
    size_bytes: int
    timing_cache: Path | None
    build_s: float
    tensorrt_version: str


class _LogForwarder:
    """Builds a `trt.ILogger` that forwards to Python logging and remembers errors."""

    @staticmethod
    def make(trt: ModuleType) -> Any:
        severity = trt.ILogger.Severity
        levels = {
            severity.INTERNAL_ERROR: logging.ERROR,
            severity.ERROR: logging.ERROR,
            severity.WARNING: logging.WARNING,
            severity.INFO: logging.DEBUG,
            severity.VERBOSE: logging.DEBUG,
        }

        class Forwarder(trt.ILogger):  # type: ignore[name-defined]
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, level: Any, message: str) -> None:
                python_level = levels.get(level, logging.DEBUG)
                if python_level >= logging.ERROR:
                    self.errors.append(" ".join(str(message).split()))
                logger.log(python_level, "TensorRT: %s", message)

        return Forwarder()


def _parse(trt: ModuleType, builder: Any, trt_logger: Any, onnx_path: Path) -> tuple[Any, Any]:
    """A strongly typed network parsed from the file (its external data is found beside it)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        problems = [parser.get_error(i) for i in range(parser.num_errors)]
        first = problems[0] if problems else None
        where = f" at node {first.node_name()}" if first is not None and first.node_name() else ""
        what = first.desc() if first is not None else "no parser error recorded"
        raise TargetRuleError(
            f"TensorRT's ONNX parser rejected {onnx_path}{where}: {what} "
            f"({len(problems)} errors); run `rptq-export check {onnx_path} --target tensorrt`"
        )
    return network, parser


def _profile(builder: Any, network: Any, options: EngineOptions) -> Any | None:
    """One profile: dynamic batch/sequence dims range from 1 to the maxima (None if static).

    rptq graphs take [batch, sequence] ids and masks with both dims dynamic; static dims keep
    their size, and any other dynamic input shape is refused rather than guessed. A
    decoder-with-past graph also takes position_ids [batch, S] and the cache [batch, heads, P,
    head_dim]: S ranges over 1..max, P over 0..max - 1 and the mask's P + S over 1..max, with
    the optimum at a decode step (S = 1, P + 1 = the optimum length), what generation runs most.
    """
    profile = builder.create_optimization_profile()
    opt_seq = options.opt_seq_len or options.max_seq_len
    batch = (1, options.max_batch, options.max_batch)
    inputs = [network.get_input(index) for index in range(network.num_inputs)]
    with_past = any(tensor.name.startswith(names.PAST_PREFIX) for tensor in inputs)
    full = (1, opt_seq, options.max_seq_len)
    new_tokens = (1, 1, options.max_seq_len) if with_past else full
    seq_ranges = {
        names.GRAPH_INPUT_IDS: new_tokens,
        names.GRAPH_POSITION_IDS: new_tokens,
        names.GRAPH_ATTENTION_MASK: full,
    }
    past = (0, opt_seq - 1, options.max_seq_len - 1)
    dynamic = False
    for tensor in inputs:
        shape = tuple(int(d) for d in tensor.shape)
        if all(d >= 0 for d in shape):
            continue
        if tensor.name.startswith(names.PAST_PREFIX) and len(shape) == 4:
            ranges: tuple[tuple[int, int, int], ...] = (batch, (0, 0, 0), past, (0, 0, 0))
        elif len(shape) == 2:
            ranges = (batch, seq_ranges.get(tensor.name, full))
        else:
            raise TargetRuleError(
                f"input {tensor.name} has dynamic shape {shape}; rptq engines take "
                "[batch, sequence] inputs (and [batch, heads, past, head_dim] caches)"
            )
        bounds = [(d, d, d) if d >= 0 else r for d, r in zip(shape, ranges, strict=True)]
        smallest, optimum, largest = (tuple(b[i] for b in bounds) for i in range(3))
        profile.set_shape(tensor.name, smallest, optimum, largest)
        dynamic = True
    return profile if dynamic else None


def build_engine(
    onnx_path: Path, engine_path: Path, options: EngineOptions, force: bool = False
) -> BuildSummary:
    """Parse `onnx_path`, build a serialized engine and write it atomically to `engine_path`.

    Inputs and outputs are checked before TensorRT is touched; a failed parse or build leaves
    no engine file. The timing cache, when given, is read if it exists and written back (it is
    a cache: it is replaced without --force).
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise ConfigError(f"{onnx_path} does not exist; export a model first")
    check_output(engine_path, force)
    trt = import_tensorrt()
    require_cuda()
    started = time.perf_counter()
    trt_logger = _LogForwarder.make(trt)
    builder = trt.Builder(trt_logger)
    network, _parser = _parse(trt, builder, trt_logger, onnx_path)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    config.builder_optimization_level = options.optimization_level
    profile = _profile(builder, network, options)
    if profile is not None:
        config.add_optimization_profile(profile)
    cache_path = options.timing_cache
    if cache_path is not None:
        blob = Path(cache_path).read_bytes() if Path(cache_path).is_file() else b""
        config.set_timing_cache(config.create_timing_cache(blob), False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        reason = trt_logger.errors[-1] if trt_logger.errors else "see TensorRT's log (-v)"
        raise TargetRuleError(f"TensorRT could not build an engine from {onnx_path}: {reason}")
    with atomic_files(engine_path, force=force) as (tmp,):
        tmp.write_bytes(memoryview(serialized))
    if cache_path is not None:
        with atomic_files(Path(cache_path), force=True) as (tmp,):
            tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return BuildSummary(
        engine=engine_path,
        size_bytes=engine_path.stat().st_size,
        timing_cache=None if cache_path is None else Path(cache_path),
        build_s=time.perf_counter() - started,
        tensorrt_version=str(trt.__version__),
    )


def _torch_dtypes(trt: ModuleType) -> dict[Any, torch.dtype]:
    pairs = {
        "FLOAT": torch.float32,
        "HALF": torch.float16,
        "BF16": torch.bfloat16,
        "INT8": torch.int8,
        "UINT8": torch.uint8,
        "INT32": torch.int32,
        "INT64": torch.int64,
        "BOOL": torch.bool,
    }
    return {getattr(trt.DataType, k): v for k, v in pairs.items() if hasattr(trt.DataType, k)}


class TrtLogits:
    """`(input_ids [B, T], attention_mask [B, T] | None) -> float32 logits [B, T, V]` on CUDA.

    Same signature as OrtLogits and the PyTorch reference, so `perplexity` scores an engine on
    the same windows. Buffers are torch CUDA tensors; work is enqueued on torch's current
    stream, so reading the returned tensor is ordered after the engine without a sync.
    """

    def __init__(self, engine_path: Path, device: str = "cuda") -> None:
        """Deserialize `engine_path` (built by this TensorRT version for this GPU)."""
        path = Path(engine_path)
        if not path.is_file():
            raise ConfigError(f"{path} does not exist; build it with `rptq-export build-engine`")
        trt = import_tensorrt()
        require_cuda()
        self.device = torch.device(device)
        self._logger = _LogForwarder.make(trt)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ConfigError(
                f"{path} is not an engine this TensorRT ({trt.__version__}) can load on this GPU; "
                "rebuild it here with `rptq-export build-engine`"
            )
        self.context = self.engine.create_execution_context()
        self._dtypes = _torch_dtypes(trt)
        io = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in io}
        self.input_names = [n for n in io if is_input[n]]
        self.output_names = [n for n in io if not is_input[n]]
        expected = {names.GRAPH_INPUT_IDS, names.GRAPH_ATTENTION_MASK}
        if any(n.startswith(names.PAST_PREFIX) for n in self.input_names):
            raise ConfigError(
                f"{path} is a KV-cache (with-past) engine; perplexity runs prefill engines: "
                "export the model with --no-cache and build the engine from that"
            )
        if set(self.input_names) != expected or names.GRAPH_LOGITS not in self.output_names:
            raise ConfigError(
                f"{path} has inputs {self.input_names} and outputs {self.output_names}; "
                "expected an rptq engine (input_ids, attention_mask -> logits)"
            )

    def _dtype(self, name: str) -> torch.dtype:
        return self._dtypes[self.engine.get_tensor_dtype(name)]

    @property
    def max_seq_len(self) -> int:
        """Longest sequence the engine's optimization profile accepts."""
        _, _, largest = self.engine.get_tensor_profile_shape(names.GRAPH_INPUT_IDS, 0)
        return int(largest[1])

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run one batch; the mask defaults to all ones (no padding)."""
        _, _, largest = self.engine.get_tensor_profile_shape(names.GRAPH_INPUT_IDS, 0)
        if input_ids.dim() != 2 or any(
            d > int(m) for d, m in zip(input_ids.shape, largest, strict=True)
        ):
            raise ConfigError(
                f"input of shape {tuple(input_ids.shape)} exceeds the engine's profile maximum "
                f"{tuple(largest)}; rebuild with larger --max-batch/--max-seq-len"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        feeds = {names.GRAPH_INPUT_IDS: input_ids, names.GRAPH_ATTENTION_MASK: attention_mask}
        keep = {}
        for name, value in feeds.items():
            tensor = value.to(device=self.device, dtype=self._dtype(name)).contiguous()
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
            keep[name] = tensor
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            keep[name] = torch.empty(shape, dtype=self._dtype(name), device=self.device)
            self.context.set_tensor_address(name, keep[name].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed; see TensorRT's log (-v)")
        return keep[names.GRAPH_LOGITS].float()
