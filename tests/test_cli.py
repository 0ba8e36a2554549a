"""The installed package: the wheel's contents, the `cifar100` command from a virtual environment that is not the
checkout (also `cifar100 serve` and its web page), and the notebook examples of docs/ run as written."""
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import tomllib
import zipfile
from pathlib import Path

import pytest
import requests
from packaging.requirements import Requirement

import cifar100
from serving.local_server import free_port, stop_process_group

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PAGE_FILES = sorted(p.name for p in (ROOT / "serving" / "ui").iterdir())
# Children see neither the checkout (PYTHONPATH) nor a token of the caller's shell.
CLEAN_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("CIFAR100_")}


# ---------------------------------------------------------------- the command, in this process

def test_commands_run_their_modules_and_name_themselves(capsys):
    for name, (module, _) in cifar100.COMMANDS.items():
        with pytest.raises(SystemExit) as exit_:
            cifar100.main([name, "--help"])
        assert exit_.value.code == 0
        usage = capsys.readouterr().out
        assert usage.startswith(f"usage: cifar100 {name} "), usage[:200]
        assert f"python -m {module.removesuffix('.__main__')}" in cifar100.parser().format_help()


@pytest.mark.parametrize("argv,code,text", [(["--version"], 0, f"cifar100 {cifar100.__version__}"),
                                            ([], 2, "the following arguments are required: COMMAND"),
                                            (["scroe"], 2, "invalid choice: 'scroe'")])
def test_version_and_usage_errors(argv, code, text, capsys):
    with pytest.raises(SystemExit) as exit_:
        cifar100.main(argv)
    assert exit_.value.code == code
    captured = capsys.readouterr()
    assert text in captured.out + captured.err


def test_the_version_is_the_packages():
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "cifar100.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", cifar100.__version__)
    assert f"## {cifar100.__version__} " in (ROOT / "CHANGELOG.md").read_text()


# ---------------------------------------------------------------- the wheel, installed elsewhere

