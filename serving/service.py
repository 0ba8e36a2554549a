"""The BentoML service: `bentoml serve` from the repo root (bentofile.yaml names serving.service:Classifier).

Two services in one `bentoml serve`:
  Model       owns the backend (serving/backends.py) and its adaptive batching: `predict` (for /classify_batch)
              and `predict_decoded` (for /classify) are batchable APIs, so BentoML's dispatcher merges
              concurrent requests (uint8 N×32×32×3 each) into one model call and splits the logits back.
  Classifier  the HTTP front: parses uploads (.npy or image files), calls the Model, shapes JSON; GET /info.
Decoding images in the front process keeps Pillow off the model's process and GIL; the arrays cross over
as pickle-5 out-of-band buffers on a local socket (no JSON arrays anywhere).

Environment: CIFAR100_MODEL (default: the latest model of the store's MODEL_NAME), CIFAR100_BACKEND (auto|torch|onnx|tensorrt),
CIFAR100_MAX_BATCH_SIZE (images per model call, 1024), CIFAR100_MAX_LATENCY_MS (30000: requests waiting
longer are refused with 503), CIFAR100_MAX_IMAGES (images per request, 4096), CIFAR100_MAX_BODY_MB (64),
CIFAR100_WORKERS (front processes, 1), CIFAR100_MAX_PIXELS (per uploaded image, 40M), CIFAR100_API_TOKEN or
CIFAR100_API_TOKEN_FILE (require `Authorization: Bearer <token>`; serving/access.py).
"""
import asyncio
import logging
import os
import threading
import time
from pathlib import Path

import anyio
import bentoml
import fastapi
import numpy as np
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.responses import JSONResponse, Response

from serving import access, bentoml_fixes
from serving.answers import BatchAnswer, Candidate, ClassifyAnswer, InfoAnswer, Prediction
from serving.backends import load_backend
from serving.images import InputError, decode_image, read_npy
from training.contract import MODEL_NAME, blank_images

log = logging.getLogger("bentoml.service")

MODEL_TAG = os.environ.get("CIFAR100_MODEL", f"{MODEL_NAME}:latest")
if ":" not in MODEL_TAG:
    MODEL_TAG += ":latest"
BACKEND = os.environ.get("CIFAR100_BACKEND", "auto")
MAX_BATCH_SIZE = int(os.environ.get("CIFAR100_MAX_BATCH_SIZE", 1024))
MAX_LATENCY_MS = int(os.environ.get("CIFAR100_MAX_LATENCY_MS", 30000))
MAX_IMAGES = int(os.environ.get("CIFAR100_MAX_IMAGES", 4096))
MAX_BODY_BYTES = int(float(os.environ.get("CIFAR100_MAX_BODY_MB", 64)) * 2**20)
WORKERS = int(os.environ.get("CIFAR100_WORKERS", 1))
API_TOKEN = access.api_token()   # None: anyone who reaches the port may call (serving/access.py)
bentoml_fixes.apply(MAX_BODY_BYTES)   # before BentoML builds the apps of this module's services
WARMUP_REQUESTS = 12  # BentoML's dispatcher calls one request at a time for its first ~10 while it fits its cost model


# runner_connection: BentoML's client replaces its aiohttp session to this service every 100 requests (and
# every 300 s) by closing the old one while other calls are still in flight on it: they fail with
# "Server disconnected" (and once, probably the same cause, one hung until the traffic timeout). One local
# worker needs no refresh. No access log: the front logs each request; a second line per internal call
# doubled the log and cost this process 5-8% of its CPU per /classify.
@bentoml.service(traffic={"timeout": 300}, workers=1, logging={"access": {"enabled": False}},
                 runner_connection={"max_requests": 2**62, "max_age": float(10**12)})
