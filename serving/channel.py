"""The front's line to the Model workers: the images and the logits as raw frames over a Unix socket per worker.

Why not BentoML's own call to a dependency: per one-image request it cost 2.3–3.4 ms of CPU across the two
processes (its HTTP client, uvicorn, the middleware, pickling: docs/performance.md), five times the model call.
These frames cost ~0.2 ms. BentoML still starts, restarts and describes the workers; only `predict` goes this way.

A frame is a header (request id, status, payload bytes), then the payload: uint8 N×32×32×3 images to the worker;
float32 N×100 logits back (OK), a JSON refusal (OVERLOADED: Overloaded's message and retry_after), or an error
message (FAILED). Requests share one connection per worker and are answered as they finish, by id. Each payload is
read straight into a buffer of its own, which becomes the array without a copy.

The front sends only well-formed frames (uint8 N×32×32×3, 1 ≤ N ≤ CIFAR100_MAX_IMAGES: the request was checked
before), and a frame the worker cannot take fails only its own request (FAILED), never the connection: the other
requests in flight on it are not disturbed. A connection that breaks (a worker restarted) fails the requests in flight on it, and
each is sent once more; what the client hears of it names no socket or exception, the log does.
"""
import asyncio
import itertools
import json
import logging
import struct
import time

import numpy as np

from serving.admission import Overloaded
from training.contract import IMAGE_DTYPE, IMAGE_SHAPE, NUM_CLASSES

log = logging.getLogger("bentoml.service")
HEADER = struct.Struct("<QBI")   # request id, status, payload bytes
OK, OVERLOADED, FAILED = 0, 1, 2
DOWN_S = 1.0   # how long the front leaves a worker it could not reach alone, while another one answers
IMAGE_BYTES = int(np.prod(IMAGE_SHAPE)) * np.dtype(IMAGE_DTYPE).itemsize


class ModelError(Exception):
    """The model worker failed a request (the front answers 500)."""


class Frames(asyncio.BufferedProtocol):
    """Reads frames, each payload into a bytearray of its own, and hands them to on_frame(id, status, payload). The
    payload of a frame over max_bytes is read past, not kept, and handed over as None."""

    def __init__(self, on_frame, max_bytes, on_lost=None):
        self.on_frame, self.max_bytes, self.on_lost = on_frame, max_bytes, on_lost
        self.header, self.payload, self.filled = bytearray(HEADER.size), None, 0
        self.transport, self.skipping, self.scratch = None, 0, None

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        if self.skipping:
            return memoryview(self.scratch)[:self.skipping]
        return memoryview(self.header if self.payload is None else self.payload)[self.filled:]

    def buffer_updated(self, nbytes):
        if self.skipping:
            self.skipping -= nbytes
            if not self.skipping:
                self.on_frame(self.id, self.status, None)
            return
        self.filled += nbytes
        if self.payload is None:
            if self.filled < HEADER.size:
                return
            self.id, self.status, size = HEADER.unpack(self.header)
            self.filled = 0
            if size > self.max_bytes:
                self.skipping, self.scratch = size, self.scratch or bytearray(1 << 16)
                return
            self.payload = bytearray(size)
        if self.filled == len(self.payload):
            payload, self.payload, self.filled = self.payload, None, 0
            self.on_frame(self.id, self.status, payload)

    def send(self, request_id, status, payload):
        payload = memoryview(payload).cast("B")
        self.transport.writelines([HEADER.pack(request_id, status, payload.nbytes), payload])

    def connection_lost(self, exc):
        if self.on_lost:
            self.on_lost(exc)


# The worker's end --------------------------------------------------------------------------------------------

async def serve(path, predict, max_images):
    """Listen on PATH (a Unix socket) and answer each frame of images with `await predict(images)`."""
    loop = asyncio.get_running_loop()

    async def answer(frames, request_id, payload):
        try:   # a payload that is not whole images fails the reshape, and the front hears why
            logits = await predict(np.frombuffer(payload, IMAGE_DTYPE).reshape(-1, *IMAGE_SHAPE))
            status, reply = OK, np.ascontiguousarray(logits, np.float32)
        except Overloaded as e:
            status, reply = OVERLOADED, json.dumps({"error": str(e), "retry_after": e.retry_after}).encode()
        except Exception as e:   # the front answers 500; the worker goes on
            log.exception("model call failed")
            status, reply = FAILED, f"{type(e).__name__}: {e}".encode()
        if not frames.transport.is_closing():   # else the front has gone, and its requests with it
            frames.send(request_id, status, reply)

    answering = set()   # the tasks under way: the loop itself keeps only weak references to them

    def connection():
        def on_frame(request_id, _, payload):
            if payload is None:   # over the size this worker takes: that request fails, the others go on
                log.error("model channel: a frame over the %d bytes allowed; refused", frames.max_bytes)
                if not frames.transport.is_closing():
                    frames.send(request_id, FAILED, f"a frame over the {frames.max_bytes} bytes allowed".encode())
                return
            task = loop.create_task(answer(frames, request_id, payload))
            answering.add(task)
            task.add_done_callback(answering.discard)

        frames = Frames(on_frame, max_images * IMAGE_BYTES)
        return frames

    return await loop.create_unix_server(connection, path)


