"""Model workers: one per visible GPU by default, each bound to its own device; a real `bentoml serve` with two CPU
workers: both serve, the answers are the one-worker service's, /info and readiness see every worker; the clients
size their concurrency from the worker count; a killed worker costs no request while the other answers."""
import collections
import concurrent.futures
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from serving import devices, settings, workers
from training.checkpoint import load_classifier
from training.contract import npy_bytes

RNG = np.random.default_rng(3)


def classify_batch(url, images, session=requests):
    """POST IMAGES to /classify_batch as the raw .npy body."""
    return session.post(f"{url}/classify_batch", data=npy_bytes(images), headers={"Content-Type": "application/x-npy"},
                        timeout=60)


def one_image():
    return RNG.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)


def test_worker_count_is_one_per_visible_gpu_unless_set(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5,7")
    assert devices.visible_gpus() == ["2", "5", "7"] and devices.worker_count() == 3
    assert devices.worker_count(2) == 2   # CIFAR100_MODEL_WORKERS (at least 1: tests/test_settings.py)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")   # CUDA's way of saying "no GPU"
    assert devices.visible_gpus() == [] and devices.worker_count() == 1


@pytest.fixture
def environ(monkeypatch):
    """A copy of the environment for bind_worker to change, and settings read from it; both dropped after the test."""
    monkeypatch.setattr(os, "environ", dict(os.environ))
    settings.get.cache_clear()
    yield os.environ
    settings.get.cache_clear()


def test_each_worker_binds_to_its_own_gpu_round_robin(environ):
    assert [devices.device_for_worker(i, ["2", "5"]) for i in (1, 2, 3, 4)] == ["2", "5", "2", "5"]
    assert devices.device_for_worker(1, []) is None
    environ["CUDA_VISIBLE_DEVICES"] = "2,5"
    assert devices.bind_worker(2, 2, cores=16) == {"gpu": "5", "device": "cuda:0"}
    assert environ["CUDA_VISIBLE_DEVICES"] == "5"   # the only GPU this worker's backends will see


def test_on_the_cpu_workers_share_the_cores(environ):
    environ["CUDA_VISIBLE_DEVICES"] = ""
    environ.pop("CIFAR100_CPU_THREADS", None)
    assert devices.bind_worker(1, 2, cores=8) == {"device": "cpu", "threads": 4}
    from serving.backends import cpu_threads
    assert cpu_threads() == 4   # what the worker's backends use
    settings.get.cache_clear()
    environ["CIFAR100_CPU_THREADS"] = "3"   # set: every worker takes that many
    assert devices.bind_worker(2, 2, cores=8) == {"device": "cpu", "threads": 3} and cpu_threads() == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: binding is checked in a fresh process")
def test_a_bound_worker_sees_exactly_its_gpu():
    code = ("from serving import devices; import torch, os\n"
            "got = devices.bind_worker(1, 1, cores=1)\n"
            "print(got['gpu'], torch.cuda.device_count(), os.environ['CUDA_VISIBLE_DEVICES'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    gpu, count, visible = done.stdout.split()
    assert count == "1" and gpu == visible


def test_when_nvml_fails_cuda_counts_the_gpus(environ, monkeypatch, tmp_path):
    """Without NVML (nvidia-ml-py missing, or its library failing) a GPU host still gets one worker per GPU, each
    bound to its own, not one worker labelled "cpu"; without an NVIDIA driver nothing is started to ask."""
    environ.pop("CUDA_VISIBLE_DEVICES", None)
    monkeypatch.setitem(sys.modules, "pynvml", None)     # `import pynvml` fails
    monkeypatch.setattr(devices, "NVIDIA_DRIVER", tmp_path)   # a driver is loaded
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 2)
    assert devices.visible_gpus() == ["0", "1"] and devices.worker_count() == 2
    assert devices.bind_worker(2, 2, cores=16) == {"gpu": "1", "device": "cuda:0"}
    environ.pop("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(devices, "NVIDIA_DRIVER", tmp_path / "absent")
    monkeypatch.setattr(devices, "cuda_device_count", lambda: pytest.fail("asked CUDA without a driver"))
    assert devices.visible_gpus() == [] and devices.bind_worker(1, 1, cores=2)["device"] == "cpu"


def test_cuda_is_asked_in_a_child_process():
    assert devices.cuda_device_count() == torch.cuda.device_count()
    assert not torch.cuda.is_initialized()


def test_readiness_needs_every_worker_running_and_statistics_add_up():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    states = [{"worker": 1, "pid": os.getpid(), "ready": True,
               "stats": {"model_calls": 2, "images": 10, "largest_call": 8, "seconds": 0.5}},
              {"worker": 2, "pid": os.getpid(), "ready": False}]
    assert not workers.all_ready(states, 2) and workers.all_ready(states, 1)
    assert not workers.all_ready([{**states[0], "pid": gone.pid}], 1)   # killed, its file not yet replaced
    assert workers.total_stats(states) == {"model_calls": 2, "images": 10, "largest_call": 8, "seconds": 0.5}


@pytest.fixture(scope="module")
def two_workers(start_server):
    return start_server({"CIFAR100_BACKEND": "onnx", "CIFAR100_MODEL_WORKERS": 2})


def metrics(url):
    """The service's counts by model worker, from a scrape of /metrics."""
    from loadtest.report import worker_counts
    return worker_counts(requests.get(f"{url}/metrics", timeout=10).text)


def test_metrics_count_each_workers_model_calls(two_workers):
    """The first test on its server: /metrics shows only the warm-up, then exactly the images sent, each worker's
    series agreeing with the statistics it reports in /info."""
    start = metrics(two_workers)
    assert set(start) == {"1", "2"}   # each worker's series, there from its start
    assert sum(c["images"] for c in start.values()) == sum(c["calls"] for c in start.values()) == 1   # the warm-up
    sizes = RNG.integers(1, 40, 40)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:   # concurrent: both workers take some
        assert all(r.ok for r in pool.map(lambda n: classify_batch(two_workers, RNG.integers(0, 256, (n, 32, 32, 3),
                                                                                           dtype=np.uint8)), sizes))
    counts = metrics(two_workers)
    assert sum(c["images"] for c in counts.values()) == sizes.sum() + 1
    assert all(c["calls"] > 0 for c in counts.values()), counts
    time.sleep(workers.WRITE_EVERY_S + 0.2)   # each worker's statistics file is at most this old
    for w in requests.get(f"{two_workers}/info", timeout=10).json()["workers"]:
        c = counts[str(w["worker"])]
        assert (c["calls"], c["timed_calls"], c["images"]) == (w["stats"]["model_calls"],) * 2 + (w["stats"]["images"],)
        assert c["seconds"] == pytest.approx(w["stats"]["seconds"])


def test_two_workers_both_serve_and_answer_as_one_does(two_workers, model_dir):
    info = requests.get(f"{two_workers}/info", timeout=10).json()
    assert [(w["worker"], w["ready"], w["device"]) for w in info["workers"]] == [
        (1, True, {"device": "cpu", "threads": 1}), (2, True, {"device": "cpu", "threads": 1})]   # 2 cores here
    assert len({w["pid"] for w in info["workers"]}) == 2
    model, _ = load_classifier(model_dir / "checkpoint.pt")
    batches = [RNG.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8) for _ in range(60)]
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=8))

    def classify(images):
        return classify_batch(two_workers, images, session).json()["class_ids"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(classify, batches))
    with torch.inference_mode():
        for images, answer in zip(batches, answers):
            assert answer == model(torch.from_numpy(images)).argmax(1).tolist()
    time.sleep(workers.WRITE_EVERY_S + 0.2)
    info = requests.get(f"{two_workers}/info", timeout=10).json()
    calls = [w["stats"]["model_calls"] for w in info["workers"]]
    assert all(c > 0 for c in calls), calls   # the load reached both
    assert info["stats"]["model_calls"] == sum(calls) and info["stats"]["images"] >= 60 * 32
    assert requests.get(f"{two_workers}/readyz", timeout=10).status_code == 200


