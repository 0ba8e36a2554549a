"""Every workaround for BentoML in one place, applied only on the version it was written and measured for.

On any other BentoML version `apply()` changes nothing and logs one warning naming both versions, and
tests/test_bentoml_fixes.py fails, so that an upgrade is a conscious step: check each one below against the new
version (docs/bentoml-workarounds.md gives the symptom, the measurement, the upstream issue and when it can go).

1. Memory: TimeoutMiddleware's per-request timer kept the request's state alive for the traffic timeout; and a
   request whose handling failed before its response started went unanswered until that timeout.
2. Time: the media type of every response was worked out from a JSON schema built anew each time.
3. Time: Starlette spooled uploads over 1 MB to disk, one thread hop per 64 KB, before BentoML read them back.
4. Errors: a pooled connection to a dependency could close under a call (`call_dependency` retries once).
5. Documentation: the OpenAPI document gets the error answers and their schema (`document_errors`), and other
   request bodies an API takes (`document_raw_body`).
6. Time: OpenTelemetry's ASGI middleware opened a span of its own for every message a request received or sent
   (a 3 MB body: ~50); each request keeps its one server span, and while tracing samples nothing, only its ids.
"""
import asyncio
import contextvars
import logging

import aiohttp
import bentoml

log = logging.getLogger("bentoml.service")
TESTED_VERSION = "1.4.40"
applied = False
_error_answers = {}   # route -> {status: description}; `document_errors` fills it
_raw_bodies = {}      # route -> (content type, description); `document_raw_body` fills it


def apply(max_body_bytes):
    """Install the workarounds (before BentoML builds the apps); False, with one warning, on another version."""
    global applied
    if bentoml.__version__ != TESTED_VERSION:
        log.warning("serving/bentoml_fixes.py was written for BentoML %s, this is %s: its workarounds are not applied "
                    "(see docs/bentoml-workarounds.md before upgrading)", TESTED_VERSION, bentoml.__version__)
        return False
    from _bentoml_sdk import io_models
    from _bentoml_sdk.service import openapi
    from bentoml._internal.server.http import traffic
    from starlette.formparsers import MultiPartParser

    if traffic.TimeoutMiddleware.__module__ != __name__:   # looked up when an app is built
        traffic.TimeoutMiddleware = timeout_middleware(traffic.TimeoutMiddleware)
    if not hasattr(io_models.IOMixin.mime_type, "uncached"):
        io_models.IOMixin.mime_type = cached(io_models.IOMixin.mime_type.__func__)
    MultiPartParser.spool_max_size = max_body_bytes   # bodies are capped at this size anyway
    if not hasattr(openapi.generate_spec, "documents_errors"):
        openapi.generate_spec = with_error_answers(openapi.generate_spec)
    import opentelemetry.instrumentation.asgi as otel_asgi   # BentoML imports the middleware when it builds an app
    if not getattr(otel_asgi.OpenTelemetryMiddleware, "one_span_per_request", False):
        otel_asgi.OpenTelemetryMiddleware = one_span_per_request(otel_asgi.OpenTelemetryMiddleware)
    applied = True
    return True


# 1 ------------------------------------------------------------------------------------------------------------

def timeout_middleware(base):
    class TimeoutMiddleware(base):
        """504 when the app has not started its response within `timeout` seconds; nothing outlives the request:
        the timer runs in an empty context (an asyncio timer keeps a copy of the context it was made in) and is
        cancelled once the response has started. An app that fails before it starts a response fails now (and
        Starlette answers 500), not after the timeout with no answer at all, as BentoML's does."""

        async def __call__(self, scope, receive, send):
            if scope["type"] not in ("http", "websocket"):
                return await self.app(scope, receive, send)
            from starlette.responses import JSONResponse

            loop = asyncio.get_running_loop()
            started = loop.create_future()
            timer = loop.call_later(self.timeout, self._set_timer_out, started, context=contextvars.Context())

            async def send_and_mark(message):
                if not started.done():
                    started.set_result(None)
                await send(message)

            app = asyncio.ensure_future(self.app(scope, receive, send_and_mark))
            app.add_done_callback(lambda _: started.done() or started.set_result(None))
            try:
                await started
            except asyncio.TimeoutError:
                if app.cancel():
                    response = JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds"},
                                            status_code=504)
                    await response(scope, receive, send)
            else:
                await app
            finally:
                timer.cancel()
    return TimeoutMiddleware


