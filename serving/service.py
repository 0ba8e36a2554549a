"""The BentoML service: `bentoml serve` from the repo root (bentofile.yaml names serving.service:Classifier).

Two services in one `bentoml serve`:
  Model       owns the backend (serving/backends.py) and its batcher (serving/batching.py), which merges
              concurrent `predict` requests (uint8 N×32×32×3 each) into one model call and splits the logits back.
              One worker per visible GPU, each bound to its own (serving/devices.py, serving/workers.py).
  Classifier  the HTTP front: checks requests (serving/guard.py: token, bytes in flight, body), parses uploads
              (.npy or image files, as the raw body or multipart), calls the Model, shapes JSON; GET /info, /ui.
Decoding images in the front process keeps Pillow off the model's process and GIL; the arrays cross over
as raw frames on a Unix socket per model worker (serving/channel.py), not through BentoML's client. With
CIFAR100_PROCESSES=1 the front holds the model and its batcher itself.

Settings: the variables CIFAR100_* (serving/settings.py; docs/serving.md has them all, with their defaults), read
and checked first: `bentoml serve` imports this module before it starts anything, so a value that does not fit is
the one line it prints. Its own Prometheus series: serving/metrics.py.
"""
import asyncio
import logging
import sys
import threading
import time
from pathlib import Path

import anyio
import bentoml
import fastapi
import numpy as np
import pydantic
from starlette.exceptions import HTTPException
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route, Router

from serving import settings

try:   # before the modules below, which read settings too (serving/images.py at its import)
    SETTINGS = settings.get()
except settings.SettingsError as e:
    sys.exit(f"error: {e}")

from serving import bentoml_fixes, channel, devices, workers  # noqa: E402
from serving.admission import ByteBudget, Overloaded  # noqa: E402
from serving.answers import BatchAnswer, Candidate, ClassifyAnswer, InfoAnswer, Prediction  # noqa: E402
from serving.backends import cpu_cores, load_backend  # noqa: E402
from serving.batching import Batcher  # noqa: E402
from serving.guard import RequestGuard, error  # noqa: E402
from serving.images import (InputError, decode_images, decode_uploads, open_images, quick_to_decode,  # noqa: E402
                            read_npy, small_files)
from serving.metrics import ModelMetrics  # noqa: E402
from training.contract import blank_images  # noqa: E402

log = logging.getLogger("bentoml.service")
if bentoml.server_context.worker_index is None:   # the server's own process, not each of its workers again
    for warning in settings.unknown():
        log.warning("%s", warning)

# Before BentoML builds the apps of this module's services, and uvicorn its HTTP protocol.
bentoml_fixes.apply(SETTINGS.max_body_bytes, SETTINGS.max_images, SETTINGS.header_timeout_s,
                    SETTINGS.max_header_bytes)
# Request bytes in flight: bodies (serving/guard.py) and what decoding images holds (Classifier.decode).
BUDGET = ByteBudget.for_requests(SETTINGS.max_inflight_bytes, SETTINGS.max_body_bytes)
# 2: an HTTP front process and a model process (the front's parsing never competes with the model for its GIL;
# the model process is the unit the scale-out builds on); 1: the front runs the model (no second hop).
MODEL_WORKERS = devices.worker_count(SETTINGS.model_workers)   # one per visible GPU by default
SMALL_BATCH = 16      # requests of up to this many images queue apart and go first (serving/batching.py)
INLINE_CALL_S = 0.001  # CPU model calls expected to be shorter run on the event loop (serving/batching.py)
LARGE_DECODE_BYTES = 16 << 20   # requests whose largest image decodes to more take turns, one per core (decode)


