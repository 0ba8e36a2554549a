"""Large images: what decoding them costs the front's memory, whether it comes back, and what small requests wait.

    python -m bench.decode_memory [--images 4] [--side 6300] [--rounds 2] [--env NAME=VALUE ...] [--json FILE]

Starts the service (the latest model of --home's store; default: a random-weight Part 1 model, made as bench.soak
makes it) on ONNX Runtime. Makes one --side × --side RGBA PNG that compresses well (~170 KB at 6300², just under
the 40 Mpx limit: what a hostile or careless client sends), then, --rounds times, POSTs it to /classify as the raw body
from --images clients at once, while one client sends one-PNG (32×32) /classify requests back to back. Samples the
front's (Classifier's) resident memory every 0.1 s. Reports the large requests' answers by status (a 503 carries
Retry-After), the small requests' p50/p95, the front's memory: idle (before), peak, and --settle seconds after the
last large answer (targets: peak ≤ +600 MB over idle, back within 100 MB of idle), and the log lines written
(tracebacks, errors).
"""
import argparse
import collections
import concurrent.futures
import io
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import requests
from PIL import Image

from bench.overload import log_lines
from bench.soak import tiny_store
from serving.local_server import LocalServer, process_label
from training.contract import random_images
from training.files import write_json

MB = 2**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.decode_memory", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__[__doc__.index("\n"):])
    p.add_argument("--images", type=int, default=4, help="large images sent at once (default %(default)s)")
    p.add_argument("--side", type=int, default=6300, help="their width and height in pixels (default %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="bursts, one after another (default %(default)s)")
    p.add_argument("--settle", type=float, default=10, help="seconds after the last burst to read memory again")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="more settings for the service")
    p.add_argument("--home", help="BENTOML_HOME whose latest model to serve (default: a random-weight Part 1 model)")
    p.add_argument("--out", default="build/decode_memory", help="folder for the server log and the model")
    p.add_argument("--json", help="write the figures here (default OUT/decode_memory.json)")
    return p.parse_args(argv)


def large_png(side):
    """An RGBA PNG of side × side that deflate squeezes to almost nothing: gradients, a transparent corner."""
    pixels = np.zeros((side, side, 4), np.uint8)
    pixels[..., 0] = (np.arange(side) % 256)[None, :]
    pixels[..., 1] = (np.arange(side) % 256)[:, None]
    pixels[..., 3] = 255
    pixels[:side // 8, :side // 8, 3] = 0
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, "PNG", compress_level=9)
    return buffer.getvalue()


class FrontMemory(threading.Thread):
    """Samples the Classifier process's RSS every 0.1 s: the peak, and the latest."""

    def __init__(self, server):
        super().__init__(daemon=True)
        root = psutil.Process(server.process.pid)
        self.front = next(p for p in root.children(recursive=True) if process_label(p) == "Classifier")
        self.peak = self.now = self.front.memory_info().rss
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(0.1):
            self.now = self.front.memory_info().rss
            self.peak = max(self.peak, self.now)


def post(session, url, body, content_type):
    start = time.perf_counter()
    try:
        r = session.post(url, data=body, headers={"Content-Type": content_type}, timeout=300)
        return r.status_code, r.text[:200], r.headers.get("Retry-After"), time.perf_counter() - start
    except requests.RequestException as e:
        return "no answer", type(e).__name__, None, time.perf_counter() - start


def main(argv=None):
    a = parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    home = Path(a.home).expanduser() if a.home else tiny_store(out)
    env = {"CIFAR100_BACKEND": "onnx", **dict(e.split("=", 1) for e in a.env)}
    big = large_png(a.side)
    small = io.BytesIO()
    Image.fromarray(random_images(1)[0]).save(small, "PNG")
    small = small.getvalue()

    run_dir = tempfile.mkdtemp(prefix="decode-memory-", dir=out)
    with LocalServer(home, env, run_dir=run_dir, ready_timeout=300) as server:
        url = f"{server.url}/classify"
        session = requests.Session()
        for _ in range(20):   # warm: the front's allocators, the model's first calls
            post(session, url, small, "image/png")
        time.sleep(2)
        memory = FrontMemory(server)
        idle = memory.now
        log_before = log_lines(server.log_path.read_text(errors="replace"))
        memory.start()
        large, latencies = [], []
        with concurrent.futures.ThreadPoolExecutor(a.images) as pool:
            for _ in range(a.rounds):
                futures = [pool.submit(post, requests.Session(), url, big, "image/png") for _ in range(a.images)]
                while not all(f.done() for f in futures):
                    status, text, _, seconds = post(session, url, small, "image/png")
                    latencies.append(seconds if status == 200 else float("inf"))
                large += [f.result() for f in futures]
        last_answer = time.monotonic()
        time.sleep(max(0.0, a.settle - (time.monotonic() - last_answer)))
        settled = memory.front.memory_info().rss
        memory.done.set()
        memory.join()
        log_after = log_lines(server.log_path.read_text(errors="replace"))

    by_status = collections.Counter(str(s) for s, *_ in large)
    result = {
        "config": {k: v for k, v in vars(a).items() if k != "json"}, "service_env": env,
        "machine": f"{os.cpu_count()} cores", "png_bytes": len(big),
        "large": {"by_status": dict(by_status),
                  "messages": dict(collections.Counter(f"{s}: {t}" for s, t, *_ in large if s != 200).most_common(3)),
                  "refusals_with_retry_after": sum(1 for s, _, r, _ in large if s == 503 and r and r.isdigit()),
                  "seconds": {"p50": round(float(np.median([x[3] for x in large])), 2),
                              "max": round(max(x[3] for x in large), 2)}},
        "small": {"requests": len(latencies), "failed": sum(1 for x in latencies if x == float("inf")),
                  "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1),
                  "p95_ms": round(1000 * float(np.percentile(latencies, 95)), 1)},
        "front_rss_mb": {"idle": round(idle / MB), "peak_over_idle": round((memory.peak - idle) / MB),
                         f"{a.settle:g}_s_after_over_idle": round((settled - idle) / MB)},
        "log_lines": {k: log_after[k] - log_before[k] for k in log_after}}
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=1))
    write_json(a.json or out / "decode_memory.json", result)


if __name__ == "__main__":
    main()