# 2 ------------------------------------------------------------------------------------------------------------

def cached(mime_type):
    """IOMixin.mime_type, computed once per (class, media_type) instead of once per response."""
    known = {}

    def cached_mime_type(cls):
        key = (cls, cls.media_type)
        if key not in known:
            known[key] = mime_type(cls)
        return known[key]
    cached_mime_type.uncached = mime_type
    return classmethod(cached_mime_type)


# 4 ------------------------------------------------------------------------------------------------------------

async def call_dependency(call, *args):
    """await call(*args), once more on a fresh connection when the pooled one closed under it: BentoML's client
    keeps idle connections to a dependency for 15 s, the dependency's server closes them after 5 s (bentoml#4971).
    Only for idempotent calls."""
    try:
        return await call(*args)
    except (aiohttp.ClientConnectionError, RuntimeError) as e:
        if not applied or isinstance(e, RuntimeError) and "Connection closed" not in str(e):
            raise
        log.warning("connection to a dependency dropped (%s); retrying once", type(e).__name__)
        return await call(*args)


# 5 ------------------------------------------------------------------------------------------------------------

def document_errors(route, answers):
    """Add {status: description} answers, with the body {"error": "..."}, to ROUTE's entry in the OpenAPI document
    (BentoML documents only its own 400, 404 and 500)."""
    _error_answers[route] = answers


def document_raw_body(route, content_type, description):
    """Document that ROUTE also takes a whole body of CONTENT_TYPE (bytes) beside BentoML's multipart form."""
    _raw_bodies[route] = (content_type, description)


def with_error_answers(generate_spec):
    def generate(svc, **kwargs):
        from bentoml._internal.service.openapi.specification import MediaType, Reference, Response, Schema

        spec = generate_spec(svc, **kwargs)
        for route, answers in _error_answers.items():
            item = spec.paths.get(route)
            operation = item and (item.post or item.get)
            if not operation:
                continue
            for status, description in answers.items():
                operation["responses"][status] = Response(description=description, content={
                    "application/json": MediaType(schema=Reference("#/components/schemas/Error"))})
        for route, (content_type, description) in _raw_bodies.items():
            item = spec.paths.get(route)
            if item and item.post and "requestBody" in item.post:
                item.post["requestBody"]["content"][content_type] = {
                    "schema": {"type": "string", "format": "binary", "description": description}}
        if _error_answers:
            spec.components.setdefault("schemas", {})["Error"] = Schema(
                type="object", title="Error", required=["error"],
                properties={"error": Schema(type="string", description="what was wrong, in words")})
        return spec
    generate.documents_errors = True
    return generate


# 6 ------------------------------------------------------------------------------------------------------------

def one_span_per_request(base):
    from opentelemetry import context, propagate, trace
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class IdsOnly(trace.NonRecordingSpan):
        """A span that records nothing and carries fresh ids; `context` is what BentoML's request hook reads."""
        ids = RandomIdGenerator()

        def __init__(self):
            super().__init__(trace.SpanContext(self.ids.generate_trace_id(), self.ids.generate_span_id(), False))

        context = property(trace.NonRecordingSpan.get_span_context)

    class OpenTelemetryMiddleware(base):
        """The request's server span without a child span per received or sent message. While no span can be
        sampled (BentoML's tracing.sample_rate is 0 and the request carries no trace context), not even that one:
        the request gets the ids BentoML's access log and its X-BentoML-Request-ID header read, and nothing else."""
        one_span_per_request = True

        def __init__(self, app, **options):
            options.setdefault("exclude_spans", ["receive", "send"])
            super().__init__(app, **options)
            sampler = getattr(options.get("tracer_provider"), "sampler", None)
            # trace id 0 is the one a ratio sampler takes first: if even it is not sampled, no root span is
            self.may_sample = sampler is None or \
                sampler.should_sample(context.Context(), 0, "probe").decision.is_sampled()
            self.trace_headers = {name.encode() for name in propagate.get_global_textmap().fields}

        async def __call__(self, scope, receive, send):
            if self.may_sample or scope["type"] != "http" or any(k in self.trace_headers for k, _ in scope["headers"]):
                return await super().__call__(scope, receive, send)
            span = IdsOnly()
            with trace.use_span(span, end_on_exit=False):
                if self.server_request_hook:
                    self.server_request_hook(span, scope)
                await self.app(scope, receive, send)
    return OpenTelemetryMiddleware
