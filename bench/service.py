"""Service overhead: the raw backend vs the same backend behind `bentoml serve`, on this machine.

    python -m bench.service [--backend onnx] [--batch 1024] [--requests 16] [--in-flight 4] [--json bench/service.json]

Measures (1) raw backend img/s on uint8 batches, (2) /classify_batch img/s with BATCH-image .npy uploads and
IN_FLIGHT requests in flight, (3) /classify latency (p50/p95) for one 32×32 PNG at concurrency 1 and the
server CPU time (all its processes) per such request.
Uses the latest model in the store of $BENTOML_HOME (`python -m serving.up` makes one).
Targets: the service within 25% of the raw backend for batch scoring; /classify p50 < 20 ms.
On a shared machine, run it when it is otherwise idle: raw and served rounds alternate to pair up the noise.
"""
import argparse
import collections
import concurrent.futures
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import requests
from PIL import Image

from serving.local_server import LocalServer, process_label
from training.contract import MODEL_NAME, random_images
from training.files import write_json



def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.service", description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="onnx", choices=["torch", "onnx", "tensorrt", "auto"])
    p.add_argument("--batch", type=int, default=1024, help="images per /classify_batch request")
    p.add_argument("--requests", type=int, default=8, help="/classify_batch requests (and raw backend calls) per round")
    p.add_argument("--in-flight", type=int, default=4)
    p.add_argument("--classify-requests", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5, help="raw and served measurements alternate this many times")
    p.add_argument("--json", default="bench/service.json", help="where to write the figures (default %(default)s)")
    return p.parse_args(argv)


def model_dir():
    import bentoml
    try:
        model = bentoml.models.get(f"{MODEL_NAME}:latest")
    except bentoml.exceptions.NotFound as e:
        sys.exit(f"error: {e}: `make serve ARGS=--synthetic` (or python -m export all) puts one there; "
                 f"BENTOML_HOME picks another store")
    return str(model.tag), model.path


def raw_backend(backend, images, calls):
    """(img/s, CPU ms per call) of the backend called in this process."""
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        backend(images)
    return calls * len(images) / (time.perf_counter() - start), 1000 * (time.process_time() - cpu) / calls


def multipart(field, filename, data, boundary="cifar100-bench-boundary"):
    """A multipart/form-data body built once, so the client spends no CPU re-encoding 3 MB per request."""
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def service_batch(url, npy_bytes, requests_n, in_flight, batch):
    body, headers = multipart("images", "x.npy", npy_bytes)
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=in_flight))

    def post(_):
        r = session.post(f"{url}/classify_batch", data=body, headers=headers, timeout=300)
        r.raise_for_status()
        return len(r.json()["class_ids"])

    post(0)  # warm
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(in_flight) as pool:
        done = sum(pool.map(post, range(requests_n)))
    assert done == requests_n * batch
    return done / (time.perf_counter() - start)


def server_cpu_seconds(server):
    """User + system CPU seconds so far of the server's processes, by name (Classifier, Model, arbiter)."""
    root = psutil.Process(server.process.pid)
    seconds = collections.Counter()
    for proc in [root, *root.children(recursive=True)]:
        seconds[process_label(proc)] += sum(proc.cpu_times()[:2])
    return seconds


def cpu_ms_since(server, before, requests_n):
    """Server CPU ms per request by process since `before` (a server_cpu_seconds result)."""
    now = server_cpu_seconds(server)
    return {name: round(1000 * (now[name] - before[name]) / requests_n, 2) for name in now}


def classify_latency(url, n):
    buffer = io.BytesIO()
    Image.fromarray(random_images(1)[0]).save(buffer, "PNG")
    body, headers = multipart("images", "a.png", buffer.getvalue())
    session = requests.Session()
    times = []
    for i in range(n + 10):
        start = time.perf_counter()
        r = session.post(f"{url}/classify", data=body, headers=headers, timeout=60)
        r.raise_for_status()
        if i >= 10:  # the first few warm the connection and the batcher
            times.append(time.perf_counter() - start)
    return 1000 * np.percentile(times, 50), 1000 * np.percentile(times, 95)


