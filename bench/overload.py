"""Overload: a burst of bulk uploads while interactive requests run. What do the clients get, what does the server hold?

    python -m bench.overload [--bulk-clients 64] [--bulk-images 4096] [--classify-requests 200] [--json FILE]
    python -m bench.overload --bulk-clients 640 --max-rss-gb 8          # the 10× burst, under a memory watchdog

Starts the service (the latest model of --home's store; default: a random-weight Part 1 model, made as bench.soak
makes it) on ONNX Runtime with CIFAR100_MAX_LATENCY_MS (--max-latency-ms), then at once: --bulk-clients threads
each POST one .npy of --bulk-images images to /classify_batch, while one client sends --classify-requests one-PNG
/classify requests back to back. Reports the answers by status per endpoint (with their messages and whether a
refusal carried Retry-After), how long refused requests took to be answered, /classify p50/p95 during the burst,
the peak resident memory of the server's processes (sampled every 0.2 s; a watchdog stops the server when it
passes --max-rss-gb), the log lines written per refused request (and traceback lines), and whether the server is
ready afterwards.
"""
import argparse
import collections
import concurrent.futures
import io
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import requests
from PIL import Image

from bench.service import multipart, request_body
from bench.soak import tiny_store
from serving.local_server import LocalServer, process_label, stop_process_group
from training.contract import npy_bytes, random_images
from training.files import write_json