class ModelHost:
    """The backend with its batcher, call statistics and description: held by each Model worker, or, in the
    one-process layout, by the front itself. A worker's STATE (serving/workers.py) passes its statistics on, its
    Prometheus series (serving/metrics.py, labelled WORKER) count the same calls."""

    def __init__(self, stored, worker, state=None):
        self.tag, self.metadata, self.state = str(stored.tag), dict(stored.info.metadata), state
        self.backend = load_backend(SETTINGS.backend, stored.path)
        self.backend.warmup()
        self.stats_lock = threading.Lock()
        self.stats = {"model_calls": 0, "images": 0, "largest_call": 0, "seconds": 0.0}
        self.metrics = ModelMetrics(worker)
        # Quick calls may run on the event loop, on the CPU only: CUDA graphs and streams belong to one thread.
        inline_s = INLINE_CALL_S if self.backend.device == "cpu" else 0.0
        self.batcher = Batcher(self.run, SETTINGS.max_batch_size, SETTINGS.max_latency_ms / 1000, SMALL_BATCH,
                               inline_s, on_call=self.metrics.requests.observe)
        start = time.perf_counter()   # the model's rate, before the first request has to be judged by it
        self.backend(blank_images(SMALL_BATCH + 1))
        self.batcher.learn(SMALL_BATCH + 1, time.perf_counter() - start)
        log.info("loaded %s on %s", self.tag, self.backend.describe())
        if state is not None:
            state.update(force=True, backend=self.backend.name, stats=dict(self.stats))

    def run(self, images):
        start = time.perf_counter()
        logits = self.backend(images)
        seconds = time.perf_counter() - start
        self.metrics.model_call(len(images), seconds)
        with self.stats_lock:
            s = self.stats
            s["model_calls"] += 1
            s["images"] += len(images)
            s["largest_call"] = max(s["largest_call"], len(images))
            s["seconds"] += seconds
            if self.state is not None:
                self.state.update(stats=dict(s))
        return logits

    def describe(self):
        with self.stats_lock:
            stats = dict(self.stats)
            if self.state is not None:
                self.state.update(force=True, stats=stats)
        return {"model": self.tag, "metadata": self.metadata, **self.backend.describe(),
                "batching": {"max_batch_size": SETTINGS.max_batch_size, "max_latency_ms": SETTINGS.max_latency_ms,
                             "max_images_per_request": SETTINGS.max_images, "small_batch": SMALL_BATCH,
                             "processes": SETTINGS.processes}, "stats": stats}


# runner_connection: BentoML's client replaces its aiohttp session to this service every 100 requests (and
# every 300 s) by closing the old one while other calls are still in flight on it: they fail with
# "Server disconnected" (and once, probably the same cause, one hung until the traffic timeout). One local
# worker needs no refresh. No access log: the front logs each request; a second line per internal call
# doubled the log and cost this process 5-8% of its CPU per /classify. No request metrics, for the same reason:
# the front's count every request (0.1-0.2 ms of this process's CPU per call, A/B).
@bentoml.service(traffic={"timeout": settings.TRAFFIC_TIMEOUT_S}, workers=MODEL_WORKERS,
                 logging={"access": {"enabled": False}}, metrics={"enabled": False},
                 runner_connection={"max_requests": 2**62, "max_age": float(10**12)})
class Model:
    model_ref = bentoml.models.BentoModel(SETTINGS.model)

    def __init__(self):
        # Each worker binds itself to its own device before anything starts CUDA (serving/devices.py).
        index = bentoml.server_context.worker_index or 1
        device = devices.bind_worker(index, MODEL_WORKERS, cpu_cores())
        log.info("model worker %d of %d: %s", index, MODEL_WORKERS, device)
        self.index, self.host = index, ModelHost(self.model_ref, index, workers.WorkerState(index, device))

    @bentoml.on_startup
    async def listen(self):
        """Take the front's model calls (serving/channel.py); ready from then on."""
        path = workers.socket_path(self.index)
        path.unlink(missing_ok=True)   # left by this worker's predecessor, if it was restarted
        self.listener = await channel.serve(str(path), self.host.batcher, SETTINGS.max_images)
        self.host.state.update(force=True, ready=True)

    @bentoml.on_shutdown
    async def close(self):
        self.listener.close()
        workers.socket_path(self.index).unlink(missing_ok=True)
        self.host.state.remove()

    @bentoml.api
    def describe(self) -> dict:
        return self.host.describe()


