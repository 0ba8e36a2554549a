"""Overload, on a real server with a small budget: a burst of uploads gets answers (200, or 503 naming the limit with
Retry-After), never a 500 or silence; interactive requests get through; one log line per refusal; the clients
(scoring, Locust) treat refusals as such. Plus the pieces: the byte budget and the one-process batcher."""
import asyncio
import concurrent.futures
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from serving.admission import SMALL_BYTES, ByteBudget, Overloaded
from serving.batching import Batcher
from training.contract import npy_bytes, random_images

ROOT = Path(__file__).resolve().parents[1]
# 4 MB bodies at most, 6 MB in flight: one bulk upload at a time, 2 MB kept for small requests.
BUDGET = {"CIFAR100_MAX_BODY_MB": 4, "CIFAR100_MAX_INFLIGHT_MB": 6, "CIFAR100_MAX_LATENCY_MS": 1500}
BULK = 1200   # images: 3.7 MB as .npy


@pytest.fixture(scope="module", params=[2, 1], ids=["two processes", "one process"])
def server(start_server, request):
    url = start_server({**BUDGET, "CIFAR100_BACKEND": "onnx", "CIFAR100_PROCESSES": request.param})
    return url, lambda: start_server.log(url)


def burst(url, uploads=12, small=10):
    """`uploads` concurrent bulk uploads while `small` one-PNG /classify requests run; returns both answers."""
    bulk = npy_bytes(random_images(BULK))
    png = io.BytesIO()
    Image.fromarray(random_images(1)[0]).save(png, "PNG")

    def upload(_):
        r = requests.post(f"{url}/classify_batch", data=bulk, headers={"Content-Type": "application/x-npy"}, timeout=120)
        return r.status_code, r.json(), r.headers.get("Retry-After")

    with concurrent.futures.ThreadPoolExecutor(uploads) as pool:
        futures = [pool.submit(upload, i) for i in range(uploads)]
        classified = [requests.post(f"{url}/classify", files={"images": ("a.png", png.getvalue())}, timeout=60)
                      for _ in range(small)]
        return [f.result() for f in futures], classified


def test_a_burst_gets_answers_small_requests_get_through_and_each_refusal_is_one_line(server):
    url, log = server
    before = log()
    uploads, classified = burst(url)
    statuses = [status for status, _, _ in uploads]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    for status, body, retry_after in uploads:
        if status == 200:
            assert len(body["class_ids"]) == BULK
        else:
            assert body["error"].startswith("server busy") and "CIFAR100_MAX_" in body["error"]
            assert retry_after.isdigit() and 1 <= int(retry_after) <= 60
    assert [r.status_code for r in classified] == [200] * 10
    assert requests.get(f"{url}/readyz", timeout=10).status_code == 200
    new = log()[len(before):]
    warnings = [line for line in new.splitlines() if "[WARNING]" in line]
    assert len(warnings) == statuses.count(503) and all("refused" in w and "CIFAR100_MAX_" in w for w in warnings)
    assert "Traceback" not in new and "[ERROR]" not in new


