"""The layering contract: imports only look down (engines <- calibration <- agent), and reading
the configuration loads no torch (check-config is the unit's ExecStartPre)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"engines": 0, "calibration": 1, "agent": 2}


def upward_imports(package: str) -> list[str]:
    """``file:line imports name`` for every import (module level or inside a function) of a
    package above ``package``."""
    found = []
    for path in sorted((REPO / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if LAYERS.get(top, -1) > LAYERS[package]:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} imports {name}")
    return found


@pytest.mark.parametrize("package", list(LAYERS))
def test_imports_only_look_down(package: str) -> None:
    assert upward_imports(package) == []


def test_the_contract_catches_an_upward_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "bad.py").write_text("def f():\n    from agent.config import load_config\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert upward_imports("engines") == ["engines/bad.py:2 imports agent.config"]


def test_reading_the_configuration_loads_no_torch() -> None:
    code = ("import sys, agent.config as c; c.load_config(sys.argv[1]); "
            "heavy = sorted({'torch', 'onnxruntime', 'scipy', 'tensorrt'} & set(sys.modules)); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code, str(REPO / "config.yaml")], cwd=REPO, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