def test_the_clients_keep_every_worker_busy(two_workers, tmp_path):
    from loadtest.__main__ import USERS_PER_WORKER, model_workers
    from serving.score import IN_FLIGHT_PER_WORKER, ServiceScorer
    assert model_workers(two_workers) == 2 and USERS_PER_WORKER == 8
    scorer = ServiceScorer(two_workers)
    scorer.describe()
    assert scorer.model_workers == 2 and IN_FLIGHT_PER_WORKER * scorer.model_workers == 8


def test_killed_workers_cost_no_request_while_another_answers_then_a_503_with_retry_after(two_workers):
    """Run last in this module: it kills the workers (BentoML restarts them) and waits until both are back."""
    def worker_pids():
        return {w["worker"]: (w["pid"], w["ready"]) for w in requests.get(f"{two_workers}/info", timeout=10).json()["workers"]}

    def back_after(before, index):   # the worker restarted: a new pid, and ready
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            pid, ready = worker_pids().get(index, (before, False))   # none: its new process has not written yet
            if pid != before and ready:
                return
            time.sleep(0.2)
        pytest.fail(f"model worker {index} did not come back in 90 s")

    def traffic(until):
        """The statuses of one-image requests sent one after another until UNTIL is set."""
        statuses, session = collections.Counter(), requests.Session()
        while not until.is_set():
            statuses[classify_batch(two_workers, one_image(), session).status_code] += 1
        return statuses

    before, counted = worker_pids(), metrics(two_workers)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        until = threading.Event()
        running = [pool.submit(traffic, until) for _ in range(2)]
        try:
            time.sleep(0.5)
            os.kill(before[1][0], signal.SIGKILL)
            back_after(before[1][0], 1)
        finally:
            until.set()
        statuses = sum((f.result() for f in running), collections.Counter())
    assert set(statuses) == {200} and statuses[200] > 20, statuses   # worker 2 took them all

    before = worker_pids()
    for pid, _ in before.values():
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    assert requests.get(f"{two_workers}/readyz", timeout=10).status_code == 503   # out of a load balancer's rotation
    refused = classify_batch(two_workers, one_image())
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert refused.json()["error"].startswith("no model worker available")
    for index, (pid, _) in before.items():
        back_after(pid, index)
    assert requests.get(f"{two_workers}/readyz", timeout=10).status_code == 200
    again = classify_batch(two_workers, one_image())
    assert again.status_code == 200 and len(again.json()["class_ids"]) == 1
    # Prometheus counters keep counting across the restarts (the killed processes' files stay in BentoML's folder);
    # /info's statistics are the new processes' only. A request retried after its worker died may count twice.
    images = {w: c["images"] - counted[w]["images"] for w, c in metrics(two_workers).items()}
    assert sum(images.values()) >= statuses[200] + 1
    assert requests.get(f"{two_workers}/info", timeout=10).json()["stats"]["images"] < sum(images.values())


def test_a_stopped_server_leaves_no_folder_behind(model_store, tmp_path):
    from serving.local_server import LocalServer
    with LocalServer(model_store, {"CIFAR100_BACKEND": "onnx", "CIFAR100_MODEL_WORKERS": 2}, run_dir=tmp_path) as server:
        folder = Path(tempfile.gettempdir()) / f"cifar100-serve-{server.process.pid}"   # named after the arbiter
        assert sorted(p.name for p in folder.iterdir()) == ["model-1.sock", "model-2.sock", "worker-1.json",
                                                             "worker-2.json"]
    assert not folder.exists()
