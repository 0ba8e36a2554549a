"""Run Locust headless against a running CIFAR-100 service and summarise it.

    python -m loadtest --host http://127.0.0.1:3000 --users 8 --run-time 30s --out loadtest-report
    python -m loadtest --host http://127.0.0.1:3000 --tags batch --batch 256 --sweep 1,4,16

Writes to OUT (per user count u): u{u}_stats.csv, u{u}_stats_history.csv, u{u}_failures.csv (Locust),
u{u}_report.html (Locust), u{u}_summary.json, u{u}_timeline.png; with --sweep also sweep.json and
sweep.png (p50/p99 latency against throughput). Prints a table: requests/s, p50/p95/p99 latency,
failures and, from the service's /metrics, its model calls: the requests each merged, images, milliseconds per call
and each model worker's share (how busy it was). Only loopback hosts are allowed.
"""
import argparse
import ipaddress
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import requests

from serving import workers
from serving.access import AccessError, bearer_headers
from training.files import write_json

from . import REFUSED, report

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
MAX_USERS, MAX_SPAWN_RATE, MAX_SECONDS = 256, 100, 1800
USERS_PER_WORKER = 8   # half of them upload images, half send batches


class LoadTestError(Exception):
    pass


def loopback_host(url):
    """The URL if it names this machine (127.0.0.0/8, ::1, localhost); load tests stay local."""
    parsed = urlparse(url)
    host = parsed.hostname or ""
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if parsed.scheme not in ("http", "https") or not local:
        raise LoadTestError(f"--host must be a loopback URL like http://127.0.0.1:3000, got {url!r}")
    return url.rstrip("/")


def seconds(text):
    """'90', '90s', '2m', '1m30s' -> seconds."""
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s?)?", text.strip())
    if not text.strip() or not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 30s, 2m, 1m30s)")
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


def metrics_text(host):
    try:
        response = requests.get(f"{host}/metrics", headers=bearer_headers(), timeout=10)
    except requests.RequestException:
        return ""
    return response.text if response.ok else ""


