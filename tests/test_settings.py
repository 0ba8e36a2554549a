"""serving/settings.py: one object for every CIFAR100_* setting, the table of docs/serving.md, the one-line refusal of
a value that does not fit (also as `bentoml serve` prints it) and the warning for a name that is not a setting."""
import os
import re
import typing
from pathlib import Path

import pytest
import requests

from serving import backends, settings
from serving.local_server import LocalServer
from serving.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def environ(monkeypatch):
    """Settings read afresh from the environment the test sets (no CIFAR100_* variable but those)."""
    for name in list(os.environ):
        if name.upper().startswith(settings.PREFIX):
            monkeypatch.delenv(name)
    settings.get.cache_clear()
    yield monkeypatch
    settings.get.cache_clear()


def documented():
    """{variable: default cell} of the settings table in docs/serving.md."""
    section = (ROOT / "docs" / "serving.md").read_text().split("## Settings", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `(CIFAR100_\w+)` \| ([^|]+?) \|", section, re.M))


def test_the_documented_settings_are_the_objects_with_their_defaults(environ):
    table = documented()
    assert set(table) == {settings.variable(f) for f in Settings.model_fields}, "every setting documented, no other"
    for field, info in Settings.model_fields.items():
        cell = table[settings.variable(field)]
        if info.default is None:   # computed at start-up: said in words
            assert not re.fullmatch(r"`[^`]*`", cell), f"{field}: {cell}"
        else:   # a literal: the default itself
            literal = re.fullmatch(r"`([^`]*)`", cell)
            assert literal, f"{settings.variable(field)}: the default {info.default!r} as `...`, not {cell!r}"
            assert getattr(Settings(**{field: literal[1]}), field) == info.default, field


def test_the_backends_are_serving_backends_kinds():
    assert typing.get_args(Settings.model_fields["backend"].annotation) == backends.KINDS


def test_settings_are_read_once_from_the_environment(environ):
    environ.setenv("CIFAR100_MAX_BATCH_SIZE", "8")
    environ.setenv("cifar100_backend", "onnx")   # as BentoML's own variables: any case
    environ.setenv("CIFAR100_MODEL", "other")
    environ.setenv("CIFAR100_TORCH_COMPILE", "0")
    got = settings.get()
    assert (got.max_batch_size, got.backend, got.model, got.torch_compile) == (8, "onnx", "other:latest", False)
    assert got.max_body_bytes == 64 * 2**20 and got.max_header_bytes == 64 * 2**10 and got.token is None
    environ.setenv("CIFAR100_MAX_BATCH_SIZE", "16")
    assert settings.get() is got and got.max_batch_size == 8   # once per process


@pytest.mark.parametrize("env, line", [
    ({"CIFAR100_MAX_BATCH_SIZE": "abc"},
     "CIFAR100_MAX_BATCH_SIZE='abc' is not accepted: expected a whole number of at least 1"),
    ({"CIFAR100_BACKEND": "onxx"},
     "CIFAR100_BACKEND='onxx' is not accepted: expected one of auto, torch, onnx, tensorrt"),
    ({"CIFAR100_ONNX_PRECISION": "int4"},
     "CIFAR100_ONNX_PRECISION='int4' is not accepted: expected one of fp32, fp16, int8 (or unset)"),
    ({"CIFAR100_PROCESSES": "3"}, "CIFAR100_PROCESSES='3' is not accepted: expected a whole number from 1 to 2"),
    ({"CIFAR100_MAX_BODY_MB": "inf"}, "CIFAR100_MAX_BODY_MB='inf' is not accepted: expected a number above 0"),
    ({"CIFAR100_TORCH_COMPILE": "maybe"},
     "CIFAR100_TORCH_COMPILE='maybe' is not accepted: expected 1 or 0 (true/false, yes/no, on/off)"),
    ({"CIFAR100_MODEL_WORKERS": "0"},
     "CIFAR100_MODEL_WORKERS='0' is not accepted: expected a whole number of at least 1 (or unset)"),
    ({"CIFAR100_MAX_LATENCY_MS": "600000"},   # past the traffic timeout: the client would get a 504 first
     "CIFAR100_MAX_LATENCY_MS='600000' is not accepted: expected a whole number from 1 to 300000"),
    # the settings together
    ({"CIFAR100_MAX_BODY_MB": "300"}, "CIFAR100_MAX_INFLIGHT_MB=256 must be at least CIFAR100_MAX_BODY_MB=300: the "
                                      "largest request allowed would never fit"),
    ({"CIFAR100_PROCESSES": "1", "CIFAR100_MODEL_WORKERS": "2"},
     "CIFAR100_MODEL_WORKERS=2 needs CIFAR100_PROCESSES=2: with one process the front runs the model itself "
     "(CIFAR100_WORKERS sets how many fronts)"),
    # the token, as serving/access.py words it for the clients too
    ({"CIFAR100_API_TOKEN": " "}, "the API token is empty: set a non-empty token or unset the variable"),
    ({"CIFAR100_API_TOKEN": "a", "CIFAR100_API_TOKEN_FILE": "/x"},
     "set CIFAR100_API_TOKEN or CIFAR100_API_TOKEN_FILE, not both"),
    ({"CIFAR100_API_TOKEN_FILE": "/nonexistent/token"},
     "CIFAR100_API_TOKEN_FILE=/nonexistent/token: cannot read it (No such file or directory)"),
    # several at once: one line still
    ({"CIFAR100_WORKERS": "two", "CIFAR100_MAX_PIXELS": "-1"},
     "CIFAR100_MAX_PIXELS='-1' is not accepted: expected a whole number of at least 1; "
     "CIFAR100_WORKERS='two' is not accepted: expected a whole number of at least 1"),
])
def test_a_value_that_does_not_fit_is_one_line_naming_it(environ, env, line):
    for name, value in env.items():
        environ.setenv(name, value)
    with pytest.raises(settings.SettingsError) as e:
        settings.get()
    assert str(e.value) == line


def test_the_token_comes_from_its_file_and_stays_out_of_the_description(environ, tmp_path):
    (tmp_path / "token").write_text("s3cret\n")
    environ.setenv("CIFAR100_API_TOKEN_FILE", str(tmp_path / "token"))
    got = settings.get()
    assert got.token == "s3cret" and "s3cret" not in repr(got)


def test_a_name_that_is_not_a_setting_gets_a_warning_naming_the_closest(environ):
    assert settings.unknown({"CIFAR100_MAX_BACTH_SIZE": "8", "CIFAR100_BACKEND": "onnx", "CIFAR100_THREADS": "2",
                             "CIFAR100_FOO": "1", "PATH": "/bin"}) == [
        "CIFAR100_FOO is not a setting of the service and is ignored: the settings are listed in docs/serving.md",
        "CIFAR100_MAX_BACTH_SIZE is not a setting of the service and is ignored: did you mean CIFAR100_MAX_BATCH_SIZE?",
        "CIFAR100_THREADS is not a setting of the service and is ignored: did you mean CIFAR100_CPU_THREADS?"]
    # Others' variables: the bench scripts', Kubernetes' links to the Service cifar100-serve.
    assert settings.unknown({"CIFAR100_BENCH_OUT": "x", "CIFAR100_SERVE_PORT": "tcp://10.0.0.1:3000"}) == []


# ---- as `bentoml serve` starts ----------------------------------------------------------------------------------

def test_bentoml_serve_stops_at_a_bad_value_with_one_line(model_store, tmp_path):
    with pytest.raises(RuntimeError, match=r"bentoml serve exited \(1\)"):
        LocalServer(model_store, {"CIFAR100_BACKEND": "onnx", "CIFAR100_MAX_BATCH_SIZE": "1k"}, run_dir=tmp_path,
                    ready_timeout=60)
    assert (tmp_path / "serve.log").read_text() == ("error: CIFAR100_MAX_BATCH_SIZE='1k' is not accepted: expected a "
                                                    "whole number of at least 1\n")


def test_bentoml_serve_warns_once_about_a_name_that_is_not_a_setting(start_server):
    url = start_server({"CIFAR100_BACKEND": "onnx", "CIFAR100_MAX_BACTH_SIZE": 8, "CIFAR100_MAX_LATENCY_MS": 5000,
                        "CIFAR100_BENCH_OUT": "build/x"})
    warnings = [line for line in start_server.log(url).splitlines() if "is not a setting" in line]
    assert len(warnings) == 1 and "[WARNING]" in warnings[0], warnings   # by the server, not again by each worker
    assert warnings[0].endswith("CIFAR100_MAX_BACTH_SIZE is not a setting of the service and is ignored: did you mean "
                                "CIFAR100_MAX_BATCH_SIZE?")
    batching = requests.get(f"{url}/info", timeout=10).json()["batching"]   # what the model worker read
    assert (batching["max_batch_size"], batching["max_latency_ms"]) == (1024, 5000)