# The front's end ---------------------------------------------------------------------------------------------

class Line:
    """One connection to one worker, made on first use, with the requests waiting on it. A broken one is replaced,
    never mended: the requests it failed were the ones in flight on it."""

    def __init__(self, path):
        self.path, self.pending, self.ids = path, {}, itertools.count()
        self.frames, self.connecting = None, None

    async def ready(self):
        if self.connecting is None:
            self.connecting = asyncio.ensure_future(self.connect())
        await asyncio.shield(self.connecting)   # one connection, however many callers wait for it

    async def connect(self):
        try:
            _, self.frames = await asyncio.get_running_loop().create_unix_connection(
                lambda: Frames(self.answered, 2**32 - 1, self.lost), self.path)
        except OSError as e:   # not listening (yet, or any more)
            raise ConnectionError(f"cannot reach the model worker at {self.path}: {e.strerror or e}") from None

    def broken(self):
        if self.connecting is None or not self.connecting.done():
            return False
        return self.connecting.cancelled() or self.connecting.exception() is not None or \
            self.frames.transport.is_closing()

    async def __call__(self, images):
        request_id, answer = next(self.ids), asyncio.get_running_loop().create_future()
        self.pending[request_id] = answer   # in flight from now: ModelChannel counts it while this connects
        try:
            await self.ready()
            if self.frames.transport.is_closing():   # lost since it was chosen: nothing would answer
                raise ConnectionError(f"the connection to the model worker at {self.path} has closed")
            self.frames.send(request_id, OK, np.ascontiguousarray(images))
            status, payload = await answer
        finally:
            del self.pending[request_id]
        if status is None:
            raise ConnectionError(f"the model worker at {self.path} closed the connection")
        if status == OK:
            return np.frombuffer(payload, np.float32).reshape(len(images), NUM_CLASSES)
        if status == OVERLOADED:
            refusal = json.loads(payload)
            raise Overloaded(refusal["error"], refusal["retry_after"])
        raise ModelError(payload.decode())

    def answered(self, request_id, status, payload):
        answer = self.pending.get(request_id)
        if answer is not None and not answer.done():   # else its caller went away
            answer.set_result((status, payload))

    def lost(self, exc):
        for answer in self.pending.values():
            if not answer.done():   # a result, not an exception: a caller that has not sent yet never reads it
                answer.set_result((None, b""))


class ModelChannel:
    """The front's connections to the Model workers listening on PATHS. Each request goes to the worker with the
    fewest requests in flight, skipping for DOWN_S one that could not be reached while another can. A request whose
    connection breaks (its worker restarted) is sent once more, on a new one (model calls are idempotent); when that
    fails too, it is refused with 503 and Retry-After. Only batches of 1 to MAX_IMAGES uint8 N×32×32×3 images are
    sent (ValueError for anything else: the request should have been refused before)."""

    def __init__(self, paths, max_images=None):
        self.lines = {path: Line(path) for path in paths}
        self.down_until = dict.fromkeys(paths, 0.0)
        self.max_images = max_images

    def line(self):
        for path, line in self.lines.items():
            if line.broken():
                self.lines[path] = Line(path)
        now = time.monotonic()
        up = [line for path, line in self.lines.items() if self.down_until[path] <= now]
        return min(up or self.lines.values(), key=lambda line: len(line.pending))

    async def __call__(self, images):
        if not (isinstance(images, np.ndarray) and images.dtype == IMAGE_DTYPE and images.shape[1:] == IMAGE_SHAPE
                and 1 <= len(images) <= (self.max_images or len(images))):
            raise ValueError(f"not a batch for the model workers: {getattr(images, 'dtype', type(images))} "
                             f"{getattr(images, 'shape', '')}")
        for attempt in (1, 2):
            line = self.line()
            try:
                return await line(images)
            except ConnectionError as e:
                self.down_until[line.path] = time.monotonic() + DOWN_S
                if attempt == 2:
                    log.warning("model channel: %s; refused", e)
                    raise Overloaded("no model worker available; retry later", 1) from None
                log.warning("model channel: %s; retrying once", e)
