"""The fault battery: every bad input in tests/cli/faults.py gets its exact one-line error,
exit code 1, no traceback, and leaves no output (nor a temporary of one) behind."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from rptq.cli import main
from tests.cli.faults import FAULTS, expand, matches

DOC = Path(__file__).resolve().parents[2] / "docs" / "errors.md"


@pytest.fixture(scope="module")
def fault_env(model_dir, calib_args, data_dir, tmp_path_factory):
    plan = tmp_path_factory.mktemp("battery") / "plan"
    assert main(["calibrate", str(model_dir), "--abits", "4", "-o", str(plan), *calib_args]) == 0
    return {"model": model_dir, "plan": plan, "data": data_dir}


def outputs(tmp: Path) -> dict[str, str]:
    """Every output-named entry (`out*`, `.out*` temporaries) and a digest of its bytes."""
    found = {}
    for path in tmp.iterdir():
        if path.name.startswith(("out", ".out")):
            data = (
                path.read_bytes()
                if path.is_file()
                else b"<dir>" + str(sorted(p.name for p in path.rglob("*"))).encode()
            )
            found[path.name] = hashlib.sha256(data).hexdigest()
    return found


@pytest.mark.parametrize("fault", FAULTS, ids=[f.id for f in FAULTS])
def test_fault_gives_its_one_line_error_and_no_output(fault, fault_env, tmp_path, capsys):
    if fault.setup is not None:
        fault.setup(tmp_path, fault_env)
    before = outputs(tmp_path)
    code = main([expand(arg, tmp_path, fault_env) for arg in fault.argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err, err
    assert code == 1, err
    assert len(lines) == 1, err
    want = expand(fault.error, tmp_path, fault_env)
    assert matches(want, lines[0].removeprefix("error: ")), (lines[0], want)
    assert outputs(tmp_path) == before, "an output or a temporary of one was left"


def test_battery_has_forty_cases_and_each_is_documented():
    assert len(FAULTS) >= 40
    assert len({f.id for f in FAULTS}) == len(FAULTS)
    documented = set(re.findall(r"^\| `([a-z0-9-]+)` \|", DOC.read_text(), re.MULTILINE))
    missing = {f.id for f in FAULTS} - documented
    assert not missing, f"docs/errors.md lacks {sorted(missing)}"