GB = 2**30


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__[__doc__.index("\n"):])
    p.add_argument("--bulk-clients", type=int, default=64, help="concurrent bulk uploads (default %(default)s)")
    p.add_argument("--bulk-images", type=int, default=4096, help="images per bulk upload (default %(default)s)")
    p.add_argument("--classify-requests", type=int, default=200, help="one-PNG /classify requests (default %(default)s)")
    p.add_argument("--max-latency-ms", type=int, default=2000, help="the service's CIFAR100_MAX_LATENCY_MS")
    p.add_argument("--body", choices=["multipart", "npy"], default="multipart",
                   help="how the bulk uploads carry their .npy (default %(default)s)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="more settings for the service")
    p.add_argument("--max-rss-gb", type=float, default=8.0, help="watchdog: stop the server above this (default %(default)s)")
    p.add_argument("--home", help="BENTOML_HOME whose latest model to serve (default: a random-weight Part 1 model)")
    p.add_argument("--out", default="build/overload", help="folder for the server log and the model (default %(default)s)")
    p.add_argument("--json", help="write the figures here (default OUT/overload.json)")
    return p.parse_args(argv)


class Watchdog(threading.Thread):
    """Samples the resident memory of the server's process tree; stops the server above the limit."""

    def __init__(self, server, limit_bytes):
        super().__init__(daemon=True)
        self.server, self.limit, self.peak, self.tripped = server, limit_bytes, {}, False
        self.done = threading.Event()

    def run(self):
        root = psutil.Process(self.server.process.pid)
        while not self.done.wait(0.2):
            try:
                procs = [root, *root.children(recursive=True)]
                rss = {}
                for proc in procs:
                    rss[process_label(proc)] = rss.get(process_label(proc), 0) + proc.memory_info().rss
            except psutil.Error:
                continue
            rss["total"] = sum(rss.values())
            for name, value in rss.items():
                self.peak[name] = max(self.peak.get(name, 0), value)
            if rss["total"] > self.limit:
                self.tripped = True
                stop_process_group(self.server.process.pid, grace=2)
                return


def post(session, url, body, headers):
    start = time.perf_counter()
    try:
        r = session.post(url, data=body, headers=headers, timeout=300)
        status, text, retry_after = r.status_code, r.text, r.headers.get("Retry-After")
    except requests.RequestException as e:
        status, text, retry_after = "no answer", type(e).__name__, None
    return status, text, retry_after, time.perf_counter() - start


def summarise(results):
    by_status = collections.Counter(str(s) for s, _, _, _ in results)
    messages = collections.Counter()
    for status, text, _, _ in results:
        if status != 200:
            try:
                messages[f"{status}: {json.loads(text)['error']}"[:200]] += 1
            except (ValueError, KeyError, TypeError):
                messages[f"{status}: {text}"[:200]] += 1
    refused = [r for r in results if r[0] == 503]
    return {"requests": len(results), "by_status": dict(by_status), "messages": dict(messages.most_common(5)),
            "refusals_with_retry_after": sum(1 for r in refused if r[2] and r[2].isdigit()),
            "refused_answer_s": {"p50": round(statistics.median(r[3] for r in refused), 3),
                                 "max": round(max(r[3] for r in refused), 3)} if refused else None}


def log_lines(text):
    lines = text.splitlines()
    return {"warning": sum(" [WARNING] " in ln for ln in lines), "error": sum(" [ERROR] " in ln for ln in lines),
            "traceback": sum(ln.startswith("Traceback") for ln in lines)}


def main(argv=None):
    a = parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    home = Path(a.home).expanduser() if a.home else tiny_store(out)
    env = {"CIFAR100_BACKEND": "onnx", "CIFAR100_MAX_LATENCY_MS": a.max_latency_ms,
           **dict(e.split("=", 1) for e in a.env)}
    bulk_body, bulk_headers = request_body(a.body, npy_bytes(random_images(a.bulk_images)))
    png = io.BytesIO()
    Image.fromarray(random_images(1)[0]).save(png, "PNG")
    small_body, small_headers = multipart("images", "a.png", png.getvalue())

    server = LocalServer(home, env, run_dir=tempfile.mkdtemp(prefix="overload-", dir=out), ready_timeout=300)
    log_before = log_lines(server.log_path.read_text(errors="replace"))
    watchdog = Watchdog(server, a.max_rss_gb * GB)
    watchdog.start()
    bulk, small = [], []
    started = time.perf_counter()
    try:
        with concurrent.futures.ThreadPoolExecutor(a.bulk_clients) as pool:
            sessions = [requests.Session() for _ in range(a.bulk_clients)]
            futures = [pool.submit(post, s, f"{server.url}/classify_batch", bulk_body, bulk_headers) for s in sessions]
            time.sleep(0.5)   # the uploads are on their way
            session = requests.Session()
            for _ in range(a.classify_requests):
                small.append(post(session, f"{server.url}/classify", small_body, small_headers))
            bulk = [f.result() for f in futures]
        seconds = time.perf_counter() - started
        time.sleep(1)
        ready_after = server.ready()
    finally:
        watchdog.done.set()
        watchdog.join()
        log_text = server.log_path.read_text(errors="replace")
        server.stop()
    log_after = log_lines(log_text)
    new_lines = {k: log_after[k] - log_before[k] for k in log_after}
    refused = sum(1 for r in bulk + small if r[0] == 503)
    ok_small = [r[3] for r in small if r[0] == 200]
    result = {
        "config": {k: v for k, v in vars(a).items() if k not in ("json",)}, "service_env": env,
        "machine": f"{os.cpu_count()} cores", "seconds": round(seconds, 1),
        "bulk": summarise(bulk), "classify": summarise(small),
        "classify_ok_share": len(ok_small) / max(1, len(small)),
        "classify_latency_ms": {"p50": round(1000 * np.percentile(ok_small, 50), 1),
                                "p95": round(1000 * np.percentile(ok_small, 95), 1)} if ok_small else None,
        "peak_rss_mb": {k: round(v / 2**20) for k, v in watchdog.peak.items()},
        "watchdog_stopped_the_server": watchdog.tripped,
        "log_lines": new_lines, "log_lines_per_refusal": {k: round(v / refused, 1) for k, v in new_lines.items()}
        if refused else None, "ready_after": ready_after,
        "any_500": any(str(r[0]).startswith("5") and r[0] != 503 for r in bulk + small)}
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=1))
    write_json(a.json or out / "overload.json", result)


if __name__ == "__main__":
    main()
