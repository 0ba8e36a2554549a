"""Locust users for the CIFAR-100 service: image uploads to /classify, uint8 arrays to /classify_batch.

    python -m loadtest --host http://127.0.0.1:3000 --users 8 --run-time 30s     # headless + report
    locust -f loadtest/locustfile.py --host http://127.0.0.1:3000 --tags images    # web UI, uploads only

Environment: LOADTEST_BATCH images per /classify_batch request (default 64); LOADTEST_DATA_DIR a
CIFAR-100 folder to take the images from (default: training.synthetic images); LOADTEST_WAIT
"MIN,MAX" seconds each user waits between requests (default 0.05,0.25); CIFAR100_API_TOKEN or
CIFAR100_API_TOKEN_FILE when the service wants a token.
"""
import io
import os
import random

import numpy as np
from locust import HttpUser, between, events, tag, task
from PIL import Image

from loadtest import REFUSED
from serving.access import bearer_headers
from training.contract import IMAGE_SHAPE, NUM_CLASSES, npy_bytes

BATCH = int(os.environ.get("LOADTEST_BATCH", "64"))
HEADERS = bearer_headers()
WAIT = [float(x) for x in os.environ.get("LOADTEST_WAIT", "0.05,0.25").split(",")]
POOL = 256   # distinct images to draw from


def _pool_images():
    data_dir = os.environ.get("LOADTEST_DATA_DIR")
    if data_dir:
        from training.data import load_cifar100
        return load_cifar100(data_dir).test_images[:POOL]
    from training.synthetic import make_images
    rng = np.random.default_rng(0)
    return make_images(rng.integers(0, NUM_CLASSES, POOL), rng)


def _encode(image, fmt):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


# Made once per process, so users measure the service rather than the encoder.
IMAGES = _pool_images()
UPLOADS = [(f"image{i}.png", _encode(im, "PNG"), "image/png") if i % 2 else
           (f"image{i}.jpg", _encode(im, "JPEG"), "image/jpeg") for i, im in enumerate(IMAGES)]
# Two different arrays (np.resize repeats the pool when BATCH is larger than it).
BATCHES = [npy_bytes(np.resize(np.roll(IMAGES, k, axis=0), (BATCH, *IMAGE_SHAPE))) for k in (0, POOL // 2)]


def _check(response, key, expected):
    """Fail the request unless it answered `expected` results under `key`. A busy service's refusal (503 with
    Retry-After) is not a failure: it is reported in a row of its own."""
    if response.status_code == 503 and response.headers.get("Retry-After", "").isdigit():
        response.request_meta["name"] += REFUSED
        response.success()
        return
    try:
        got = len(response.json()[key])
    except Exception:
        response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
        return
    if got != expected:
        response.failure(f"{got} {key} for {expected} images")


class ImageUser(HttpUser):
    """A client uploading 1–8 PNG/JPEG files per request: a single one as the raw body, several as multipart."""
    wait_time = between(*WAIT)

    def on_start(self):
        self.client.headers.update(HEADERS)

    @tag("images")
    @task
    def classify(self):
        files = random.sample(UPLOADS, random.randint(1, 8))
        if len(files) == 1:
            (_, data, content_type), = files
            request = {"data": data, "headers": {"Content-Type": content_type}}
        else:
            request = {"files": [("images", f) for f in files]}
        with self.client.post("/classify", catch_response=True, **request) as response:
            _check(response, "predictions", len(files))


class ArrayUser(HttpUser):
    """A batch client sending LOADTEST_BATCH uint8 images as one .npy array, the body of its request."""
    wait_time = between(*WAIT)

    def on_start(self):
        self.client.headers.update(HEADERS)

    @tag("batch")
    @task
    def classify_batch(self):
        body = random.choice(BATCHES)
        with self.client.post("/classify_batch", data=body, headers={"Content-Type": "application/x-npy"},
                              catch_response=True) as response:
            _check(response, "class_ids", BATCH)


@events.init.add_listener
def _drop_users_without_tagged_tasks(environment, **_):
    """With --tags, Locust would still start users whose tasks were all filtered out (and fail)."""
    options = environment.parsed_options
    tags = set(getattr(options, "tags", None) or [])
    if tags:
        environment.user_classes[:] = [u for u in environment.user_classes
                                       if any(getattr(t, "locust_tag_set", set()) & tags for t in u.tasks)]
