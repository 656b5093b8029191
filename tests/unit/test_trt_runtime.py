"""runtime/trt without TensorRT: the one-line install error, option checks, and the builder's
control flow against a stand-in `tensorrt` module.

The stand-in implements only the calls rptq makes, with the names and signatures of TensorRT
10's Python API (Builder, OnnxParser, IBuilderConfig, ITimingCache). It checks what rptq
controls (flags, limits, profile shapes, atomic writes, timing-cache round trip, error
messages), not what TensorRT does; tests/gpu/test_trt_engine_parity.py builds real engines where
TensorRT and a GPU exist.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from rptq.cli import main
from rptq.errors import ConfigError, MissingDependencyError, TargetRuleError
from rptq.runtime import trt as rtrt


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make `import tensorrt` fail even where it is installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def tiny_onnx(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input_ids"], ["logits"], name="id")],
        "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "t"])],
        [helper.make_tensor_value_info("logits", TensorProto.INT64, ["b", "t"])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    return path


def test_missing_tensorrt_is_one_line(no_tensorrt):
    with pytest.raises(MissingDependencyError) as info:
        rtrt.import_tensorrt()
    message = str(info.value)
    assert message == rtrt.INSTALL_HINT
    assert "\n" not in message
    assert "pip install tensorrt" in message


def test_build_without_tensorrt_writes_nothing(no_tensorrt, tmp_path):
    engine = tmp_path / "m.engine"
    with pytest.raises(MissingDependencyError):
        rtrt.build_engine(tiny_onnx(tmp_path / "m.onnx"), engine, rtrt.EngineOptions())
    assert list(tmp_path.iterdir()) == [tmp_path / "m.onnx"]


def test_runner_without_tensorrt(no_tensorrt, tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not really")
    with pytest.raises(MissingDependencyError, match="pip install tensorrt"):
        rtrt.TrtLogits(engine)


def test_missing_inputs_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        rtrt.build_engine(tmp_path / "nope.onnx", tmp_path / "m.engine", rtrt.EngineOptions())
    with pytest.raises(ConfigError, match="does not exist"):
        rtrt.TrtLogits(tmp_path / "nope.engine")


@pytest.mark.parametrize(
    "fields",
    [
        {"workspace_gib": 0},
        {"max_batch": 0},
        {"max_seq_len": 1},
        {"opt_seq_len": 4096},
        {"optimization_level": 6},
    ],
)
def test_engine_options_are_validated(fields):
    with pytest.raises(ConfigError):
        rtrt.EngineOptions(**fields)


def run_cli(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().err


def test_cli_build_engine_without_tensorrt(no_tensorrt, capsys, tmp_path):
    source = tiny_onnx(tmp_path / "m.onnx")
    argv = ["build-engine", str(source), "-o", str(tmp_path / "m.engine"), "--max-seq-len", "8"]
    code, err = run_cli(capsys, argv)
    assert code == 1
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: {rtrt.INSTALL_HINT}"
    ]
    assert not (tmp_path / "m.engine").exists()


def test_cli_eval_engine_without_tensorrt(no_tensorrt, capsys, tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"x")
    code, err = run_cli(capsys, ["eval", str(engine), "--datasets", "wikitext2"])
    assert code == 1
    assert "pip install tensorrt" in err
    assert "Traceback" not in err


# --- a stand-in for the tensorrt module (TensorRT 10 Python API names) -------------------------


class FakeTrt(types.ModuleType):
    """Records what rptq asks of TensorRT; `parse_ok` and `build_ok` choose the outcome."""

    def __init__(
        self, parse_ok: bool = True, build_ok: bool = True, shape: tuple = (-1, -1)
    ) -> None:
        super().__init__("tensorrt")
        self.__version__ = "10.99.0-fake"
        self.calls: dict[str, object] = {}
        fake = self

        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        class ILogger:
            pass

        ILogger.Severity = Severity

        class Input:
            def __init__(self, name: str) -> None:
                self.name, self.shape = name, shape

        class Network:
            num_inputs = 2

            def get_input(self, index: int) -> Input:
                return Input(["input_ids", "attention_mask"][index])

        class ParserError:
            def desc(self) -> str:
                return "Assertion failed: zero point must be 0"

            def node_name(self) -> str:
                return "layers.0/QuantizeLinear"

        class OnnxParser:
            def __init__(self, network, logger) -> None:
                self.num_errors = 0 if parse_ok else 1

            def parse_from_file(self, path: str) -> bool:
                fake.calls["parsed"] = path
                return parse_ok

            def get_error(self, index: int) -> ParserError:
                return ParserError()

        class TimingCache:
            def __init__(self, blob: bytes) -> None:
                self.blob = blob

            def serialize(self) -> bytes:
                return self.blob + b"+timings"

        class Profile:
            def set_shape(self, name, smallest, optimum, largest) -> None:
                fake.calls.setdefault("profile", {})[name] = (smallest, optimum, largest)

        class Config:
            builder_optimization_level = 3

            def set_memory_pool_limit(self, pool, size: int) -> None:
                fake.calls["workspace"] = (pool, size)

            def add_optimization_profile(self, profile) -> None:
                fake.calls["profiles"] = 1

            def create_timing_cache(self, blob: bytes) -> TimingCache:
                self.cache = TimingCache(bytes(blob))
                return self.cache

            def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
                fake.calls["cache_in"] = cache.blob
                return True

            def get_timing_cache(self) -> TimingCache:
                return self.cache

        class Builder:
            def __init__(self, logger) -> None:
                self.logger = logger

            def create_network(self, flags: int) -> Network:
                fake.calls["flags"] = flags
                return Network()

            def create_builder_config(self) -> Config:
                fake.calls["config"] = config = Config()
                return config

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network, config) -> bytes | None:
                if not build_ok:
                    self.logger.log(Severity.ERROR, "out of workspace\nfor tactic")
                    return None
                return b"serialized engine"

        self.ILogger = ILogger
        self.Builder = Builder
        self.OnnxParser = OnnxParser
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")


@pytest.fixture
def fake_trt(monkeypatch):
    def install(**outcome) -> FakeTrt:
        fake = FakeTrt(**outcome)
        monkeypatch.setitem(sys.modules, "tensorrt", fake)
        monkeypatch.setattr(rtrt.torch.cuda, "is_available", lambda: True)
        return fake

    return install


def test_build_flow(fake_trt, tmp_path):
    fake = fake_trt()
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    options = rtrt.EngineOptions(
        workspace_gib=2, max_batch=2, max_seq_len=64, opt_seq_len=32, timing_cache=cache
    )
    source, engine = tiny_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine"
    built = rtrt.build_engine(source, engine, options)
    assert engine.read_bytes() == b"serialized engine"
    assert built.size_bytes == len(b"serialized engine")
    assert fake.calls["parsed"] == str(source)  # from the path: external data is found
    assert fake.calls["flags"] == 1 << 1  # strongly typed
    assert fake.calls["workspace"] == ("workspace", 2 * 2**30)
    assert fake.calls["config"].builder_optimization_level == 3
    assert fake.calls["profile"]["input_ids"] == ((1, 1), (2, 32), (2, 64))
    assert set(fake.calls["profile"]) == {"input_ids", "attention_mask"}
    assert fake.calls["cache_in"] == b"old"
    assert cache.read_bytes() == b"old+timings"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.engine", "m.onnx", "timing.cache"]


def test_existing_engine_needs_force(fake_trt, tmp_path):
    fake_trt()
    source, engine = tiny_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine"
    engine.write_bytes(b"previous")
    with pytest.raises(Exception, match="--force"):
        rtrt.build_engine(source, engine, rtrt.EngineOptions())
    rtrt.build_engine(source, engine, rtrt.EngineOptions(), force=True)
    assert engine.read_bytes() == b"serialized engine"


def test_parser_rejection_is_one_line_and_writes_nothing(fake_trt, tmp_path):
    fake_trt(parse_ok=False)
    source, engine = tiny_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine"
    with pytest.raises(TargetRuleError) as info:
        rtrt.build_engine(source, engine, rtrt.EngineOptions())
    message = str(info.value)
    assert "layers.0/QuantizeLinear" in message
    assert "zero point must be 0" in message
    assert "rptq-export check" in message
    assert "\n" not in message
    assert not engine.exists()


def test_failed_build_keeps_the_cache_and_writes_no_engine(fake_trt, tmp_path):
    fake_trt(build_ok=False)
    cache = tmp_path / "timing.cache"
    source, engine = tiny_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine"
    with pytest.raises(TargetRuleError, match="out of workspace for tactic"):
        rtrt.build_engine(source, engine, rtrt.EngineOptions(timing_cache=cache))
    assert not engine.exists()
    assert not cache.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_no_gpu_is_one_line(fake_trt, monkeypatch, tmp_path):
    fake_trt()
    monkeypatch.setattr(rtrt.torch.cuda, "is_available", lambda: False)
    with pytest.raises(MissingDependencyError, match="CUDA GPU"):
        rtrt.build_engine(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "e", rtrt.EngineOptions())


def test_static_inputs_need_no_profile(fake_trt, tmp_path):
    fake = fake_trt(shape=(2, 64))
    rtrt.build_engine(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine", rtrt.EngineOptions())
    assert "profiles" not in fake.calls


def test_other_dynamic_inputs_are_refused(fake_trt, tmp_path):
    fake_trt(shape=(-1, 4, -1))
    with pytest.raises(TargetRuleError, match=r"\[batch, sequence\]"):
        rtrt.build_engine(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "e", rtrt.EngineOptions())


def test_profile_of_a_with_past_graph():
    """Past inputs get min/opt/max shapes: P from 0, the optimum at a decode step."""
    recorded = {}

    class Profile:
        def set_shape(self, name, smallest, optimum, largest) -> None:
            recorded[name] = (smallest, optimum, largest)

    inputs = [
        ("input_ids", (-1, -1)),
        ("attention_mask", (-1, -1)),
        ("position_ids", (-1, -1)),
        ("past_key_values.0.key", (-1, 4, -1, 16)),
        ("past_key_values.0.value", (-1, 4, -1, 16)),
    ]
    network = types.SimpleNamespace(
        num_inputs=len(inputs),
        get_input=lambda i: types.SimpleNamespace(name=inputs[i][0], shape=inputs[i][1]),
    )
    builder = types.SimpleNamespace(create_optimization_profile=Profile)
    options = rtrt.EngineOptions(max_batch=2, max_seq_len=64, opt_seq_len=32)
    assert rtrt._profile(builder, network, options) is not None
    assert recorded["input_ids"] == ((1, 1), (2, 1), (2, 64))
    assert recorded["position_ids"] == recorded["input_ids"]
    assert recorded["attention_mask"] == ((1, 1), (2, 32), (2, 64))
    assert recorded["past_key_values.0.key"] == ((1, 4, 0, 16), (2, 4, 31, 16), (2, 4, 63, 16))
    assert recorded["past_key_values.0.value"] == recorded["past_key_values.0.key"]
    inputs.append(("other", (-1, -1, -1)))
    network.num_inputs = len(inputs)
    with pytest.raises(TargetRuleError, match="other"):
        rtrt._profile(builder, network, options)
