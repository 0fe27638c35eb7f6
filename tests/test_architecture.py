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


def _drift(protocol: type) -> list[str]:
    """How ``protocol`` differs from `CreamConfig`: a field it names that the config lacks or declares with another
    type, or a property/method the config does not have."""
    import typing

    from trl_cream.trainer.config import CreamConfig

    declared = typing.get_type_hints(CreamConfig)
    fields = typing.get_type_hints(protocol)
    drift = [f"{n}: {t} vs {declared.get(n, '<no field>')}" for n, t in fields.items() if declared.get(n) != t]
    others = set(getattr(protocol, "__protocol_attrs__", None) or typing._get_protocol_attrs(protocol)) - set(fields)
    return drift + [f"{n}: not on CreamConfig" for n in sorted(others) if not hasattr(CreamConfig, n)]


def test_the_settings_protocols_name_cream_config_fields_with_their_types(tmp_path):
    """Below the trainer layer functions take a Protocol of the config fields they read (docs/architecture.md, "What
    a function reads of the config"); `CreamConfig` must satisfy each one, field for field and type for type."""
    from typing import Protocol

    from conftest import cream_args

    from trl_cream.distributed import ProcessArgs
    from trl_cream.engines import LaunchArgs
    from trl_cream.hub.utils import HubArgs
    from trl_cream.modeling.reward_sources import RewardArgs
    from trl_cream.modeling.sampling import SamplingArgs
    from trl_cream.runs.manifest import RunArgs

    config = cream_args(tmp_path)
    for protocol in (SamplingArgs, RewardArgs, LaunchArgs, ProcessArgs, RunArgs, HubArgs):
        assert _drift(protocol) == [], protocol.__name__
        assert isinstance(config, protocol), protocol.__name__

    class Drifted(Protocol):  # the check sees a wrong type, a missing field and a missing method
        top_k: str
        no_such_field: int

        def no_such_method(self) -> None: ...

    assert _drift(Drifted) == [
        "top_k: <class 'str'> vs <class 'int'>",
        "no_such_field: <class 'int'> vs <no field>",
        "no_such_method: not on CreamConfig",
    ]
