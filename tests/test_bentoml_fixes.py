"""serving/bentoml_fixes.py: applied only on the BentoML version it was written for; the per-request timeout must
not keep a finished request's state alive; response media types are not worked out anew for every response; a
call whose pooled connection closed is retried once; a request is traced with one span, not one per message, and
with none while tracing samples nothing, yet keeps its ids; a client's errors are answered as {"error": ...} without a
traceback, a real error still goes to BentoML. (The bounded request head is tested on a real server:
tests/test_hostile.py.)"""
import asyncio
import contextvars
import gc
import json
import logging
import time
import weakref

import aiohttp
import bentoml
import numpy as np
import pydantic
import pytest
import uvicorn.config
from _bentoml_impl.server.app import ServiceAppFactory
from _bentoml_sdk import io_models
from _bentoml_sdk.io_models import IODescriptor
import opentelemetry.instrumentation.asgi as otel_asgi
from bentoml._internal.context import trace_context
from bentoml._internal.server.http import traffic
from bentoml._internal.utils.telemetry import ParentBasedTraceIdRatio
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartParser
from starlette.requests import ClientDisconnect, Request
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving import bentoml_fixes
from serving.images import InputError

REQUEST = contextvars.ContextVar("request")   # as BentoML keeps a request's context: in contextvars


def bentoml_middleware():
    """BentoML's own TimeoutMiddleware, even after apply() replaced it."""
    cls = traffic.TimeoutMiddleware
    while cls.__module__ == bentoml_fixes.__name__:
        cls = cls.__bases__[0]
    return cls


OURS = bentoml_fixes.timeout_middleware(bentoml_middleware())
OTEL_MIDDLEWARE = otel_asgi.OpenTelemetryMiddleware
while getattr(OTEL_MIDDLEWARE, "one_span_per_request", False):   # OpenTelemetry's own, even after apply()
    OTEL_MIDDLEWARE = OTEL_MIDDLEWARE.__bases__[0]
API_ENDPOINT = ServiceAppFactory.api_endpoint
while getattr(API_ENDPOINT, "answers_client_errors", False):   # BentoML's own, even after apply()
    API_ENDPOINT = API_ENDPOINT.__wrapped__
LIMITS = dict(max_files=4096, header_timeout_s=5, max_header_bytes=64 << 10)


@pytest.fixture
def unpatched(monkeypatch):
    """Everything apply() changes, as BentoML, Starlette and uvicorn have it, and restored after the test."""
    monkeypatch.setattr(traffic, "TimeoutMiddleware", bentoml_middleware())
    monkeypatch.setattr(MultiPartParser, "spool_max_size", 1024 * 1024)
    monkeypatch.setattr(otel_asgi, "OpenTelemetryMiddleware", OTEL_MIDDLEWARE)
    monkeypatch.setattr(ServiceAppFactory, "api_endpoint", API_ENDPOINT)
    monkeypatch.setitem(Request.form.__kwdefaults__, "max_files", 1000)
    monkeypatch.setattr(logging.getLogger("uvicorn.error"), "propagate", True)
    for name in ("auto", "httptools"):
        monkeypatch.setitem(uvicorn.config.HTTP_PROTOCOLS, name, "uvicorn.protocols.http.auto:AutoHTTPProtocol")
    monkeypatch.setattr(bentoml_fixes, "applied", False)


def test_the_installed_bentoml_is_the_version_the_fixes_were_written_for():
    # Fails after an upgrade: check each workaround (docs/bentoml-workarounds.md), then raise TESTED_VERSION.
    assert bentoml.__version__ == bentoml_fixes.TESTED_VERSION


def test_on_another_version_nothing_is_applied_and_one_warning_says_so(monkeypatch, caplog, unpatched):
    monkeypatch.setattr(bentoml, "__version__", "1.9.0")
    with caplog.at_level(logging.WARNING, logger="bentoml.service"):
        assert bentoml_fixes.apply(64 * 2**20, **LIMITS) is False
    assert traffic.TimeoutMiddleware is bentoml_middleware() and MultiPartParser.spool_max_size == 1024 * 1024
    assert ServiceAppFactory.api_endpoint is API_ENDPOINT and Request.form.__kwdefaults__["max_files"] == 1000
    assert uvicorn.config.HTTP_PROTOCOLS["auto"] == "uvicorn.protocols.http.auto:AutoHTTPProtocol"
    (record,) = caplog.records
    assert "written for BentoML 1.4.40, this is 1.9.0" in record.getMessage()


def test_on_the_tested_version_everything_is_applied_once(unpatched):
    assert bentoml_fixes.apply(5 * 2**20, **LIMITS) and bentoml_fixes.apply(5 * 2**20, **LIMITS)
    assert traffic.TimeoutMiddleware.__bases__ == (bentoml_middleware(),)   # wrapped once, not twice
    assert otel_asgi.OpenTelemetryMiddleware.__bases__ == (OTEL_MIDDLEWARE,)
    assert MultiPartParser.spool_max_size == 5 * 2**20 and hasattr(io_models.IOMixin.mime_type, "uncached")
    assert ServiceAppFactory.api_endpoint.__wrapped__ is API_ENDPOINT
    assert Request.form.__kwdefaults__["max_files"] == 4096
    assert not logging.getLogger("uvicorn.error").propagate
    loaded = uvicorn.config.import_from_string(uvicorn.config.HTTP_PROTOCOLS["auto"])   # what uvicorn's Config loads
    assert loaded.__bases__ == (HttpToolsProtocol,) and loaded.bounded_head