def answer(model):
    """A validated answer as JSON, serialised by pydantic-core: for 1,024 × 100 probabilities 13 ms, against 63 ms
    for json.dumps in Starlette's JSONResponse (or BentoML's own output path, which would validate it again)."""
    return Response(model.model_dump_json(exclude_none=True), media_type="application/json")


def softmax(logits):
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


# API methods are POST-only in BentoML: GET routes live in a FastAPI app mounted under the service (BentoML puts
# a mounted FastAPI app's routes into its OpenAPI document).
routes = fastapi.FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


@routes.exception_handler(HTTPException)
async def http_error(request, e):
    """FastAPI's refusals (a 405 on /info, ...) in the service's shape: {"error": ...}."""
    return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)


@routes.get("/info", response_model=InfoAnswer, tags=["Service APIs"])
async def info():
    """The served model (tag and metadata: part, classes, accuracy, artifacts), the backend, device and precision,
    how `auto` chose the backend, the batching settings and the model's call statistics."""
    return JSONResponse(await bentoml.get_current_service().describe())


UI_DIR = Path(__file__).with_name("ui")   # the web page (docs/ui.md): open without a token, it asks for one
UI_ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}


@routes.get("/ui", include_in_schema=False)
async def ui_page():
    return FileResponse(UI_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@routes.get("/ui/assets/{name}", include_in_schema=False)
async def ui_asset(name: str):
    if name not in UI_ASSETS:   # only the page's own files, never a path into the file system
        return JSONResponse({"error": f"no asset {name}"}, status_code=404)
    return FileResponse(UI_DIR / name, media_type=UI_ASSETS[name], headers={"Cache-Control": "no-cache"})


# Raw bodies, which BentoML's APIs do not take (they read multipart or JSON): the guard sends such requests to these
# plain Starlette routes (FastAPI's request handling costs ~0.4 ms of CPU more per request). No multipart parsing, no
# temporary file.
FLAG = pydantic.TypeAdapter(bool)   # ?probabilities=: true/false, 1/0, yes/no, on/off, as BentoML's form field


async def classify_raw_npy(request):
    """/classify_batch with the .npy file as the whole body (application/x-npy): the array is a view of the body."""
    try:
        probabilities = FLAG.validate_python(request.query_params.get("probabilities", False))
    except pydantic.ValidationError:
        return error(InputError("probabilities: expected true or false"))
    return await bentoml.get_current_service().classify_npy(await request.body(), probabilities)


async def classify_raw_image(request):
    """/classify with one image file as the whole body (image/*)."""
    return await bentoml.get_current_service().classify_files([await request.body()])


raw_routes = Router([Route("/classify_batch", classify_raw_npy, methods=["POST"]),
                     Route("/classify", classify_raw_image, methods=["POST"])])


ERRORS = {400: "bad input (not an image, not an .npy, a malformed body, a text field where files are expected, ...)",
          405: "a method other than POST",
          408: "the request's body stalled",
          413: "too many images, too many pixels, too much to decode, or too large a body",
          415: "a Content-Type the endpoint does not take",
          503: "the service is busy: the request would wait too long, or pass the memory budget"}
bentoml_fixes.document_errors("/classify", ERRORS)
bentoml_fixes.document_errors("/classify_batch", {**ERRORS, 422: "an array of the wrong dtype or shape"})
bentoml_fixes.document_raw_body("/classify", "image/*", "one image file as the whole body (Content-Type image/png, "
                                "image/jpeg, ...)")
bentoml_fixes.document_raw_body("/classify_batch", "application/x-npy", "the .npy file as the whole body (also "
                                "application/octet-stream); `?probabilities=true` asks for the probabilities")


@bentoml.service(traffic={"timeout": settings.TRAFFIC_TIMEOUT_S}, workers=SETTINGS.workers)
@bentoml.asgi_app(routes, path="/")
class Classifier:
    if SETTINGS.processes == 1:
        model_ref = bentoml.models.BentoModel(SETTINGS.model)
    else:
        model = bentoml.depends(Model)

    def __init__(self):
        self.classes, self.ready, self.decoders = None, False, None
        self.host = self.channel = None
        if SETTINGS.processes == 1:   # the front runs the model itself, its series labelled with the front's number
            self.host = ModelHost(self.model_ref, bentoml.server_context.worker_index or 1)
        else:
            sockets = [str(workers.socket_path(i)) for i in range(1, MODEL_WORKERS + 1)]
            self.channel = channel.ModelChannel(sockets, SETTINGS.max_images)

    async def _call_model(self, api, *args):
        """A call to the Model process (every Model API is idempotent)."""
        return await bentoml_fixes.call_dependency(getattr(self.model.to_async, api), *args)

    async def _predict(self, images):
        """Logits from the model's batcher: this process's in the one-process layout, else the Model process's.
        Overloaded when the request would wait for the model longer than CIFAR100_MAX_LATENCY_MS."""
        return await (self.host.batcher if self.host else self.channel)(images)

    async def _model_info(self):
        return self.host.describe() if self.host else await self._call_model("describe")

    def _model_ready(self):
        """Whether every model worker is up and listening on its channel (serving/workers.py)."""
        return self.host is not None or workers.all_ready(workers.read_all(), MODEL_WORKERS)

    @bentoml.on_startup
    async def start_warm_up(self):
        # Dependencies are connected only after startup hooks return: warm up in the background;
        # /readyz answers 503 until it is done (__is_ready__).
        self.ready = False
        self.warm_up_task = asyncio.get_running_loop().create_task(self.warm_up())

    async def warm_up(self):
        """Wait for the model workers (loaded, warmed up, listening), then call the model once from this process."""
        deadline, why = time.monotonic() + 600, "not every model worker is ready"
        while time.monotonic() < deadline:
            try:
                if self._model_ready():
                    await self._class_names()
                    await self._predict(blank_images(1))
                    self.ready = True
                    log.info("warmed up: ready")
                    return
            except Exception as e:  # not connected or not up yet
                why = e
            await asyncio.sleep(0.2)
        log.error("the Model service did not become ready in 600 s: %s", why)

    async def __is_ready__(self):
        """Ready once warmed up and, in the two-process layout, once every model worker says it is."""
        return self.ready and self._model_ready()

    async def _class_names(self):
        if self.classes is None:
            self.classes = (await self._model_info())["metadata"]["classes"]
        return self.classes

    async def describe(self):
        info = await self._model_info()
        info["batching"]["max_body_bytes"] = SETTINGS.max_body_bytes
        info["front_workers"] = SETTINGS.workers
        if self.host is None:   # the model workers, each from its own state: one call reaches only one of them
            info["workers"] = workers.read_all()
            info["stats"] = workers.total_stats(info["workers"])
        return info

    async def classify_npy(self, data, probabilities):
        """The answer to /classify_batch for the bytes of an .npy file: the class ids (and the probabilities)."""
        try:
            logits = await self._predict(read_npy(data, SETTINGS.max_images))
        except (InputError, Overloaded, channel.ModelError) as e:
            return failed(e, "/classify_batch")
        return answer(BatchAnswer(class_ids=logits.argmax(axis=1).tolist(),
                                  probabilities=softmax(logits).tolist() if probabilities else None))

    @bentoml.api
    async def classify_batch(self, images: Path, probabilities: bool = False) -> BatchAnswer:
        """An .npy upload (uint8 N×32×32×3) -> {"class_ids": [N]} (+ "probabilities": N×100 on request)."""
        return await self.classify_npy(await anyio.to_thread.run_sync(images.read_bytes), probabilities)

    @bentoml.api
    async def classify(self, images: list[Path]) -> ClassifyAnswer:
        """Image files (any common format, size, mode) -> class id, name, probability and top-5 for each."""
        return await self.classify_files(images)

    async def classify_files(self, files):
        """The answer to /classify for image files (paths, or the bytes of a raw body)."""
        try:
            if not files:
                raise InputError("images: no files uploaded")
            if len(files) > SETTINGS.max_images:
                raise InputError(f"images: {len(files)} files exceed the limit of {SETTINGS.max_images} "
                                 "(CIFAR100_MAX_IMAGES)", 413)
            decoded = await self.decode(files)
            probs = softmax(await self._predict(np.stack([array for array, _ in decoded])))
        except (InputError, Overloaded, channel.ModelError) as e:
            return failed(e, "/classify")
        classes = await self._class_names()
        predictions = []
        for p, (_, note) in zip(probs, decoded):
            top5 = [Candidate(class_id=c, class_name=classes[c], probability=p[c]) for c in np.argsort(-p)[:5]]
            predictions.append(Prediction(**top5[0].model_dump(), top5=top5, note=note))
        return answer(ClassifyAnswer(predictions=predictions))

    async def decode(self, files):
        """(array, note) for each image file. A few small ones decode here, in less CPU than a hand-off to a thread
        would cost. Others are opened in a thread (their headers only); what decoding the largest one will hold
        (they decode one after another) is admitted in the budget of bytes in flight, and the request's total work
        against CIFAR100_MAX_DECODED_MB; then they decode in a thread, the requests with a large one taking turns,
        one per core (more at once would only share the cores, and hold more memory)."""
        if (data := small_files(files)) is not None and quick_to_decode(data):
            return decode_images(data)
        uploads = await anyio.to_thread.run_sync(open_images, files)
        total, (largest, name) = sum(u.cost for u in uploads), max((u.decoded_bytes, u.name) for u in uploads)
        if total > SETTINGS.max_decoded_bytes:
            raise InputError(f"images: decoding these {len(uploads)} images is {total / 2**20:.0f} MB of work, over "
                             f"the limit of {SETTINGS.max_decoded_bytes / 2**20:.0f} MB per request "
                             "(CIFAR100_MAX_DECODED_MB; a MB is one of decoded pixels, more for slow formats); send "
                             "fewer or smaller images", 413)
        if largest > BUDGET.room(largest):
            raise InputError(f"{name}: decoding it takes {largest / 2**20:.0f} MB, more than the service holds for "
                             "all requests in flight (CIFAR100_MAX_INFLIGHT_MB)", 413)
        limiter = None
        if largest > LARGE_DECODE_BYTES:
            limiter = self.decoders = self.decoders or anyio.CapacityLimiter(cpu_cores())
        BUDGET.admit(largest, f"decoding {name} ({largest / 2**20:.0f} MB)")
        try:
            return await anyio.to_thread.run_sync(decode_uploads, uploads, limiter=limiter)
        finally:
            BUDGET.release(largest)


def failed(e, kind):
    """The answer to a request that failed: refused with InputError or Overloaded (a shed request is one WARNING
    line), or failed by the model worker (ModelError: 500 and one ERROR line; the worker logged the traceback)."""
    if isinstance(e, channel.ModelError):
        log.error("%s: the model failed: %s", kind, e)
        return JSONResponse({"error": "the model failed on this request (the server log has the details)"},
                            status_code=500)
    if isinstance(e, Overloaded):
        log.warning("refused %s: %s", kind, e)
    return error(e)


Classifier.add_asgi_middleware(RequestGuard, max_bytes=SETTINGS.max_body_bytes, budget=BUDGET,
                               max_files=SETTINGS.max_images, body_timeout_s=SETTINGS.body_timeout_s,
                               token=SETTINGS.token, raw_app=raw_routes)