def main(argv=None):
    args = parse_args(argv)
    tag, path = model_dir()
    images = random_images(args.batch)
    from serving.backends import load_backend
    backend = load_backend(args.backend, path)
    backend.warmup((1, args.batch))
    described = backend.describe()
    buffer = io.BytesIO()
    np.save(buffer, images)
    home = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
    with LocalServer(home, {"CIFAR100_BACKEND": args.backend, "CIFAR100_MODEL": tag},
                     run_dir=tempfile.mkdtemp(prefix="bench-service-"), ready_timeout=300) as server:
        url = server.url
        cpu = server_cpu_seconds(server)
        p50, p95 = classify_latency(url, args.classify_requests)
        # CPU per request is steadier than latency on a shared machine: it measures the work, not the wait.
        classify_cpu = cpu_ms_since(server, cpu, args.classify_requests + 10)
        raws, serveds, raw_cpu = [], [], []
        cpu = server_cpu_seconds(server)
        for _ in range(args.rounds):
            img_per_s, cpu_ms = raw_backend(backend, images, args.requests)
            raws.append(img_per_s)
            raw_cpu.append(cpu_ms)
            serveds.append(service_batch(url, buffer.getvalue(), args.requests, args.in_flight, args.batch))
        batch_cpu = cpu_ms_since(server, cpu, args.rounds * (args.requests + 1))
        raw_cpu_ms = float(np.median(raw_cpu))
        # Rounds alternate, so each (raw, served) pair saw about the same background load: the median of the
        # per-round ratios is the overhead; throughputs are medians too.
        raw, served = float(np.median(raws)), float(np.median(serveds))
        overhead = 100 * float(np.median([r / s - 1 for r, s in zip(raws, serveds)]))
        p50_after, _ = classify_latency(url, args.classify_requests // 4)  # separate batchers: bulk traffic
                                                                           # must not teach /classify to wait
        stats = requests.get(f"{url}/info", timeout=10).json()["stats"]
    result = {"model": tag, **described, "machine": f"{platform.processor() or platform.machine()}, "
              f"{len(os.sched_getaffinity(0))} cores", "batch": args.batch, "in_flight": args.in_flight,
              "raw_backend_img_per_s": round(raw),
              "rounds": {"raw": [round(x) for x in raws], "served": [round(x) for x in serveds]}, "service_classify_batch_img_per_s": round(served),
              "service_overhead_pct": round(overhead, 1),
              "classify_p50_ms": round(p50, 2), "classify_p95_ms": round(p95, 2),
              "classify_server_cpu_ms_per_request": classify_cpu,
              "raw_backend_cpu_ms_per_call": round(raw_cpu_ms, 1), "classify_batch_server_cpu_ms_per_request": batch_cpu,
              "classify_p50_ms_after_bulk": round(p50_after, 2), "model_stats": stats}
    rows = [("raw backend (batch %d, median)" % args.batch, f"{raw:,.0f} img/s"),
            (f"/classify_batch ({args.batch}/request, {args.in_flight} in flight, median)", f"{served:,.0f} img/s"),
            ("service overhead (median of per-round raw/served - 1)", f"{result['service_overhead_pct']}% (target < 25%)"),
            ("/classify one 32×32 PNG, concurrency 1", f"p50 {p50:.1f} ms, p95 {p95:.1f} ms (target p50 < 20 ms)"),
            ("raw backend CPU time per call", f"{raw_cpu_ms:.0f} ms"),
            ("/classify_batch server CPU time per request", f"front {batch_cpu['Classifier']:.0f} ms, Model {batch_cpu['Model']:.0f} ms"),
            ("/classify server CPU time per request", f"front {classify_cpu['Classifier']:.1f} ms, Model {classify_cpu['Model']:.1f} ms"),
            ("/classify p50 again, after the bulk phase", f"{p50_after:.1f} ms")]
    print(f"\n{tag} on {described['backend']} ({described['device']}, {described['precision']}), {result['machine']}")
    for name, value in rows:
        print(f"  {name:<52} {value}")
    write_json(args.json, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
