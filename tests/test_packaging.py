"""Pins live in constraints.txt; pyproject.toml declares ranges that hold them, the bentofile agrees with it, every
package the code imports is declared, and the platform markers pick exactly one ONNX Runtime everywhere."""
import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DECLARED = [Requirement(r) for r in PYPROJECT["dependencies"]]
DEV = [Requirement(r) for r in PYPROJECT["optional-dependencies"]["dev"]]


def normalise(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def pins():
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return {normalise(n): v.strip() for n, v in (ln.split("==", 1) for ln in lines if "==" in ln)}


def test_the_bentofile_pins_are_the_constraints():
    packages = yaml.safe_load((ROOT / "bentofile.yaml").read_text())["python"]["packages"]
    pinned = pins()
    for package in packages:
        name, version = package.split("==")
        assert pinned.get(normalise(name)) == version, f"bentofile {package}, constraints.txt {pinned.get(normalise(name))}"


def test_every_declared_dependency_is_pinned():
    pinned = pins()
    for requirement in DECLARED + DEV:
        assert normalise(requirement.name) in pinned, f"{requirement.name} has no pin in constraints.txt"


def test_dependencies_are_ranges_that_hold_the_pins():
    """Installing the project into an environment keeps the versions it has where they fit; `pip install -c
    constraints.txt` (make setup, CI) still installs exactly the pins, which must lie inside the ranges."""
    pinned = pins()
    for requirement in DECLARED + DEV:
        assert not any(s.operator in ("==", "===") for s in requirement.specifier), \
            f"{requirement}: an exact version belongs in constraints.txt, a range in pyproject.toml"
        version = pinned[normalise(requirement.name)]
        assert requirement.specifier.contains(version, prereleases=True), f"{requirement} excludes the pinned {version}"


def test_python_versions_agree():
    allowed = SpecifierSet(PYPROJECT["requires-python"])
    classified = {c.rsplit(" ", 1)[1] for c in PYPROJECT["classifiers"]
                  if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)}
    assert classified == {f"3.{minor}" for minor in range(6, 20) if f"3.{minor}" in allowed} == {"3.11", "3.12", "3.13"}
    assert yaml.safe_load((ROOT / "bentofile.yaml").read_text())["docker"]["python_version"] in classified
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in classified


def imported_modules():
    """Top-level modules that the project's code (not its tests) imports, at any depth of the file."""
    names = set()
    for folder in ("training", "export", "serving", "loadtest", "bench", "container"):
        for path in (ROOT / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names


def test_every_imported_package_is_declared():
    ours = {"training", "export", "serving", "loadtest", "bench"}
    optional = {"tensorrt"}   # the [tensorrt] extra, imported only where it is installed
    declared = {normalise(r.name) for r in DECLARED}
    distributions = md.packages_distributions()
    missing = []
    for module in sorted(imported_modules() - ours - optional - set(sys.stdlib_module_names)):
        provided_by = {normalise(d) for d in distributions.get(module, [])}
        assert provided_by, f"no installed distribution provides {module}"
        if not provided_by & declared:
            missing.append(f"{module} (from {', '.join(sorted(provided_by))})")
    assert missing == [], "imported but not declared in pyproject.toml: " + "; ".join(missing)


PLATFORMS = {"linux x86_64": ("linux", "x86_64"), "linux aarch64": ("linux", "aarch64"),
             "macOS arm64": ("darwin", "arm64"), "Windows": ("win32", "AMD64")}


@pytest.mark.parametrize("platform", PLATFORMS)
def test_markers_pick_one_onnxruntime_and_no_uvloop_on_windows(platform):
    sys_platform, machine = PLATFORMS[platform]
    env = {"sys_platform": sys_platform, "platform_machine": machine}
    chosen = {r.name for r in DECLARED if r.marker is None or r.marker.evaluate(env)}
    assert len(chosen & {"onnxruntime", "onnxruntime-gpu"}) == 1
    assert ("onnxruntime-gpu" in chosen) == (platform in ("linux x86_64", "Windows"))
    assert ("uvloop" in chosen) == (sys_platform != "win32")
    assert Marker("sys_platform == 'linux'").evaluate(env) == (sys_platform == "linux")