def test_locust_reports_refusals_apart_from_failures(server, tmp_path):
    url, _ = server
    # No pause between a user's requests: six users then always overlap, however fast the server answers.
    done = subprocess.run([sys.executable, "-m", "loadtest", "--host", url, "--tags", "batch", "--batch", str(BULK),
                           "--users", "6", "--run-time", "4s", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=180, env={**os.environ, "LOADTEST_WAIT": "0,0"})
    assert done.returncode == 0, done.stdout + done.stderr   # refusals are not failures
    summary = json.loads((tmp_path / "u6_summary.json").read_text())
    assert summary["total"]["failures"] == 0 and summary["total"]["refused"] > 0
    assert summary["endpoints"]["/classify_batch (refused: busy)"]["requests"] == summary["total"]["refused"]
    assert summary["endpoints"]["/classify_batch"]["requests"] > 0
    assert "(refused: busy)" in done.stdout


# ---- the pieces ---------------------------------------------------------------------------------------------

def test_the_budget_keeps_room_for_small_requests_and_says_when_to_come_back():
    budget = ByteBudget(limit=100 * SMALL_BYTES, reserve=10 * SMALL_BYTES)
    budget.admit(60 * SMALL_BYTES)
    with pytest.raises(Overloaded, match=r"60 MB of requests in flight.*limit of 90 MB.*CIFAR100_MAX_INFLIGHT_MB") as e:
        budget.admit(40 * SMALL_BYTES)   # bulk: 100 MB would pass the 90 MB bulk requests may use
    assert e.value.retry_after == 1 and e.value.status == 503    # nothing answered yet: 1 s
    budget.admit(30 * SMALL_BYTES)       # bulk up to 90 MB
    budget.admit(SMALL_BYTES)            # small requests may use the reserve
    budget.release(30 * SMALL_BYTES)
    assert budget.in_flight == 61 * SMALL_BYTES
    with pytest.raises(Overloaded) as e:
        budget.admit(60 * SMALL_BYTES)   # 31 MB over: at the rate of 30 MB answered in the last 10 s (at least 1 s)
    assert e.value.retry_after == 2


def test_the_budget_keeps_only_its_window_of_answers():
    now = 0.0
    budget = ByteBudget(limit=100 * SMALL_BYTES, reserve=10 * SMALL_BYTES, clock=lambda: now)
    for _ in range(100_000):   # 100 s of 1,000 requests/s, 1 kB each, never overloaded
        budget.admit(1000)
        budget.release(1000)
        now += 0.001
    assert len(budget.answered) <= 10_001   # the last 10 s, not one entry per request ever answered
    assert 9.9 < budget.seconds_to_free(10_000_000) < 10.1   # at the 1 MB/s answered lately


def run_batcher(coroutine):
    return asyncio.run(coroutine)


def test_the_batcher_merges_what_queues_while_busy_and_never_holds_a_lone_call():
    calls, merged, gate = [], [], threading.Event()

    def model(images):
        calls.append(len(images))
        gate.wait(5)
        return images.reshape(len(images), -1)[:, :3].astype(np.float32)

    async def scenario():
        batcher = Batcher(model, max_images=10, max_latency_s=60, on_call=merged.append)
        first = asyncio.create_task(batcher(random_images(2, seed=1)))
        await asyncio.sleep(0.1)                 # the model is busy with the first call
        assert calls == [2]
        rest = [asyncio.create_task(batcher(random_images(n, seed=n))) for n in (3, 4, 5)]
        await asyncio.sleep(0.1)
        gate.set()
        results = await asyncio.gather(first, *rest)
        assert calls == [2, 7, 5]                # 3 + 4 merged; 5 more would pass max_images
        assert merged == [1, 2, 1]               # requests per call
        calls.clear()
        result = await batcher(random_images(25, seed=25))   # more than max_images: split, in order
        assert calls == [10, 10, 5] and np.array_equal(result, random_images(25, seed=25).reshape(25, -1)[:, :3])
        for n, result in zip((2, 3, 4, 5), results):
            assert np.array_equal(result, random_images(n, seed=1 if n == 2 else n).reshape(n, -1)[:, :3])
        start = time.perf_counter()
        await batcher(random_images(1))          # alone: at once
        return time.perf_counter() - start

    assert run_batcher(scenario()) < 0.5


def test_small_calls_go_before_bulk_ones_and_do_not_count_their_wait():
    calls, gate = [], threading.Event()

    def model(images):
        calls.append(len(images))
        gate.wait(5)
        return np.zeros((len(images), 3), np.float32)

    async def scenario():
        batcher = Batcher(model, max_images=5, max_latency_s=60, small_images=2)
        busy = asyncio.create_task(batcher(random_images(5)))
        await asyncio.sleep(0.1)
        bulk = asyncio.create_task(batcher(random_images(5)))
        await asyncio.sleep(0.05)
        small = asyncio.create_task(batcher(random_images(1)))   # arrives last, runs first
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(busy, bulk, small)
        assert calls == [5, 1, 5]
        batcher.img_per_s, batcher.waiting[False] = 10.0, 1000   # as if 100 s of bulk work were queued
        with pytest.raises(Overloaded):
            await batcher(random_images(5))
        await batcher(random_images(1))   # a small call does not wait behind bulk work: admitted

    run_batcher(scenario())


def test_only_calls_expected_to_be_quick_run_on_the_event_loop():
    threads = []

    def model(images):   # 1 ms per image
        threads.append(threading.current_thread().name)
        time.sleep(0.001 * len(images))
        return np.zeros((len(images), 3), np.float32)

    async def scenario(inline_s):
        threads.clear()
        batcher = Batcher(model, max_images=100, max_latency_s=60, inline_s=inline_s)
        for n in (20, 2, 30):   # the first call: no rate known yet
            await batcher(random_images(n))
        return [name == threading.current_thread().name for name in threads]

    assert run_batcher(scenario(0.005)) == [False, True, False]   # 2 images ~2 ms: on the loop; 30 ~30 ms: not
    assert run_batcher(scenario(0.0)) == [False, False, False]    # the default: every call on the model thread


def test_the_batcher_refuses_what_would_wait_too_long_and_passes_errors_on():
    def slow(images):
        time.sleep(0.05 * len(images) / 10)
        return np.zeros((len(images), 3), np.float32)

    async def scenario():
        batcher = Batcher(slow, max_images=100, max_latency_s=0.2)
        await batcher(random_images(20))         # learns ~200 img/s
        rate = batcher.img_per_s
        await batcher(random_images(2))          # too small a call to judge the rate by
        assert batcher.img_per_s == rate
        busy = asyncio.create_task(batcher(random_images(100)))   # ~0.5 s of work queued
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match=r"wait about .* CIFAR100_MAX_LATENCY_MS=200"):
            await batcher(random_images(1))
        await busy

        def broken(images):
            raise RuntimeError("CUDA error")
        failing = Batcher(broken, max_images=100, max_latency_s=1)
        with pytest.raises(RuntimeError, match="CUDA error"):
            await failing(random_images(1))

    run_batcher(scenario())