class Model:
    model_ref = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self):
        stored = self.model_ref
        self.tag, self.metadata = str(stored.tag), dict(stored.info.metadata)
        self.backend = load_backend(BACKEND, stored.path)
        self.backend.warmup()
        self.stats_lock = threading.Lock()
        self.stats = {"model_calls": 0, "images": 0, "largest_call": 0, "seconds": 0.0}
        log.info("loaded %s on %s", self.tag, self.backend.describe())

    # Two batchers over one backend: each learns how long to hold requests from the traffic it sees, so
    # bulk /classify_batch uploads (long model calls) do not teach /classify requests to wait.
    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 N×32×32×3 -> float32 logits N×100 (/classify_batch); BentoML merges concurrent calls into one."""
        return self._run(images)

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def predict_decoded(self, images: np.ndarray) -> np.ndarray:
        """The same for images decoded from uploaded files (/classify)."""
        return self._run(images)

    def _run(self, images):
        start = time.perf_counter()
        logits = self.backend(images)
        with self.stats_lock:
            s = self.stats
            s["model_calls"] += 1
            s["images"] += len(images)
            s["largest_call"] = max(s["largest_call"], len(images))
            s["seconds"] += time.perf_counter() - start
        return logits

    @bentoml.api
    def describe(self) -> dict:
        return {"model": self.tag, "metadata": self.metadata, **self.backend.describe(),
                "batching": {"max_batch_size": MAX_BATCH_SIZE, "max_latency_ms": MAX_LATENCY_MS,
                             "max_images_per_request": MAX_IMAGES},
                "stats": dict(self.stats)}


class RequestGuard:
    """Requests are checked before BentoML reads them: 401 without the API token (when one is set; before the
    body is read); then bad bodies get a JSON 4xx (BentoML answers 500 to a multipart body it cannot parse): 413
    over the size limit, by Content-Length and by the bytes received; 400 for multipart framing errors, found by
    python-multipart's streaming parser as the chunks pass through (nothing is buffered)."""

    def __init__(self, app, max_bytes, token=None):
        self.app, self.max_bytes, self.token = app, max_bytes, token

    def too_big(self):
        return InputError(f"request body over the limit of {self.max_bytes} bytes (CIFAR100_MAX_BODY_MB)", 413)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.token and not access.open_path(scope["path"]):
            if why := access.refusal(headers.get(b"authorization"), self.token):
                return await JSONResponse({"error": why}, status_code=401, headers={
                    "WWW-Authenticate": 'Bearer realm="cifar100"'})(scope, receive, send)
        try:
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_bytes:
                raise self.too_big()
            framing = multipart_checker(headers.get(b"content-type", b""))
        except InputError as e:
            return await error(e)(scope, receive, send)
        received, failure, replied = 0, None, False

        async def checked_receive():
            nonlocal received, failure
            message = await receive()
            chunk = message.get("body", b"")
            received += len(chunk)
            try:
                if received > self.max_bytes:
                    raise self.too_big()
                if framing is not None:
                    framing.write(chunk)
            except (InputError, MultipartParseError) as e:
                failure = e if isinstance(e, InputError) else InputError(f"malformed multipart body: {e}")
                raise failure from None
            return message

        async def guarded_send(message):  # once the body failed a check, whatever the app answers becomes our 4xx
            nonlocal replied
            if failure is None:
                return await send(message)
            if not replied:
                replied = True
                await error(failure)(scope, receive, send)

        try:
            await self.app(scope, checked_receive, guarded_send)
        except InputError:
            if not replied:
                await error(failure)(scope, receive, send)


def multipart_checker(content_type):
    """A parser that only checks multipart framing (no callbacks), or None for other bodies."""
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        return None
    if not params.get(b"boundary"):
        raise InputError("multipart/form-data without a boundary in Content-Type")
    return MultipartParser(params[b"boundary"])


def error(e):
    return JSONResponse({"error": str(e)}, status_code=e.status)


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


@routes.get("/info", response_model=InfoAnswer, tags=["Service APIs"])
async def info():
    """The served model (tag and metadata: part, classes, accuracy, artifacts), the backend, device and precision,
    how `auto` chose the backend, the batching settings and the model's call statistics."""
    return JSONResponse(await bentoml.get_current_service().describe())


ERRORS = {400: "bad input (not an image, not an .npy, a malformed body, ...)",
          413: "too many images, too many pixels, or too large a body",
          503: "the model is busy: the request would wait too long"}
