"""pyproject.toml declares what the package imports, at versions the tested environment has."""

from __future__ import annotations

import ast
import importlib.metadata
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (the package supports 3.10)
ROOT = Path(__file__).parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
REQUIREMENTS = [Requirement(line) for line in PROJECT["dependencies"]]
OPTIONAL = [Requirement(line) for lines in PROJECT["optional-dependencies"].values()
            for line in lines]  # fmt: skip


def imported_modules() -> set[str]:
    """Top-level names of every module the package imports (stdlib and itself left out)."""
    names = set()
    for path in (ROOT / "kd_dist").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"kd_dist", "__future__"}


def test_every_imported_library_is_a_declared_dependency():
    """A library imported only through another's dependencies (Jinja2 through torch) breaks
    the day that one drops it."""
    declared = {canonicalize_name(r.name) for r in REQUIREMENTS + OPTIONAL}
    distributions = importlib.metadata.packages_distributions()
    missing = {
        module: distributions.get(module, [module])
        for module in imported_modules()
        if not {canonicalize_name(d) for d in distributions.get(module, [module])} & declared
    }
    assert not missing, f"imported but not in pyproject.toml's dependencies: {missing}"


def test_the_installed_versions_satisfy_the_declared_floors():
    for requirement in REQUIREMENTS:
        version = importlib.metadata.version(requirement.name)
        assert requirement.specifier.contains(version, prereleases=True), (requirement, version)
