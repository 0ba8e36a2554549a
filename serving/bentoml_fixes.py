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
7. Errors: a client's error in an API's input (a validation error, a form Starlette refuses, a client that hung up,
   a refusal of the front's guard) was logged with a traceback, and some answered 500 or a JSON list; Starlette's
   form parser refused more than 1,000 files (a 500), below the service's own limit; uvicorn's warnings were logged
   twice.
8. Slow and oversized clients: uvicorn, as BentoML runs it, waited for a request's head for ever and took headers of
   any size; the head must now be complete within a deadline (else 408, or a silent close if nothing came) and at
   most so large (else 431); a request it cannot parse gets its 400 as JSON. Also guarded by uvicorn's version
   (TESTED_UVICORN).
"""
import asyncio
import contextvars
import json
import logging

import aiohttp
import bentoml
import uvicorn

log = logging.getLogger("bentoml.service")
TESTED_VERSION = "1.4.40"
TESTED_UVICORN = "0.54.0"
applied = False
_error_answers = {}   # route -> {status: description}; `document_errors` fills it
_raw_bodies = {}      # route -> (content type, description); `document_raw_body` fills it
HTTP_PROTOCOL = None  # uvicorn's HTTP/1.1 protocol with limits on a request's head (8); `apply` makes it


def apply(max_body_bytes, max_files, header_timeout_s, max_header_bytes):
    """Install the workarounds (before BentoML builds the apps and uvicorn its protocol); False, with one warning, on
    another version. MAX_FILES: files per multipart request; HEADER_TIMEOUT_S, MAX_HEADER_BYTES: a request's head."""
    global applied, HTTP_PROTOCOL
    if bentoml.__version__ != TESTED_VERSION:
        log.warning("serving/bentoml_fixes.py was written for BentoML %s, this is %s: its workarounds are not applied "
                    "(see docs/bentoml-workarounds.md before upgrading)", TESTED_VERSION, bentoml.__version__)
        return False
    from _bentoml_impl.server.app import ServiceAppFactory
    from _bentoml_sdk import io_models
    from _bentoml_sdk.service import openapi
    from bentoml._internal.server.http import traffic
    from starlette.formparsers import MultiPartParser
    from starlette.requests import Request
    from uvicorn.config import HTTP_PROTOCOLS

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
    if not hasattr(ServiceAppFactory.api_endpoint, "answers_client_errors"):
        ServiceAppFactory.api_endpoint = client_errors_answered(ServiceAppFactory.api_endpoint)
    Request.form.__kwdefaults__["max_files"] = max_files   # BentoML calls form() with Starlette's defaults
    # BentoML's logging (configured before this module is imported) gives uvicorn.error a handler and lets it pass its
    # records on to the root logger's same handler: every uvicorn warning was written twice.
    logging.getLogger("uvicorn.error").propagate = False
    if uvicorn.__version__ == TESTED_UVICORN:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
        HTTP_PROTOCOL = bounded_head(HttpToolsProtocol, header_timeout_s, max_header_bytes)
        HTTP_PROTOCOLS["auto"] = HTTP_PROTOCOLS["httptools"] = f"{__name__}:HTTP_PROTOCOL"
    else:
        log.warning("serving/bentoml_fixes.py was written for uvicorn %s, this is %s: requests' heads are not bounded "
                    "(see docs/bentoml-workarounds.md #8)", TESTED_UVICORN, uvicorn.__version__)
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


# 7 ------------------------------------------------------------------------------------------------------------

def client_errors_answered(api_endpoint):
    """ServiceAppFactory.api_endpoint answering the errors in a client's input itself, as {"error": ...} (BentoML's
    wrapper logs each with a traceback, answers Starlette's form errors and a dropped client with 500, and a 4xx of its
    own as a JSON list). Its answer to a validation error is kept. Everything else still goes to BentoML: a real 500,
    logged with its traceback."""
    from bentoml.exceptions import BentoMLException
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse

    from serving.images import InputError

    async def endpoint(self, name, request):
        try:
            return await api_endpoint(self, name, request)
        except ValidationError as e:
            return JSONResponse({"error": f"{e.error_count()} validation error for {e.title}",
                                 "detail": e.errors(include_context=False, include_input=False)}, status_code=400)
        except InputError as e:   # the guard's: it answers this request itself (serving/guard.py)
            return JSONResponse({"error": str(e)}, status_code=e.status)
        except HTTPException as e:   # Starlette's form parser: too many fields, a part too large, ...
            return JSONResponse({"error": f"multipart form: {e.detail}"}, status_code=e.status_code)
        except ClientDisconnect:
            log.info("%s: the client hung up before its body was complete", request.url.path)
            return JSONResponse({"error": "the client hung up"}, status_code=400)
        except BentoMLException as e:
            if not 400 <= e.error_code < 500:
                raise
            return JSONResponse({"error": str(e)}, status_code=e.error_code)
    endpoint.answers_client_errors, endpoint.__wrapped__ = True, api_endpoint
    return endpoint


# 8 ------------------------------------------------------------------------------------------------------------

def bounded_head(base, timeout_s, max_bytes):
    """uvicorn's HTTP/1.1 protocol on httptools (BASE), with a bounded request head: from a connection's start, and
    from the first byte of each later request, the request line and headers must arrive within TIMEOUT_S (else 408
    and close; a connection that sent nothing is closed without a word) and take at most MAX_BYTES (else 431 and
    close). uvicorn itself waited for ever (only an idle connection after a response is closed, after 5 s) and took an
    8 MB header. A request httptools cannot parse gets its 400 as {"error": ...} too (uvicorn's was plain text)."""
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE

    class HttpToolsProtocol(base):
        bounded_head = True
        head_timer, head_bytes, refused = None, 0, False

        def connection_made(self, transport):
            super().connection_made(transport)
            self.head_timer = self.loop.call_later(timeout_s, self.head_timed_out)

        def connection_lost(self, exc):
            self.stop_head_timer()
            super().connection_lost(exc)

        def stop_head_timer(self):
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def data_received(self, data):
            if self.refused:
                return
            if self.head_timer is not None and self.head_bytes + len(data) > max_bytes:
                # The head may pass the limit in this chunk: the parser gets up to the limit first (httptools refuses
                # a head of its own accord somewhere past 64 KiB, with a plain 400).
                cut = max(0, max_bytes - self.head_bytes) + 1
                self.head_bytes += cut
                super().data_received(data[:cut])
                if self.head_timer is not None and not self.refused:   # and the head has not ended
                    return self.refuse(431, f"request head over {max_bytes // 1024} KiB (CIFAR100_MAX_HEADER_KB)")
                data = data[cut:]
            elif self.head_timer is not None:
                self.head_bytes += len(data)
            if data and not self.refused:
                super().data_received(data)

        def on_message_begin(self):
            super().on_message_begin()
            if self.head_timer is None:   # a later request on this connection
                self.head_bytes = 0
                self.head_timer = self.loop.call_later(timeout_s, self.head_timed_out)

        def on_headers_complete(self):
            self.stop_head_timer()
            if len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers) > max_bytes:
                return self.refuse(431, f"request head over {max_bytes // 1024} KiB (CIFAR100_MAX_HEADER_KB)")
            super().on_headers_complete()

        def on_body(self, body):
            if not self.refused:
                super().on_body(body)

        def on_message_complete(self):
            if not self.refused:
                super().on_message_complete()

        def head_timed_out(self):
            self.head_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:   # a pipelined head, behind an answer
                self.cycle.keep_alive = False
            elif self.head_bytes == 0 and self.cycle is None:
                self.transport.close()   # a connection that never sent anything
            else:
                self.refuse(408, f"request head not complete within {timeout_s:g} s (CIFAR100_HEADER_TIMEOUT_S)")

        def send_400_response(self, msg):   # httptools could not parse the request (uvicorn has logged it)
            self.refuse(400, msg, quiet=True)

        def refuse(self, status, why, quiet=False):
            """Answer STATUS with {"error": WHY} and close, reading nothing more of this connection."""
            self.refused = True
            self.stop_head_timer()
            if not quiet:
                log.info("refused a request head: %s", why)
            body = json.dumps({"error": why}).encode()
            head = [STATUS_LINE[status]] + [name + b": " + value + b"\r\n"
                                            for name, value in self.server_state.default_headers]
            self.transport.write(b"".join([*head, b"content-type: application/json\r\ncontent-length: ",
                                           str(len(body)).encode(), b"\r\nconnection: close\r\n\r\n", body]))
            self.transport.close()

    return HttpToolsProtocol

