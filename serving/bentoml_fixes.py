"""Two fixes for BentoML 1.4.40 (pinned), applied by serving/service.py before BentoML builds its ASGI apps.

1. Memory. BentoML's TimeoutMiddleware (bentoml/_internal/server/http/traffic.py) starts a timer for every
request with `loop.call_later(traffic timeout, ...)` and never cancels it. An asyncio timer keeps a copy of the
request's contextvars, and with them the request's headers, response context, tracing spans and
background tasks, until it fires: about 15 KB × requests/s × the timeout (300 s here) of memory. Measured
with bench/soak.py: +130 MB over the first 5 minutes at 20 requests/s, then flat once the first timers
fired. This version gives its timer an empty context and cancels it when the request is answered.

2. Time. For every response BentoML derives the media type of an output such as np.ndarray from its
JSON schema, which pydantic builds anew each time: 9% of the Model process's busy time on one-image
/classify calls, about half of what the model itself took. A class's schema does not change: cached.
"""
import asyncio
import contextvars

from _bentoml_sdk import io_models
from bentoml._internal.server.http import traffic
from starlette.responses import JSONResponse


class TimeoutMiddleware(traffic.TimeoutMiddleware):
    """504 when the app has not started its response within `timeout` seconds; nothing outlives the request."""

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        started = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, started, context=contextvars.Context())

        async def send_and_mark(message):
            if not started.done():
                started.set_result(None)
            await send(message)

        app = asyncio.ensure_future(self.app(scope, receive, send_and_mark))
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


def apply():
    """Install both (BentoML looks the middleware class up when it builds an app)."""
    traffic.TimeoutMiddleware = TimeoutMiddleware
    if not hasattr(io_models.IOMixin.mime_type, "uncached"):
        io_models.IOMixin.mime_type = cached(io_models.IOMixin.mime_type.__func__)