class Installed:
    """The project's wheel, built from a copy of what pyproject.toml names, installed (--no-deps) into a fresh
    virtual environment that sees this environment's packages through a .pth file (the 6 GB of dependencies are
    not installed again) and not the checkout."""

    def __init__(self, root):
        source = root / "source"
        setuptools = PYPROJECT["tool"]["setuptools"]
        for package in (p for p in setuptools["packages"] if "." not in p):   # sub-packages come with theirs
            shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
        for name in ["pyproject.toml", PYPROJECT["project"]["readme"], *PYPROJECT["project"]["license-files"],
                     *(f"{m}.py" for m in setuptools["py-modules"])]:
            shutil.copy(ROOT / name, source / name)
        # Offline with this environment's setuptools where it is recent enough (torch requires >= 77), else pip
        # fetches what pyproject's build-system requires into an isolated build environment.
        offline = all(satisfied(r) for r in PYPROJECT["build-system"]["requires"])
        run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *(["--no-build-isolation"] if offline else []),
             "-w", root / "dist", source], cwd=root)
        self.wheel, = (root / "dist").glob("*.whl")
        venv = root / "venv"
        run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root)
        self.bin, self.python = venv / "bin", venv / "bin" / "python"
        self.site = Path(run([self.python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             cwd=root).stdout.strip())
        (self.site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
        # --ignore-installed: this environment's editable install of the project is visible too; leave it alone.
        run([self.python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", self.wheel],
            cwd=root)


def satisfied(requirement):
    requirement = Requirement(requirement)
    try:
        return requirement.specifier.contains(md.version(requirement.name))
    except md.PackageNotFoundError:
        return False


def run(command, cwd, timeout=120):
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=CLEAN_ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{command}: {done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    return Installed(tmp_path_factory.mktemp("install"))


def test_the_wheel_holds_the_code_the_page_and_the_licence(installed):
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    dist_info = f"cifar100_serve-{cifar100.__version__}.dist-info"
    assert {f"serving/ui/{name}" for name in PAGE_FILES} <= names, "the web page is not in the wheel"
    for package in PYPROJECT["tool"]["setuptools"]["packages"]:
        code = {p.relative_to(ROOT).as_posix() for p in (ROOT / package.replace(".", "/")).glob("*.py")}
        assert code <= names, f"missing from the wheel: {sorted(code - names)}"
    assert "cifar100.py" in names and f"{dist_info}/licenses/LICENSE" in names
    assert not any(n.startswith(("tests/", "bench/", "docs/")) for n in names)
    wheel = zipfile.ZipFile(installed.wheel)
    assert "cifar100 = cifar100:main" in wheel.read(f"{dist_info}/entry_points.txt").decode()
    metadata = wheel.read(f"{dist_info}/METADATA").decode()
    assert f"Version: {cifar100.__version__}\n" in metadata and "License-Expression: Apache-2.0\n" in metadata
    assert "Requires-Python: <3.14,>=3.11" in metadata or "Requires-Python: >=3.11,<3.14" in metadata
    assert all(f"Programming Language :: Python :: 3.{minor}\n" in metadata for minor in (11, 12, 13))


def test_the_installed_command_runs_outside_the_checkout(installed, tmp_path):
    where = run([installed.python, "-c", "import cifar100, serving, training; "
                 "print(cifar100.__file__, serving.__file__, training.__file__)"], cwd=tmp_path).stdout.split()
    assert all(Path(f).is_relative_to(installed.site) for f in where), where
    assert run([installed.bin / "cifar100", "--version"], cwd=tmp_path).stdout.strip() == \
        f"cifar100 {cifar100.__version__}"
    listing = run([installed.bin / "cifar100", "--help"], cwd=tmp_path).stdout
    assert all(re.search(rf"^ +{name} ", listing, re.M) for name in cifar100.COMMANDS), listing
    score_help = run([installed.bin / "cifar100", "score", "--help"], cwd=tmp_path).stdout
    assert score_help.startswith("usage: cifar100 score") and "--sample-submission" in score_help
    # The `python -m` forms keep working from the installed package.
    assert "usage: python -m serving.up" in run([installed.python, "-m", "serving.up", "--help"], cwd=tmp_path).stdout


def test_installed_serve_serves_the_page_from_the_package(installed, model_store, tmp_path):
    # A mark in the installed copy of the page: what /ui answers comes from the package, not from the checkout.
    page = installed.site / "serving" / "ui" / "index.html"
    page.write_text(page.read_text().replace("</body>", "<!-- the installed copy -->\n</body>"))
    home = tmp_path / "home"   # BentoML writes its own files here; the models are the shared tiny store's
    home.mkdir()
    (home / "models").symlink_to(model_store / "models")
    port = free_port()
    env = {**CLEAN_ENV, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True", "CIFAR100_BACKEND": "onnx"}
    with open(tmp_path / "serve.log", "wb") as log:
        process = subprocess.Popen([installed.bin / "cifar100", "serve", "--port", str(port)], cwd=tmp_path, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while process.poll() is None and time.monotonic() < deadline:
            try:
                if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.3)
        output = (tmp_path / "serve.log").read_text(errors="replace")
        assert process.poll() is None, output[-3000:]
        page = requests.get(f"{url}/ui", timeout=10)
        assert page.status_code == 200 and "<!-- the installed copy -->" in page.text
        script = requests.get(f"{url}/ui/assets/app.js", timeout=10)
        assert script.status_code == 200 and script.content == (ROOT / "serving" / "ui" / "app.js").read_bytes()
        assert requests.get(f"{url}/info", timeout=10).json()["backend"] == "onnx"
        assert f"the web page (drop images on it): {url}/ui" in output
    finally:
        stop_process_group(process.pid, leader=process)


# ---------------------------------------------------------------- the notebook examples of docs/

def notebook_examples():
    """(page, code) of every ```python block in docs/ that imports from cifar100."""
    return [(page.name, code) for page in sorted((ROOT / "docs").glob("*.md"))
            for code in re.findall(r"```python\n(.*?)```", page.read_text(), re.S) if "from cifar100 import" in code]


# What each page's example leaves behind, relative to the folder it ran in.
LEFT_BEHIND = {"training.md": ["demo-runs/part1/best.pt", "demo-runs/part1/metrics.json"],
               "export.md": ["demo-artifacts/part1.onnx", "demo-artifacts/part1.fp16.onnx",
                             "bentoml/models/cifar100-classifier/*/model.onnx"],
               "scoring.md": ["demo.csv"]}


def test_every_function_has_its_example():
    assert sorted(page for page, _ in notebook_examples()) == sorted(LEFT_BEHIND)


@pytest.mark.parametrize("page,code", notebook_examples(), ids=lambda x: x if x.endswith(".md") else "")
def test_notebook_example_runs_as_written(page, code, tmp_path):
    env = {**CLEAN_ENV, "PYTHONPATH": str(ROOT), "BENTOML_HOME": str(tmp_path / "bentoml"),
           "BENTOML_DO_NOT_TRACK": "True", "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for pattern in LEFT_BEHIND[page]:
        assert list(tmp_path.glob(pattern)), f"{page}: the example left no {pattern}"
    assert done.stdout.strip(), f"{page}: the example printed nothing"
