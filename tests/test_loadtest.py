"""loadtest/: a real headless Locust run against the real service, and its reports."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest import report
from loadtest.__main__ import LoadTestError, loopback_host, seconds

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("url", ["http://127.0.0.1:3000", "http://localhost:3000/", "http://[::1]:3000",
                                 "http://127.0.0.2:8080"])
def test_loopback_hosts_are_accepted(url):
    assert loopback_host(url) == url.rstrip("/")


@pytest.mark.parametrize("url", ["http://10.0.0.1:3000", "http://example.com", "https://8.8.8.8",
                                 "127.0.0.1:3000", "ftp://127.0.0.1", "http://localhost.example.com"])
def test_other_hosts_are_refused(url):
    with pytest.raises(LoadTestError, match="loopback"):
        loopback_host(url)


def test_run_time_parsing():
    assert [seconds(t) for t in ("5", "5s", "2m", "1m30s")] == [5, 5, 120, 90]
    for bad in ("", "fast", "5h", "-3"):
        with pytest.raises(Exception):
            seconds(bad)


def test_cli_refuses_remote_hosts_and_unbounded_runs():
    run = lambda *a: subprocess.run([sys.executable, "-m", "loadtest", *a], cwd=ROOT, capture_output=True,  # noqa: E731
                                    text=True, timeout=60)
    remote = run("--host", "http://192.0.2.1:3000")
    assert remote.returncode == 1 and "loopback" in remote.stderr
    assert run("--users", "100000").returncode == 2
    assert run("--users", "0").returncode == 2   # not "the default"
    assert run("--run-time", "10h").returncode == 2


HISTOGRAM = """\
# HELP cifar100_requests_per_model_call Requests merged into one model call
# TYPE cifar100_requests_per_model_call histogram
cifar100_requests_per_model_call_sum{worker="1"} %(sum)s
cifar100_requests_per_model_call_bucket{le="1.0",worker="1"} %(b1)s
cifar100_requests_per_model_call_bucket{le="2.0",worker="1"} %(b2)s
cifar100_requests_per_model_call_bucket{le="4.0",worker="1"} %(b4)s
cifar100_requests_per_model_call_bucket{le="+Inf",worker="1"} %(b4)s
cifar100_requests_per_model_call_count{worker="1"} %(b4)s
"""
# What serving/metrics.py adds (two model workers), as BentoML's /metrics writes it (counters with _total).
WORKERS = """\
# TYPE cifar100_model_calls_total counter
cifar100_model_calls_total{worker="1"} %(c1)s
cifar100_model_calls_total{worker="2"} %(c2)s
# TYPE cifar100_model_images_total counter
cifar100_model_images_total{worker="1"} %(i1)s
cifar100_model_images_total{worker="2"} %(i2)s
# TYPE cifar100_model_call_duration_seconds histogram
cifar100_model_call_duration_seconds_sum{worker="1"} %(s1)s
cifar100_model_call_duration_seconds_count{worker="1"} %(c1)s
cifar100_model_call_duration_seconds_sum{worker="2"} %(s2)s
cifar100_model_call_duration_seconds_count{worker="2"} %(c2)s
"""


def test_model_calls_are_counted_over_the_run_only():
    before = HISTOGRAM % {"sum": 10, "b1": 10, "b2": 10, "b4": 10}          # 10 single-request calls
    after = HISTOGRAM % {"sum": 10 + 1 + 2 * 2 + 4 * 3, "b1": 11, "b2": 13, "b4": 16}
    got = report.model_calls(before, after)
    assert got["calls"] == 6
    assert got["mean_requests_per_call"] == pytest.approx(17 / 6)
    assert got["p50_at_most"] == 2.0 and got["p99_at_most"] == 4.0
    assert "workers" not in got   # a service without the series by worker: the histogram only
    assert report.model_calls(before, before) is None and report.model_calls("", "") is None
    before += WORKERS % {"c1": 6, "c2": 4, "i1": 60, "i2": 40, "s1": 0.5, "s2": 0.25}
    after += WORKERS % {"c1": 8, "c2": 8, "i1": 80, "i2": 120, "s1": 0.75, "s2": 1.25}   # 6 calls: 2 + 4
    got = report.model_calls(before, after, seconds=10)
    assert got["workers"] == {"1": {"calls": 2, "images": 20, "seconds": 0.25, "busy": 0.025},
                              "2": {"calls": 4, "images": 80, "seconds": 1.0, "busy": 0.1}}
    assert (got["images"], got["images_per_call"]) == (100, pytest.approx(100 / 6))
    assert got["model_seconds"] == 1.25 and got["mean_call_ms"] == pytest.approx(1250 / 6)
    table = report.table([{"users": 4, "host": "h", "endpoints": {}, "model_calls": got,
                           "total": {"requests": 1, "failures": 0, "rps": 1.0, "p50_ms": 1, "p95_ms": 1, "p99_ms": 1}}])
    assert "100 images, 16.7 per call, 208.33 ms per call" in table
    assert "model worker 2: 4 calls, 80 images, busy 10% of the run" in table


# ---------------------------------------------------------------- a real Locust run against a real service

def run_loadtest(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "loadtest", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def server(onnx_server):
    return onnx_server


def test_headless_run_reports_latency_throughput_and_batching(server, tmp_path):
    out = tmp_path / "report"
    done = run_loadtest("--host", server, "--users", 4, "--run-time", "5s", "--batch", 16, "--out", out)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((out / "u4_summary.json").read_text())
    total = summary["total"]
    assert total["failures"] == 0 and total["requests"] >= 10
    assert set(summary["endpoints"]) == {"/classify", "/classify_batch"}
    assert 0 < total["p50_ms"] <= total["p95_ms"] <= total["p99_ms"] and total["rps"] > 0
    assert summary["endpoints"]["/classify_batch"]["images_per_s"] == pytest.approx(
        16 * summary["endpoints"]["/classify_batch"]["rps"])
    calls = summary["model_calls"]   # the service's series, read from /metrics
    assert calls["calls"] >= 1 and calls["mean_requests_per_call"] >= 1
    assert calls["images"] >= total["requests"] and 0 < calls["workers"]["1"]["busy"] < 1
    for name in ("u4_stats.csv", "u4_stats_history.csv", "u4_failures.csv"):
        assert (out / name).stat().st_size > 0
    assert "locust" in (out / "u4_report.html").read_text().lower()
    assert (out / "u4_timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "p99 ms" in done.stdout and "/classify_batch" in done.stdout and "requests per call" in done.stdout


def test_sweep_plots_latency_against_throughput(server, tmp_path):
    out = tmp_path / "sweep"
    done = run_loadtest("--host", server, "--tags", "batch", "--sweep", "1,3", "--run-time", "3s", "--batch", 8,
                        "--out", out)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    runs = json.loads((out / "sweep.json").read_text())
    assert [r["users"] for r in runs] == [1, 3]
    for r in runs:   # --tags batch: only the array users ran
        assert list(r["endpoints"]) == ["/classify_batch"] and r["total"]["failures"] == r["total"]["refused"] == 0
        # 8 images a request: the images counted are 8 for each request the model calls merged. /metrics is read
        # before Locust starts and after it has stopped: it also counts requests that Locust's stats leave out.
        calls = r["model_calls"]
        assert calls["images"] == pytest.approx(8 * calls["mean_requests_per_call"] * calls["calls"])
        assert calls["images"] >= 8 * r["total"]["requests"] and calls["workers"]["1"]["images"] == calls["images"]
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
