"""serving/bentoml_fixes.py: the per-request timeout must not keep a finished request's state alive, and
response media types are not worked out anew for every response."""
import asyncio
import contextvars
import gc
import weakref

import numpy as np
from _bentoml_sdk import io_models
from _bentoml_sdk.io_models import IODescriptor

from serving import bentoml_fixes
from serving.bentoml_fixes import TimeoutMiddleware

BENTOML_TIMEOUT_MIDDLEWARE = TimeoutMiddleware.__bases__[0]   # BentoML's own, even after apply() replaced it
REQUEST = contextvars.ContextVar("request")   # as BentoML keeps a request's context: in contextvars


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
    # If this first assertion fails, BentoML fixed its middleware and serving/bentoml_fixes.py can go.
    assert asyncio.run(request_then_collect(BENTOML_TIMEOUT_MIDDLEWARE))[0]
    alive, sent = asyncio.run(request_then_collect(TimeoutMiddleware))
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

    alive, sent = asyncio.run(request_then_collect(TimeoutMiddleware, slow, timeout=0.05))
    assert sent[0]["status"] == 504 and b"0.05 seconds" in sent[1]["body"]
    assert cancelled and not alive


def test_media_types_are_worked_out_once_per_class(monkeypatch):
    def predict(self) -> np.ndarray: ...
    spec = IODescriptor.from_output(predict)   # what BentoML makes of Model.predict's return type
    expected = io_models.IOMixin.mime_type.__func__(spec)
    bentoml_fixes.apply()
    assert spec.mime_type() == expected == "application/json"
    calls = []
    monkeypatch.setattr(spec, "model_json_schema", classmethod(lambda cls, *a, **k: calls.append(1) or {}))
    assert spec.mime_type() == expected and calls == []   # from the cache: no schema built per response
    monkeypatch.setattr(spec, "media_type", "text/plain")  # a media type set later still counts
    assert spec.mime_type() == "text/plain"
