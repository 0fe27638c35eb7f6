"""The import contracts of pyproject.toml (docs/architecture.md): they hold on the package, and each one fails on a
copy of the package with one deliberate violation, so that a contract cannot silently check nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

VIOLATIONS = {
    # engines, runs and modeling are siblings in one layer: none imports another
    "siblings of a layer": ("engines.py", "from .runs import layout", "engines | runs | modeling"),
    # a lower layer never imports a higher one
    "import up the layers": ("modeling/perf.py", "from .. import distributed", "Layers:"),
    # distributed and evaluation are siblings
    "upper siblings": ("distributed.py", "from .evaluation import results", "distributed | evaluation"),
    # core promises plain torch
    "core imports datasets": ("core/loss.py", "import datasets", "The algorithm (core) is plain torch"),
}


def _lint_imports(package_parent: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}  # the copy shadows the editable install
    return subprocess.run(
        [str(LINT_IMPORTS), str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=package_parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory) -> Path:
    parent = tmp_path_factory.mktemp("lint")
    shutil.copytree(ROOT / "trl_cream", parent / "trl_cream", ignore=shutil.ignore_patterns("__pycache__"))
    return parent


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is installed by the [test] extra")
def test_the_contracts_hold(package_copy):
    result = _lint_imports(package_copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is installed by the [test] extra")
@pytest.mark.parametrize("case", sorted(VIOLATIONS))
def test_a_deliberate_violation_breaks_its_contract(package_copy, case):
    module, line, contract = VIOLATIONS[case]
    path = package_copy / "trl_cream" / module
    original = path.read_text()
    path.write_text(original + f"\n{line}  # noqa\n")
    try:
        result = _lint_imports(package_copy)
    finally:
        path.write_text(original)
    assert result.returncode != 0, f"{case}: {line!r} in {module} broke no contract"
    broken = [text for text in result.stdout.split("\n\n") if "BROKEN" in text]
    assert any(contract in " ".join(text.split()) for text in broken), result.stdout


def test_the_algorithm_loads_without_datasets_or_transformers():
    code = (
        "import sys\n"
        "import trl_cream.core.labelling, trl_cream.core.loss, trl_cream.core.rewards, trl_cream.core.consistency\n"
        "heavy = sorted(m for m in ('datasets', 'transformers', 'trl', 'peft', 'accelerate') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