def test_on_another_uvicorn_the_head_is_not_bounded_and_one_warning_says_so(monkeypatch, caplog, unpatched):
    monkeypatch.setattr(uvicorn, "__version__", "9.0.0")
    with caplog.at_level(logging.WARNING, logger="bentoml.service"):
        assert bentoml_fixes.apply(5 * 2**20, **LIMITS)
    assert uvicorn.config.HTTP_PROTOCOLS["auto"] == "uvicorn.protocols.http.auto:AutoHTTPProtocol"
    (record,) = caplog.records
    assert "written for uvicorn 0.54.0, this is 9.0.0" in record.getMessage()


class FakeURL:
    path = "/classify"


class FakeRequest:
    url = FakeURL()


def answer_to(error, caplog):
    """What the wrapped api_endpoint answers when BentoML's own raises ERROR, and what it logged."""
    async def endpoint(self, name, request):
        raise error
    with caplog.at_level(logging.INFO):
        response = asyncio.run(bentoml_fixes.client_errors_answered(endpoint)(None, "classify", FakeRequest()))
    return response.status_code, json.loads(response.body), [r for r in caplog.records if r.name.startswith("bentoml")]


@pytest.mark.parametrize("error, status, message", [
    (InputError("images[1]: not an image", 400), 400, "images[1]: not an image"),
    (InputError("images: more than 64 files (CIFAR100_MAX_IMAGES)", 413), 413, "more than 64 files"),
    (HTTPException(400, "Too many fields. Maximum number of fields is 1000."), 400, "multipart form: Too many fields"),
    (bentoml.exceptions.BadInput("Connection blocked due to insecure input URL"), 400, "insecure input URL")])
def test_a_client_error_is_answered_as_json_without_a_log_line(caplog, error, status, message):
    answered, body, logged = answer_to(error, caplog)
    assert answered == status and message in body["error"] and isinstance(body, dict)   # BentoML's: a JSON list
    assert logged == []


def test_a_validation_error_keeps_bentoml_answer_and_a_hang_up_is_one_line(caplog):
    class Input(pydantic.BaseModel):
        images: list[int]
    with pytest.raises(pydantic.ValidationError) as invalid:
        Input.model_validate({})
    status, body, logged = answer_to(invalid.value, caplog)
    assert status == 400 and body["error"] == "1 validation error for Input" and body["detail"][0]["loc"] == ["images"]
    assert logged == []
    status, body, logged = answer_to(ClientDisconnect(), caplog)
    assert status == 400 and len(logged) == 1 and "hung up" in logged[0].getMessage() and not logged[0].exc_info


@pytest.mark.parametrize("error", [ZeroDivisionError("a bug"), bentoml.exceptions.InternalServerError("broken")])
def test_a_real_error_still_goes_to_bentoml_which_logs_its_traceback(error):
    async def endpoint(self, name, request):
        raise error
    with pytest.raises(type(error)):
        asyncio.run(bentoml_fixes.client_errors_answered(endpoint)(None, "classify", FakeRequest()))


class StartedSpans(SpanProcessor):
    """The names of the spans started, recorded or not (an exporter sees only the sampled ones)."""
    def __init__(self):
        self.names = []

    def on_start(self, span, parent_context=None):
        self.names.append(span.name)


