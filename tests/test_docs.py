"""The README and docs/ cannot rot silently: every command in their shell blocks names a module, option, file or
make target that exists, and every relative link points at a file that exists."""
import contextlib
import io
import re
import runpy
import shlex
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXTERNAL = {"curl", "docker", "bentoml", "cd", "kubectl", "pip", "git", "export"}   # tools of their own


def shell_lines(page):
    """Command lines of the page's ```bash blocks (comments and continuations dealt with)."""
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", page.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError as e:
                raise AssertionError(f"{page.name}: cannot parse {line!r}: {e}") from None
            command = []
            for token in tokens + [";"]:
                if token in ("&&", ";", "||", "|") or token.endswith(";"):
                    if token.endswith(";") and token != ";":
                        command.append(token[:-1])
                    if command:
                        yield line, command
                    command = []
                else:
                    command.append(token)


def commands():
    return [(page, line, command) for page in PAGES for line, command in shell_lines(page)]


_helps = {}


def help_text(target, argv):
    """What `python -m TARGET ARGV --help` (or `python TARGET.py ...`) prints, run in this process."""
    key = (target, tuple(argv))
    if key not in _helps:
        out, saved = io.StringIO(), sys.argv
        sys.argv = [target, *argv, "--help"]
        try:
            with contextlib.redirect_stdout(out), pytest.raises(SystemExit), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)   # runpy: the module was imported before
                if target.endswith(".py"):
                    runpy.run_path(str(ROOT / target), run_name="__main__")
                else:
                    runpy.run_module(target, run_name="__main__", alter_sys=True)
        finally:
            sys.argv = saved
        _helps[key] = out.getvalue()
    return _helps[key]


def named(option, text):
    """OPTION appears in TEXT as a whole option (--run-tim is not --run-time)."""
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def check_python(args, where):
    """`python -m MOD [SUBCOMMAND] --opt ...` or `python FILE.py --opt ...`: the module and every option exist."""
    if args[0] == "-c":
        return
    if args[0] == "-m":
        module, rest = args[1], args[2:]
        spec = __import__("importlib.util").util.find_spec(module)
        assert spec is not None, f"{where}: no module {module}"
        if module in ("pytest", "pip", "venv", "torch.distributed.run"):
            return
    else:
        module, rest = args[0], args[1:]
        assert (ROOT / module).is_file(), f"{where}: no file {module}"
    # A subcommand (`python -m export all ...`) is listed, indented, under the module's positional arguments.
    sub = rest[:1] if rest and re.search(rf"^ {{4}}{re.escape(rest[0])} ", help_text(module, []), re.M) else []
    text = help_text(module, sub)
    for option in (t.split("=")[0] for t in rest if t.startswith("--")):
        assert option == "--help" or named(option, text), f"{where}: {module} {' '.join(sub)} has no option {option}"


@pytest.mark.parametrize("page,line,command", commands(), ids=lambda x: x if isinstance(x, str) else None)
def test_every_command_names_what_exists(page, line, command):
    where = f"{page.relative_to(ROOT)}: {line.strip()}"
    while command and "=" in command[0] and not command[0].startswith("-"):   # VAR=value prefixes
        command = command[1:]
    tool, args = command[0], command[1:]
    if tool in EXTERNAL or tool.startswith("$"):
        return
    if tool in ("python", "python3"):
        check_python(args, where)
    elif tool == "torchrun":
        check_python(args[args.index("-m"):], where)
    elif tool == "cifar100":   # `cifar100 COMMAND ...` is `python -m MODULE ...`
        from cifar100 import COMMANDS
        assert args and args[0] in COMMANDS, f"{where}: cifar100 has no command {args[:1]}"
        check_python(["-m", COMMANDS[args[0]][0].removesuffix(".__main__"), *args[1:]], where)
    elif tool == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
        for target in (a for a in args if "=" not in a):
            assert target in targets, f"{where}: no make target {target}"
    elif tool == "bash":
        assert (ROOT / args[0]).is_file(), f"{where}: no script {args[0]}"
    elif tool == "locust":
        assert (ROOT / args[args.index("-f") + 1]).is_file(), f"{where}: no locustfile"
    elif "/" in tool:   # a script run by its path
        script = ROOT / tool
        assert script.is_file(), f"{where}: no script {tool}"
        for option in (a for a in args if a.startswith("--")):
            assert named(option, script.read_text()), f"{where}: {tool} has no option {option}"
    else:
        raise AssertionError(f"{where}: unknown command {tool!r}: add it to EXTERNAL if it is not ours")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_point_at_files(page):
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
        assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_readme_stays_short_and_keeps_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "make serve" in text and "make test" in text
