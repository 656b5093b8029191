"""Import rules of STYLE.md, checked by parsing the sources (no imports executed).

`passes` never imports torch (it must run where torch is absent and stay numpy-only);
`quant`, `plan`, `plan_weights`, `names` and `points` import no torch, no onnx and no other
rptq layer than the pure ones; `exporter` and `passes` never import `calib`. One target, one
folder: ONNX Runtime's passes never import the TensorRT variant's (`passes/tensorrt/`; only the
pipeline, which orders both, does), and the read-only checker (`check/`) imports no passes,
no torch and no model code: it judges any ONNX file.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "rptq"
PURE = ("rptq.errors", "rptq.points", "rptq.quant", "rptq.plan", "rptq.names", "rptq.io")


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def files(sub: str) -> list[Path]:
    target = PACKAGE / sub
    return sorted(target.rglob("*.py")) if target.is_dir() else [target.with_suffix(".py")]


def rel(path: Path) -> str:
    return str(path.relative_to(PACKAGE))


@pytest.mark.parametrize("path", files("passes"), ids=rel)
def test_passes_never_import_torch_or_calib(path):
    bad = {m for m in imports_of(path) if m.split(".")[0] == "torch" or m.startswith("rptq.calib")}
    bad |= {m for m in imports_of(path) if m.startswith(("rptq.exporter", "rptq.model"))}
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize(
    "path",
    files("quant") + files("plan") + files("plan_weights") + files("names") + files("points"),
    ids=rel,
)
def test_pure_modules_import_only_pure_modules(path):
    for module in imports_of(path):
        if module.startswith("rptq"):
            assert module.startswith(PURE), f"{path.name} imports {module}"
        assert module.split(".")[0] not in {"torch", "onnx", "onnxruntime", "transformers"}, (
            f"{path.name} imports {module}"
        )


@pytest.mark.parametrize("path", files("exporter"), ids=rel)
def test_exporter_never_imports_calib(path):
    assert not {m for m in imports_of(path) if m.startswith("rptq.calib")}


ORT_PASSES = [p for p in files("passes") if p.parent.name == "passes" and p.name != "pipeline.py"]


@pytest.mark.parametrize("path", ORT_PASSES, ids=rel)
def test_ort_passes_never_import_the_tensorrt_variant(path):
    assert not {m for m in imports_of(path) if m.startswith("rptq.passes.tensorrt")}


@pytest.mark.parametrize("path", files("check"), ids=rel)
def test_checker_reads_graphs_without_passes_torch_or_models(path):
    banned = ("rptq.passes", "rptq.calib", "rptq.exporter", "rptq.model", "rptq.runtime")
    bad = {m for m in imports_of(path) if m.split(".")[0] == "torch" or m.startswith(banned)}
    assert not bad, f"{rel(path)} imports {sorted(bad)}"
