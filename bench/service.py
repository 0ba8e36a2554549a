"""Service overhead: the raw backend vs the same backend behind `bentoml serve`, on this machine.

    python -m bench.service [--backend onnx] [--batch 1024] [--requests 8] [--in-flight 4] [--json bench/service.json]

Measures, with the server's CPU time per request by process (front = Classifier, Model) beside each figure:
  bulk       raw backend img/s on BATCH-image uint8 batches, alternating round by round with /classify_batch
             (BATCH images per request, IN_FLIGHT in flight), the .npy sent as a multipart upload and as the raw
             body (Content-Type application/x-npy); served/raw is the median of the per-round ratios
  classify   /classify latency (p50/p95) for one 32×32 PNG at concurrency 1, as a multipart upload and as the raw
             body (Content-Type image/png)
  after bulk 50 sequential one-image .npy requests to /classify_batch right after the bulk phase (p50/p95)
  lone 256   one client sending 256-image .npy requests one after another: p50, against the raw backend's time
Uses the latest model in the store of $BENTOML_HOME (`python -m serving.up` makes one). CIFAR100_* variables
reach the server (e.g. CIFAR100_PROCESSES=1). On a shared machine, run it when it is otherwise idle.
"""
import argparse
import collections
import concurrent.futures
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import requests
from PIL import Image

from serving.local_server import LocalServer, process_label
from training.contract import MODEL_NAME, npy_bytes, random_images
from training.files import write_json

BODIES = ("multipart", "npy")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.service", description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="onnx", choices=["torch", "onnx", "tensorrt", "auto"])
    p.add_argument("--batch", type=int, default=1024, help="images per /classify_batch request")
    p.add_argument("--requests", type=int, default=8, help="/classify_batch requests (and raw backend calls) per round")
    p.add_argument("--in-flight", type=int, default=4)
    p.add_argument("--classify-requests", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5, help="raw and served measurements alternate this many times")
    p.add_argument("--bodies", default=",".join(BODIES), help="request bodies to measure: multipart,npy (default both)")
    p.add_argument("--json", default="bench/service.json", help="where to write the figures (default %(default)s)")
    args = p.parse_args(argv)
    args.bodies = args.bodies.split(",")
    if not args.bodies or set(args.bodies) - set(BODIES):
        p.error(f"--bodies takes a comma-separated selection of {', '.join(BODIES)}")
    return args


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


def request_body(kind, npy):
    """(body, headers) of a /classify_batch request carrying the .npy bytes NPY, as KIND (multipart | npy)."""
    return multipart("images", "x.npy", npy) if kind == "multipart" else (npy, {"Content-Type": "application/x-npy"})


def service_batch(url, body, headers, requests_n, in_flight, batch):
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


def latency_ms(url, path, body, headers, n, warm=10):
    """p50 and p95 in ms of N sequential requests (after WARM more)."""
    session = requests.Session()
    times = []
    for i in range(n + warm):
        start = time.perf_counter()
        r = session.post(f"{url}{path}", data=body, headers=headers, timeout=60)
        r.raise_for_status()
        if i >= warm:
            times.append(time.perf_counter() - start)
    return {"p50": round(1000 * float(np.percentile(times, 50)), 2), "p95": round(1000 * float(np.percentile(times, 95)), 2)}


