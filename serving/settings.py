"""The service's settings: environment variables CIFAR100_*, read once per process into one checked object.

    from serving import settings
    settings.get().max_batch_size

docs/serving.md has them all, with their defaults (tests/test_settings.py holds the table and this class to each
other). A value that does not fit stops start-up with one line naming the variable, the value and what is accepted
(SettingsError; `bentoml serve` prints it as its first line: serving/service.py). A CIFAR100_* variable that is
not a setting is ignored with a warning naming the closest setting, except the names under NOT_SETTINGS, which
belong to others.
"""
import difflib
import functools
import os
import types
import typing

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from serving import access
from training.contract import MODEL_NAME

PREFIX = "CIFAR100_"
# Variables under the prefix that are not the service's: the bench scripts' own (CIFAR100_BENCH_OUT, ...), and those
# Kubernetes gives a pod for every Service in its namespace (CIFAR100_SERVE_PORT, ... for the Service cifar100-serve).
NOT_SETTINGS = ("CIFAR100_BENCH_", "CIFAR100_SERVE_")
TRAFFIC_TIMEOUT_S = 300   # BentoML's traffic timeout of both services (serving/service.py)

Number = typing.Annotated[float, Field(gt=0, allow_inf_nan=False)]


class SettingsError(ValueError):
    """A setting that does not fit: one line naming the variable, its value and what is accepted."""


class Settings(BaseSettings):
    """Each field is the variable CIFAR100_<FIELD> (case-insensitive, as BentoML's own variables)."""
    model_config = SettingsConfigDict(env_prefix=PREFIX)

    model: str = f"{MODEL_NAME}:latest"   # a model store entry; a bare name means its latest version
    backend: typing.Literal["auto", "torch", "onnx", "tensorrt"] = "auto"   # serving.backends.KINDS
    torch_compile: bool = True
    # The ONNX backend's file. None: on a GPU fp16 when exported; on the CPU int8 when exported, checked and faster
    # at export (serving/backends.py), else fp32.
    onnx_precision: typing.Literal["fp32", "fp16", "int8"] | None = None
    max_batch_size: int = Field(1024, ge=1)
    max_latency_ms: int = Field(30_000, ge=1, le=1000 * TRAFFIC_TIMEOUT_S)   # longer: the traffic timeout's 504 first
    max_images: int = Field(4096, ge=1)
    max_body_mb: Number = 64
    max_inflight_mb: Number = 256
    max_pixels: int = Field(40_000_000, ge=1)
    max_decoded_mb: Number = 1024
    header_timeout_s: Number = 5
    body_timeout_s: Number = 10
    max_header_kb: Number = 64
    workers: int = Field(1, ge=1)
    processes: int = Field(2, ge=1, le=2)
    model_workers: int | None = Field(None, ge=1)   # None: one per visible GPU (serving/devices.py)
    cpu_threads: int | None = Field(None, ge=1)     # None: a model worker's share of the cores (serving/devices.py)
    api_token: SecretStr | None = None   # after validation: the token, also when read from api_token_file
    api_token_file: str | None = None
    synthetic: bool = False   # serving.up: train on generated data

    @model_validator(mode="after")
    def fit_together(self):
        if ":" not in self.model:
            self.model += ":latest"
        if self.max_inflight_mb < self.max_body_mb:
            raise ValueError(f"CIFAR100_MAX_INFLIGHT_MB={self.max_inflight_mb:g} must be at least CIFAR100_MAX_BODY_MB="
                             f"{self.max_body_mb:g}: the largest request allowed would never fit")
        if self.processes == 1 and (self.model_workers or 1) > 1:
            raise ValueError(f"CIFAR100_MODEL_WORKERS={self.model_workers} needs CIFAR100_PROCESSES=2: with one "
                             "process the front runs the model itself (CIFAR100_WORKERS sets how many fronts)")
        try:   # the clients read the token the same way (serving/access.py)
            token = access.token_from(self.token, self.api_token_file)
        except access.AccessError as e:
            raise ValueError(str(e)) from None
        self.api_token = None if token is None else SecretStr(token)
        return self

    @property
    def token(self):
        """The API token (from CIFAR100_API_TOKEN or the file CIFAR100_API_TOKEN_FILE names), or None: open."""
        return None if self.api_token is None else self.api_token.get_secret_value()

    @property
    def max_body_bytes(self):
        return int(self.max_body_mb * 2**20)

    @property
    def max_inflight_bytes(self):
        return int(self.max_inflight_mb * 2**20)

    @property
    def max_decoded_bytes(self):
        return int(self.max_decoded_mb * 2**20)

    @property
    def max_header_bytes(self):
        return int(self.max_header_kb * 2**10)


def variable(field):
    return PREFIX + field.upper()


def accepted(field):
    """What FIELD's variable accepts, in words: "a whole number from 1 to 2", "one of auto, torch, ..."."""
    info = Settings.model_fields[field]
    kind = info.annotation
    if typing.get_origin(kind) in (typing.Union, types.UnionType):   # X | None
        kind = next(t for t in typing.get_args(kind) if t is not type(None))
    if typing.get_origin(kind) is typing.Literal:
        words = "one of " + ", ".join(map(str, typing.get_args(kind)))
    else:
        words = {int: "a whole number", float: "a number",
                 bool: "1 or 0 (true/false, yes/no, on/off)"}.get(kind, "text")
    bounds = {k: getattr(m, k) for m in info.metadata for k in ("ge", "gt", "le") if getattr(m, k, None) is not None}
    if "ge" in bounds and "le" in bounds:
        words += f" from {bounds['ge']} to {bounds['le']}"
    elif "ge" in bounds:
        words += f" of at least {bounds['ge']}"
    elif "gt" in bounds:
        words += f" above {bounds['gt']:g}"
    return words + (" (or unset)" if info.default is None else "")


def one_line(error):
    """A ValidationError of Settings as one line: each variable with its value and what it accepts."""
    problems = []
    for e in error.errors():
        if not e["loc"]:   # the settings together (fit_together)
            problems.append(str(e["ctx"]["error"]))
        else:
            field = str(e["loc"][0])
            problems.append(f"{variable(field)}={e['input']!r} is not accepted: expected {accepted(field)}")
    return "; ".join(problems)


@functools.cache
def get():
    """This process's settings, read from the environment on the first call. SettingsError when one does not fit."""
    try:
        return Settings()
    except ValidationError as e:
        raise SettingsError(one_line(e)) from None


def unknown(environ=os.environ):
    """A warning for each CIFAR100_* variable in ENVIRON that is not a setting (nor one of NOT_SETTINGS)."""
    known = [f.upper() for f in Settings.model_fields]
    warnings = []
    for name in sorted(environ):
        upper = name.upper()
        if upper.startswith(PREFIX) and upper[len(PREFIX):] not in known and not upper.startswith(NOT_SETTINGS):
            close = difflib.get_close_matches(upper[len(PREFIX):], known, n=1)   # the prefix would make all look close
            hint = f"did you mean {PREFIX}{close[0]}?" if close else "the settings are listed in docs/serving.md"
            warnings.append(f"{name} is not a setting of the service and is ignored: {hint}")
    return warnings