def one_traced_request(middleware_class, body_chunks=1, sample_rate=None, headers=()):
    """Run one request through the ASGI tracing middleware: (the spans it started, the spans it exported, the ids the
    app saw: BentoML's request id, trace id, sampled). sample_rate: BentoML's sampler at that rate, else the SDK's
    default (sample everything)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(**({} if sample_rate is None else {"sampler": ParentBasedTraceIdRatio(sample_rate)}))
    started = StartedSpans()
    provider.add_span_processor(started)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    seen = []

    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        seen.append((trace_context.request_id, trace_context.trace_id, trace_context.sampled))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    def request_hook(span, scope):   # as BentoML's
        trace_context.request_id = span.context.span_id

    messages = iter([{"type": "http.request", "body": b"x", "more_body": i < body_chunks - 1}
                     for i in range(body_chunks)])

    async def receive():
        return next(messages)

    async def send(message):
        pass
    scope = {"type": "http", "method": "POST", "path": "/classify", "headers": list(headers), "http_version": "1.1",
             "scheme": "http", "server": ("127.0.0.1", 3000), "query_string": b"", "root_path": ""}
    middleware = middleware_class(app, tracer_provider=provider, server_request_hook=request_hook)
    asyncio.run(middleware(scope, receive, send))
    return started.names, [span.name for span in exporter.get_finished_spans()], seen[0]


def test_a_request_gets_one_span_not_one_per_message():
    assert len(one_traced_request(OTEL_MIDDLEWARE, 48)[1]) == 51   # OpenTelemetry's own: 48 receive, 2 send, 1 server
    assert one_traced_request(bentoml_fixes.one_span_per_request(OTEL_MIDDLEWARE), 48)[1] == ["POST /classify"]


def test_while_tracing_samples_nothing_a_request_gets_its_ids_and_no_span():
    ours = bentoml_fixes.one_span_per_request(OTEL_MIDDLEWARE)
    started, exported, (request_id, trace_id, sampled) = one_traced_request(OTEL_MIDDLEWARE, sample_rate=0)
    assert "POST /classify" in started and exported == [] and request_id and trace_id and sampled == 0   # as it was
    first = one_traced_request(ours, sample_rate=0)
    second = one_traced_request(ours, sample_rate=0)
    assert first[:2] == second[:2] == ([], [])
    (request_id, trace_id, sampled), other = first[2], second[2]
    assert 0 < request_id < 2**64 and 0 < trace_id < 2**128 and sampled == 0
    assert request_id != other[0] and trace_id != other[1]
    # Any sampling at all, or a caller's trace context, and the request is traced as before.
    assert one_traced_request(ours, sample_rate=0.01)[0] == ["POST /classify"]
    caller = "0af7651916cd43dd8448eb211c80319c"
    started, exported, (_, trace_id, sampled) = one_traced_request(
        ours, sample_rate=0, headers=[(b"traceparent", f"00-{caller}-b7ad6b7169203331-01".encode())])
    assert started == exported == ["POST /classify"] and (format(trace_id, "032x"), sampled) == (caller, 1)


class RequestState:
    pass


async def answer(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def one_request(middleware, app, timeout):
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    state = RequestState()
    REQUEST.set(state)
    await middleware(app, timeout=timeout)({"type": "http"}, receive, send)
    return weakref.ref(state), sent


async def request_then_collect(middleware, app=answer, timeout=300):
    """Serve one request in a task of its own, drop it, collect garbage: is its state still referenced?"""
    state, sent = await asyncio.create_task(one_request(middleware, app, timeout))
    await asyncio.sleep(0)   # let the loop drop the finished task's wake-up call
    gc.collect()
    return state() is not None, sent


def test_bentoml_timer_keeps_the_request_alive_ours_does_not():
    # If this first assertion fails, BentoML fixed its middleware and this workaround can go.
    assert asyncio.run(request_then_collect(bentoml_middleware()))[0]
    alive, sent = asyncio.run(request_then_collect(OURS))
    assert not alive
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"ok"


def test_a_slow_app_still_gets_504():
    cancelled = []

    async def slow(scope, receive, send):
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    alive, sent = asyncio.run(request_then_collect(OURS, slow, timeout=0.05))
    assert sent[0]["status"] == 504 and b"0.05 seconds" in sent[1]["body"]
    assert cancelled and not alive


def test_an_app_that_fails_before_answering_fails_at_once_not_after_the_timeout():
    async def broken(scope, receive, send):
        raise ZeroDivisionError("bug")

    start = time.monotonic()
    with pytest.raises(ZeroDivisionError):   # Starlette's error middleware, further out, answers 500
        asyncio.run(request_then_collect(OURS, broken, timeout=30))
    assert time.monotonic() - start < 5


def test_media_types_are_worked_out_once_per_class(monkeypatch, unpatched):
    def predict(self) -> np.ndarray: ...
    spec = IODescriptor.from_output(predict)   # what BentoML makes of Model.predict's return type
    expected = getattr(io_models.IOMixin.mime_type, "uncached", io_models.IOMixin.mime_type.__func__)(spec)
    bentoml_fixes.apply(2**20, **LIMITS)
    assert spec.mime_type() == expected == "application/json"
    calls = []
    monkeypatch.setattr(spec, "model_json_schema", classmethod(lambda cls, *a, **k: calls.append(1) or {}))
    assert spec.mime_type() == expected and calls == []   # from the cache: no schema built per response
    monkeypatch.setattr(spec, "media_type", "text/plain")  # a media type set later still counts
    assert spec.mime_type() == "text/plain"


@pytest.mark.parametrize("applied", [True, False])
def test_a_call_whose_connection_closed_is_retried_once(monkeypatch, applied):
    monkeypatch.setattr(bentoml_fixes, "applied", applied)
    failures = [aiohttp.ServerDisconnectedError(), None, RuntimeError("Connection closed"), None]

    async def call(x):   # each call's first try fails, as BentoML's two symptoms of a closed connection
        if failure := failures.pop(0):
            raise failure
        return x * 2

    async def twice():
        return [await bentoml_fixes.call_dependency(call, 1), await bentoml_fixes.call_dependency(call, 2)]

    if applied:
        assert asyncio.run(twice()) == [2, 4] and not failures
    else:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            asyncio.run(twice())

    async def broken(x):
        raise RuntimeError("something else")
    with pytest.raises(RuntimeError, match="something else"):   # other errors are not retried
        asyncio.run(bentoml_fixes.call_dependency(broken, 1))