def main(argv=None):
    args = parse_args(argv)
    tag, path = model_dir()
    images = random_images(args.batch)
    from serving.backends import load_backend
    backend = load_backend(args.backend, path)
    backend.warmup((1, 256, args.batch))
    described = backend.describe()
    npy = npy_bytes(images)
    png = io.BytesIO()
    Image.fromarray(random_images(1)[0]).save(png, "PNG")
    png_bodies = {"multipart": multipart("images", "a.png", png.getvalue()),
                  "raw": (png.getvalue(), {"Content-Type": "image/png"})}
    home = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
    result = {"model": tag, **described, "machine": f"{platform.processor() or platform.machine()}, "
              f"{len(os.sched_getaffinity(0))} cores", "batch": args.batch, "in_flight": args.in_flight,
              "server_env": {k: v for k, v in os.environ.items() if k.startswith("CIFAR100_")}}
    with LocalServer(home, {"CIFAR100_BACKEND": args.backend, "CIFAR100_MODEL": tag},
                     run_dir=tempfile.mkdtemp(prefix="bench-service-"), ready_timeout=300) as server:
        url = server.url
        for kind, body in png_bodies.items():
            cpu = server_cpu_seconds(server)
            result[f"classify_{kind}_ms"] = latency_ms(url, "/classify", *body, args.classify_requests)
            # CPU per request is steadier than latency on a shared machine: it measures the work, not the wait.
            result[f"classify_{kind}_server_cpu_ms"] = cpu_ms_since(server, cpu, args.classify_requests + 10)

        raws, raw_cpu = [], []
        served = {kind: [] for kind in args.bodies}
        served_cpu = {kind: collections.Counter() for kind in args.bodies}
        for _ in range(args.rounds):
            img_per_s, cpu_ms = raw_backend(backend, images, args.requests)
            raws.append(img_per_s)
            raw_cpu.append(cpu_ms)
            for kind in args.bodies:   # CPU counted per body kind, from its own rounds only
                cpu = server_cpu_seconds(server)
                served[kind].append(service_batch(url, *request_body(kind, npy), args.requests, args.in_flight,
                                                  args.batch))
                served_cpu[kind].update(cpu_ms_since(server, cpu, args.requests + 1))
        result["raw_backend_img_per_s"] = round(statistics.median(raws))
        result["raw_backend_cpu_ms_per_call"] = round(statistics.median(raw_cpu), 1)
        result["rounds"] = {"raw": [round(x) for x in raws], **{k: [round(x) for x in v] for k, v in served.items()}}
        for kind in args.bodies:
            # Rounds alternate, so each (raw, served) pair saw about the same background load.
            result[f"bulk_{kind}"] = {
                "img_per_s": round(statistics.median(served[kind])),
                "served_over_raw": round(statistics.median([s / r for s, r in zip(served[kind], raws)]), 3),
                "server_cpu_ms_per_request": {k: round(v / args.rounds, 1) for k, v in served_cpu[kind].items()}}

        one = request_body(args.bodies[-1], npy_bytes(images[:1]))   # straight after the bulk phase
        result["after_bulk_one_image_ms"] = latency_ms(url, "/classify_batch", *one, 50, warm=0)
        result["classify_ms_after_bulk"] = latency_ms(url, "/classify", *png_bodies["multipart"],
                                                      args.classify_requests // 4)
        lone = request_body(args.bodies[-1], npy_bytes(images[:256]))
        result["lone_256_ms"] = latency_ms(url, "/classify_batch", *lone, 30, warm=5)
        _, raw_ms = raw_backend(backend, images[:256], 10)   # CPU ms per call is about the call's time on 2 threads
        start = time.perf_counter()
        for _ in range(10):
            backend(images[:256])
        result["lone_256_raw_backend_ms"] = round(100 * (time.perf_counter() - start), 2)
        result["model_stats"] = requests.get(f"{url}/info", timeout=10).json()["stats"]

    rows = [(f"raw backend, batch {args.batch} (median)", f"{result['raw_backend_img_per_s']:,} img/s, "
             f"{result['raw_backend_cpu_ms_per_call']:.0f} ms CPU per call")]
    for kind in args.bodies:
        b = result[f"bulk_{kind}"]
        cpu = b["server_cpu_ms_per_request"]
        rows.append((f"/classify_batch {kind}, {args.batch}/request, {args.in_flight} in flight",
                     f"{b['img_per_s']:,} img/s, served/raw {b['served_over_raw']:.2f}; CPU per request: front "
                     f"{cpu.get('Classifier', 0):.0f} ms, Model {cpu.get('Model', 0):.0f} ms"))
    for kind in png_bodies:
        latency, c = result[f"classify_{kind}_ms"], result[f"classify_{kind}_server_cpu_ms"]
        rows.append((f"/classify one 32×32 PNG {kind}, concurrency 1", f"p50 {latency['p50']:.1f} ms, p95 "
                     f"{latency['p95']:.1f} ms; CPU per request: front {c.get('Classifier', 0):.1f} ms, "
                     f"Model {c.get('Model', 0):.1f} ms"))
    rows += [("one-image .npy right after bulk (50 in a row)", f"p50 {result['after_bulk_one_image_ms']['p50']:.1f} ms, "
              f"p95 {result['after_bulk_one_image_ms']['p95']:.1f} ms"),
             ("/classify after bulk", f"p50 {result['classify_ms_after_bulk']['p50']:.1f} ms"),
             ("one client, 256-image .npy requests", f"p50 {result['lone_256_ms']['p50']:.1f} ms (raw backend "
              f"{result['lone_256_raw_backend_ms']:.1f} ms)")]
    print(f"\n{tag} on {described['backend']} ({described['device']}, {described['precision']}), {result['machine']}")
    for name, value in rows:
        print(f"  {name:<52} {value}")
    write_json(args.json, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
