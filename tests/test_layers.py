"""The package layering (pyproject's import-linter contract) holds, and breaks when an upward import appears."""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    if not LINT.exists():
        pytest.fail(f"{LINT} is missing: install the test extras (import-linter)")
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"})


def test_the_layers_contract_is_kept():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The same contract on a copy of the package where the renderer imports the Ray layer."""
    shutil.copytree(ROOT / "r2d3", tmp_path / "r2d3", ignore=shutil.ignore_patterns("weights", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    cameras = tmp_path / "r2d3" / "render" / "cameras.py"
    cameras.write_text(cameras.read_text() + "\nimport r2d3.ray.tune  # noqa\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "r2d3.render.cameras -> r2d3.ray.tune" in result.stdout


def test_importing_the_rewards_loads_no_higher_or_sibling_layer():
    code = ("import sys, json, r2d3.rewards; "
            "print(json.dumps(sorted({m.split('.')[1] for m in sys.modules if m.startswith('r2d3.')})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    loaded = set(json.loads(out.stdout))
    assert not loaded & {"eval", "data", "backends", "pipeline", "train", "jobs", "ray"}, loaded


def test_no_module_imports_a_private_name_of_another_package():
    offenders = []
    for path in (ROOT / "r2d3").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("r2d3"):
                if node.module.split(".")[:2] == module.split(".")[:2]:
                    continue
                offenders += [f"{module}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert not offenders
