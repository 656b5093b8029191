"""The streaming random-OPT writer produces checkpoints that every loader we use accepts."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pytest
import torch

from rptq.errors import OutputError
from rptq.model import random_checkpoint as rc
from rptq.model.load import load_model
from rptq.model.random_checkpoint import write_random_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]


def tiny_config(layers: int = 2):  # noqa: ANN201 (transformers OPTConfig)
    from transformers import OPTConfig

    return OPTConfig(
        vocab_size=128,
        hidden_size=16,
        num_attention_heads=2,
        ffn_dim=32,
        num_hidden_layers=layers,
        max_position_embeddings=32,
        word_embed_proj_dim=16,
        pad_token_id=1,
    )


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                tensors[key] = handle.get_tensor(key)
    return tensors


def test_tiny_checkpoint_has_save_pretrained_names_shapes_and_alignment(tmp_path: Path) -> None:
    from transformers import OPTForCausalLM

    config = tiny_config()
    write_random_checkpoint(tmp_path / "out", config, dtype=torch.float16)
    reference = {
        k: v for k, v in OPTForCausalLM(config).state_dict().items() if k != "lm_head.weight"
    }  # tied: save_pretrained drops it too
    written = read_all(tmp_path / "out")
    assert {k: tuple(v.shape) for k, v in written.items()} == {
        k: tuple(v.shape) for k, v in reference.items()
    }
    assert all(v.dtype == torch.float16 for v in written.values())
    header_len = struct.unpack("<Q", (tmp_path / "out/model.safetensors").read_bytes()[:8])[0]
    assert header_len % 8 == 0
    note = json.loads((tmp_path / "out/RANDOM.json").read_text())
    assert note["parameters"] == sum(v.numel() for v in reference.values())
    assert "meaningless" in note["what"]


def test_tiny_checkpoint_loads_in_transformers_and_rptq(tmp_path: Path) -> None:
    from transformers import OPTForCausalLM

    out = tmp_path / "out"
    write_random_checkpoint(out, tiny_config(), dtype=torch.float32, seed=3)
    model, info = OPTForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    written = read_all(out)
    for name, tensor in model.state_dict().items():
        if name != "lm_head.weight":
            torch.testing.assert_close(tensor, written[name], rtol=0, atol=0)
    decoder = model.model.decoder
    assert decoder.embed_tokens.weight[1].abs().sum() == 0  # padding row, as nn.Embedding
    assert decoder.layers[0].fc1.bias.abs().sum() == 0
    assert decoder.layers[0].self_attn_layer_norm.weight.std() > 0.05  # perturbed gamma
    loaded = load_model(str(out))
    assert loaded.shape.num_layers == 2
    assert loaded.shape.hidden_size == 16
    torch.testing.assert_close(
        loaded.weights.get("model.decoder.layers.1.fc2.weight"),
        written["model.decoder.layers.1.fc2.weight"],
        rtol=0,
        atol=0,
    )


def test_sharded_output_matches_unsharded(tmp_path: Path) -> None:
    config = tiny_config(layers=3)
    write_random_checkpoint(tmp_path / "one", config, seed=7)
    written = write_random_checkpoint(tmp_path / "many", config, seed=7, max_shard_bytes=3000)
    index = json.loads((tmp_path / "many/model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    assert shards == sorted(f for f in written.files if f.endswith(".safetensors"))
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    single, sharded = read_all(tmp_path / "one"), read_all(tmp_path / "many")
    assert set(index["weight_map"]) == set(single)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in single.values())
    for name, tensor in single.items():
        torch.testing.assert_close(sharded[name], tensor, rtol=0, atol=0)
    assert load_model(str(tmp_path / "many")).shape.num_layers == 3


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    config = tiny_config()
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        write_random_checkpoint(tmp_path / name, config, seed=seed)
    data = {n: (tmp_path / n / "model.safetensors").read_bytes() for n in "abc"}
    assert data["a"] == data["b"]
    assert data["a"] != data["c"]


def test_generated_tensors_never_exceed_one_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Peak memory is bounded by the chunk, not the model: no larger tensor is ever created."""
    monkeypatch.setattr(rc, "CHUNK_ELEMENTS", 500)
    sizes: list[int] = []
    for factory in ("randn", "zeros"):
        original = getattr(torch, factory)

        def spy(*args, _original=original, **kwargs):  # noqa: ANN002, ANN003, ANN202
            tensor = _original(*args, **kwargs)
            sizes.append(tensor.numel())
            return tensor

        monkeypatch.setattr(torch, factory, spy)
    config = tiny_config()
    write_random_checkpoint(tmp_path / "out", config)
    monkeypatch.undo()
    largest = max(spec.numel for spec in rc.tensor_specs(config))
    assert largest > 4 * 500
    assert max(sizes) <= 500
    assert load_model(str(tmp_path / "out")).shape.vocab_size == 128


def test_refuses_non_empty_output_without_force(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    write_random_checkpoint(out, tiny_config())  # an empty directory is fine to replace
    with pytest.raises(OutputError, match="--force"):
        write_random_checkpoint(out, tiny_config(), seed=1)
    before = (out / "model.safetensors").read_bytes()
    write_random_checkpoint(out, tiny_config(), seed=1, force=True)
    assert (out / "model.safetensors").read_bytes() != before


def test_failure_midway_leaves_nothing_behind(tmp_path: Path) -> None:
    def explode(written: int, total: int) -> None:
        if written > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_random_checkpoint(tmp_path / "out", tiny_config(), progress=explode)
    assert list(tmp_path.iterdir()) == []
    write_random_checkpoint(tmp_path / "kept", tiny_config())
    with pytest.raises(KeyboardInterrupt):
        write_random_checkpoint(tmp_path / "kept", tiny_config(), force=True, progress=explode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    assert load_model(str(tmp_path / "kept")).shape.num_layers == 2


def test_progress_reaches_the_file_total(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    written = write_random_checkpoint(
        tmp_path / "out",
        tiny_config(),
        max_shard_bytes=4000,
        progress=lambda done, total: calls.append((done, total)),
    )
    done, total = calls[-1]
    assert done == total
    assert total == sum(
        (tmp_path / "out" / f).stat().st_size for f in written.files if f.endswith(".safetensors")
    )


def test_published_parameter_counts() -> None:
    assert rc.parameter_count("125m") == 125_239_296  # facebook/opt-125m's published count
    assert rc.parameter_count(rc.opt_config("6.7b", num_layers=2)) < rc.parameter_count("1.3b")


def test_cli_writes_layer_override_and_refuses_existing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = importlib.util.spec_from_file_location(
        "make_random_opt", REPO_ROOT / "bench" / "make_random_opt.py"
    )
    assert spec is not None
    assert spec.loader is not None
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "opt"
    args = ["--size", "125m", "--layers", "1", "--shard-gib", "0.05", "-o", str(out)]
    assert cli.main(args) == 0
    assert "1 layers" in capsys.readouterr().out
    assert load_model(str(out)).shape.num_layers == 1
    assert (out / "model.safetensors.index.json").exists()
    assert cli.main(args) == 1
    assert "--force" in capsys.readouterr().err