def wait_ready(host, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(f"{host}/readyz", timeout=5).ok:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise LoadTestError(f"no ready service at {host} (GET /readyz); start it with `bentoml serve` first")
        time.sleep(0.5)


def model_workers(host):
    """The service's number of model workers, from /info; a 401 is a clear error now, rather than every request of
    the run failing with it."""
    try:
        response = requests.get(f"{host}/info", headers=bearer_headers(), timeout=10)
    except AccessError as e:
        raise LoadTestError(str(e)) from None
    if response.status_code == 401:
        raise LoadTestError(f"{host} wants a token (HTTP 401): set CIFAR100_API_TOKEN or CIFAR100_API_TOKEN_FILE")
    try:
        return workers.listed(response.json())
    except ValueError:
        return 1


def run_locust(a, users, out):
    """One headless Locust run with `users` users; returns its summary dict."""
    prefix = out / f"u{users}"
    spawn_rate = min(a.spawn_rate or users, users)
    before, started = metrics_text(a.host), time.monotonic()
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
               "--host", a.host, "--users", str(users), "--spawn-rate", str(spawn_rate),
               "--run-time", f"{a.run_time}s", "--stop-timeout", "10", "--csv", str(prefix), "--csv-full-history",
               "--html", f"{prefix}_report.html", "--loglevel", "WARNING"]
    if a.tags:
        command += ["--tags", *a.tags]
    env = {**os.environ, "LOADTEST_BATCH": str(a.batch)}
    if a.data_dir:
        env["LOADTEST_DATA_DIR"] = str(a.data_dir)
    print(f"locust: {users} users for {a.run_time} s against {a.host} ...", flush=True)
    try:  # Locust exits 1 when any request failed; the summary says which, so that is not an error here
        done = subprocess.run(command, env=env, timeout=a.run_time + 120, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        raise LoadTestError(f"locust did not stop within {a.run_time + 120} s") from None
    if done.returncode not in (0, 1) or not Path(f"{prefix}_stats.csv").is_file():
        raise LoadTestError(f"locust failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")

    stats = report.read_stats(f"{prefix}_stats.csv")
    total = stats.pop("Aggregated")
    # Refusals (a busy service's 503 with Retry-After) are rows of their own, neither successes nor failures.
    total["refused"] = sum(e["requests"] for name, e in stats.items() if name.endswith(REFUSED))
    if "/classify_batch" in stats and stats["/classify_batch"]["rps"] is not None:
        stats["/classify_batch"]["images_per_s"] = stats["/classify_batch"]["rps"] * a.batch
    summary = {"host": a.host, "users": users, "spawn_rate": spawn_rate, "run_time_s": a.run_time,
               "tags": a.tags or ["images", "batch"], "batch": a.batch, "endpoints": stats, "total": total,
               "model_calls": report.model_calls(before, metrics_text(a.host), time.monotonic() - started),
               "files": {"stats": f"{prefix}_stats.csv", "history": f"{prefix}_stats_history.csv",
                         "html": f"{prefix}_report.html", "timeline": f"{prefix}_timeline.png"}}
    write_json(f"{prefix}_summary.json", summary)
    report.plot_history(report.read_history(f"{prefix}_stats_history.csv"), f"{prefix}_timeline.png",
                        f"{a.host}: {users} users, {'+'.join(summary['tags'])}")
    return summary


def main(argv=None, prog="python -m loadtest"):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__[__doc__.index("\n"):])
    p.add_argument("--host", default="http://127.0.0.1:3000", help="the service (loopback only; default %(default)s)")
    p.add_argument("--users", type=int, default=None,
                   help=f"concurrent users, 1..{MAX_USERS} (default: {USERS_PER_WORKER} per model worker of the service)")
    p.add_argument("--spawn-rate", type=float, default=None, help="users started per second (default: all at once)")
    p.add_argument("--run-time", type=seconds, default=30, help=f"e.g. 30s, 2m; at most {MAX_SECONDS} s (default 30s)")
    p.add_argument("--tags", nargs="+", choices=["images", "batch"], help="only these users (default both)")
    p.add_argument("--batch", type=int, default=64, help="images per /classify_batch request (default %(default)s)")
    p.add_argument("--data-dir", help="CIFAR-100 folder to take the images from (default: synthetic images)")
    p.add_argument("--sweep", help="comma-separated user counts, e.g. 1,4,16: one run each, plus a latency/throughput plot")
    p.add_argument("--out", default="loadtest-report", help="folder for the reports (default %(default)s)")
    a = p.parse_args(argv)
    try:
        counts = [int(x) for x in a.sweep.split(",")] if a.sweep else [1 if a.users is None else a.users]
    except ValueError:
        p.error(f"--sweep takes comma-separated user counts, got {a.sweep!r}")
    if not all(1 <= u <= MAX_USERS for u in counts):
        p.error(f"users must be within 1..{MAX_USERS}")
    if a.spawn_rate is not None and not 0 < a.spawn_rate <= MAX_SPAWN_RATE:
        p.error(f"--spawn-rate must be within (0, {MAX_SPAWN_RATE}]")
    if not 1 <= a.run_time <= MAX_SECONDS:
        p.error(f"--run-time must be within 1..{MAX_SECONDS} s")
    if not 1 <= a.batch <= 4096:
        p.error("--batch must be within 1..4096")
    try:
        a.host = loopback_host(a.host)
        wait_ready(a.host)
        worker_count = model_workers(a.host)
        if not a.sweep and a.users is None:   # enough users to keep every model worker busy
            counts = [min(MAX_USERS, USERS_PER_WORKER * worker_count)]
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        summaries = [run_locust(a, u, out) for u in counts]
        if a.sweep:
            write_json(out / "sweep.json", summaries)
            report.plot_sweep(summaries, out / "sweep.png", f"{a.host}: {'+'.join(summaries[0]['tags'])}")
    except LoadTestError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(report.table(summaries))
    print(f"reports in {out}/")
    failures = sum(s["total"]["failures"] for s in summaries)
    if failures:
        print(f"error: {failures} requests failed (see {out}/u*_failures.csv)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