bentoml_fixes.document_errors("/classify", ERRORS)
bentoml_fixes.document_errors("/classify_batch", {**ERRORS, 422: "an array of the wrong dtype or shape"})


@bentoml.service(traffic={"timeout": 300}, workers=WORKERS)
@bentoml.asgi_app(routes, path="/")
class Classifier:
    model = bentoml.depends(Model)

    def __init__(self):
        self.classes, self.ready = None, False

    async def _call_model(self, api, *args):
        if not hasattr(self.model, "to_async"):  # in-process (unit tests)
            return await anyio.to_thread.run_sync(getattr(self.model, api), *args)
        # Under `bentoml serve`: the Model process, through its batcher. Every Model API is idempotent.
        return await bentoml_fixes.call_dependency(getattr(self.model.to_async, api), *args)

    async def _predict(self, images, api="predict"):
        return await self._call_model(api, images)

    async def _model_info(self):
        return await self._call_model("describe")

    @bentoml.on_startup
    async def start_warm_up(self):
        # Dependencies are connected only after startup hooks return: warm up in the background;
        # /readyz answers 503 until it is done (__is_ready__).
        self.ready = False
        self.warm_up_task = asyncio.get_running_loop().create_task(self.warm_up())

    async def warm_up(self):
        """Wait for the Model process (loaded and warmed up), then let its batcher fit its cost model."""
        deadline = time.monotonic() + 600
        while True:
            try:
                if not hasattr(self.model, "to_async") or await self.model.to_async.is_ready(timeout=5):
                    await self._class_names()
                    blank = blank_images(1)
                    for _ in range(WARMUP_REQUESTS):
                        for api in ("predict", "predict_decoded"):
                            await self._predict(blank, api)
                    self.ready = True
                    log.info("warmed up: ready")
                    return
            except Exception as e:  # not connected or not up yet
                if time.monotonic() > deadline:
                    log.error("the Model service did not become ready in 600 s: %s", e)
                    return
            await asyncio.sleep(0.2)

    async def __is_ready__(self):
        return self.ready

    async def _class_names(self):
        if self.classes is None:
            self.classes = (await self._model_info())["metadata"]["classes"]
        return self.classes

    async def describe(self):
        info = await self._model_info()
        info["batching"]["max_body_bytes"] = MAX_BODY_BYTES
        info["front_workers"] = WORKERS
        return info

    @bentoml.api
    async def classify_batch(self, images: Path, probabilities: bool = False) -> BatchAnswer:
        """An .npy upload (uint8 N×32×32×3) -> {"class_ids": [N]} (+ "probabilities": N×100 on request)."""
        try:
            array = await anyio.to_thread.run_sync(read_npy, images, MAX_IMAGES)
        except InputError as e:
            return error(e)
        logits = await self._predict(array)
        return answer(BatchAnswer(class_ids=logits.argmax(axis=1).tolist(),
                                  probabilities=softmax(logits).tolist() if probabilities else None))

    @bentoml.api
    async def classify(self, images: list[Path]) -> ClassifyAnswer:
        """Image files (any common format, size, mode) -> class id, name, probability and top-5 for each."""
        try:
            if not images:
                raise InputError("images: no files uploaded")
            if len(images) > MAX_IMAGES:
                raise InputError(f"images: {len(images)} files exceed the limit of {MAX_IMAGES} (CIFAR100_MAX_IMAGES)", 413)
            decoded = await anyio.to_thread.run_sync(
                lambda: [decode_image(p, f"images[{i}]") for i, p in enumerate(images)])
        except InputError as e:
            return error(e)
        probs = softmax(await self._predict(np.stack([array for array, _ in decoded]), "predict_decoded"))
        classes = await self._class_names()
        predictions = []
        for p, (_, note) in zip(probs, decoded):
            top5 = [Candidate(class_id=c, class_name=classes[c], probability=p[c]) for c in np.argsort(-p)[:5]]
            predictions.append(Prediction(**top5[0].model_dump(), top5=top5, note=note))
        return answer(ClassifyAnswer(predictions=predictions))


Classifier.add_asgi_middleware(RequestGuard, max_bytes=MAX_BODY_BYTES, token=API_TOKEN)
