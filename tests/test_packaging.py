"""pyproject.toml declares what the package imports, at versions the tested environment has."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

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


def test_the_package_imports_and_trains_without_the_optional_extras(tmp_path):
    """The extras are optional: with peft, matplotlib and the trackers unimportable, every module
    imports, a full (non-LoRA) student trains a step and evaluates, and --lora_r names the extra
    to install."""
    script = f"""
import importlib, importlib.util, json, pkgutil, sys
from pathlib import Path
blocked = ["peft", "matplotlib", "tensorboard", "wandb", "torch.utils.tensorboard"]
sys.modules.update(dict.fromkeys(blocked))  # import peft -> ImportError
real_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name in blocked else real_find_spec(name, *a)
import kd_dist
for module in pkgutil.walk_packages(kd_dist.__path__, "kd_dist."):
    if module.name != "kd_dist.__main__":
        importlib.import_module(module.name)
from kd_dist.cli import main
from kd_dist.tiny import build_model, build_tokenizer, save_pair
root = Path({str(tmp_path)!r})
sentences = ["the cat sees a dog.", "a dog finds the cat in the park."] * 10
tokenizer = build_tokenizer(sentences, vocab_size=120)
models = [save_pair(root / size, build_model("gpt2", tokenizer, size), tokenizer)
          for size in ("small", "tiny")]
(root / "text.jsonl").write_text("".join(json.dumps({{"text": s}}) + "\\n" for s in sentences))
common = ["train", "--teacher_model", models[0], "--student_model", models[1], "--dataset",
          str(root / "text.jsonl"), "--max_steps", "1", "--no-compile_loss", "--save_every", "0",
          "--eval_ratio", "0.2"]
assert main([*common, "--output_dir", str(root / "full")]) == 0
assert (root / "full" / "model.safetensors").is_file()
assert (root / "full" / "eval_results.json").is_file()
assert main([*common, "--output_dir", str(root / "lora"), "--lora_r", "4"]) == 2
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=300,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pip install 'kd_dist[peft]'" in result.stderr


CONSTRAINTS = ROOT / "constraints.txt"


def pinned_versions(constraints: Path = CONSTRAINTS) -> dict[str, str]:
    """A constraints file: canonical name -> the exact version `make install` installs."""
    pins = {}
    for line in constraints.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", line
            pins[canonicalize_name(requirement.name)] = specifier.version
    assert pins, f"{constraints} pins nothing"
    return pins


def test_the_constraints_pin_every_requirement_within_its_floor():
    """The tested set covers every requirement of the package and of its dev extra (one left
    unpinned would resolve to whatever is newest), and every pin satisfies pyproject.toml's
    floors. (Their own dependencies are pinned too: see the installed-versions test.)"""
    pins = pinned_versions()
    dev = [Requirement(line) for line in PROJECT["optional-dependencies"]["dev"]]
    for requirement in [*REQUIREMENTS, *dev]:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (requirement, pins)


def test_the_installed_versions_are_the_pinned_ones():
    """Under `make test` (KD_DIST_CONSTRAINTS names the constraints file it installed with),
    every pinned package is installed at exactly its pinned version: a stale lock, or an
    environment that is not the tested set, fails here instead of passing silently.
    (`make test-latest` runs the newest releases on purpose, without it.)"""
    if not os.environ.get("KD_DIST_CONSTRAINTS"):
        pytest.skip("not installed with the constraints (run through `make test`)")
    differing = {}
    for name, version in pinned_versions(ROOT / os.environ["KD_DIST_CONSTRAINTS"]).items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = "not installed"
        # (torch's CPU and CUDA builds carry a local label: 2.13.0+cpu is the pinned 2.13.0.)
        if installed == "not installed" or Version(installed).public != Version(version).public:
            differing[name] = f"pinned {version}, installed {installed}"
    assert not differing, (
        f"installed versions differ from constraints.txt: {differing}. Reinstall the tested "
        "set (make clean install), or, after a green `make test-latest`, `make constraints`."
    )
