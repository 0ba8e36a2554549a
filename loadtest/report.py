"""Turn Locust's CSV files and the service's /metrics into a summary (JSON + table) and PNG plots."""
import csv

import matplotlib
matplotlib.use("Agg")   # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from training.files import save_figure  # noqa: E402

# The service's histogram of how many requests each model call merged, and its counts per model worker
# (serving/metrics.py).
BATCH_METRIC = "cifar100_requests_per_model_call"
WORKER_SERIES = {"cifar100_model_calls_total": "calls", "cifar100_model_images_total": "images",
                 "cifar100_model_call_duration_seconds_sum": "seconds",
                 "cifar100_model_call_duration_seconds_count": "timed_calls"}


def _number(text):
    try:
        return float(text)
    except (TypeError, ValueError):   # Locust writes "N/A" before the first response
        return None


def read_stats(path):
    """{name: {requests, failures, rps, avg_ms, p50_ms, p95_ms, p99_ms, max_ms}} from *_stats.csv."""
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out[row["Name"]] = {"requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
                                "rps": _number(row["Requests/s"]), "avg_ms": _number(row["Average Response Time"]),
                                "p50_ms": _number(row["50%"]), "p95_ms": _number(row["95%"]),
                                "p99_ms": _number(row["99%"]), "max_ms": _number(row["Max Response Time"])}
    return out


def read_history(path):
    """The Aggregated rows of *_stats_history.csv as columns: t (s from start), users, rps, p50, p95, p99.

    Throughput comes from the growth of the total request count between rows: Locust's own
    "Requests/s" column averages a window that ends 2 s back, which reads 0 in a short run.
    """
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["Name"] == "Aggregated"]
    t = [int(r["Timestamp"]) - int(rows[0]["Timestamp"]) for r in rows]
    count = [int(r["Total Request Count"]) for r in rows]
    # Over the last (up to) 5 s: a per-second difference of a count of slow requests is mostly 0s and spikes.
    back = [max(0, i - 5) for i in range(len(rows))]
    rps = [(count[i] - count[j]) / (t[i] - t[j]) if t[i] > t[j] else None for i, j in enumerate(back)]
    # Locust writes 0 (or N/A) while its recent-latency window is still empty: no point, not 0 ms.
    latency = {k: [_number(r[c]) or None for r in rows] for k, c in (("p50", "50%"), ("p95", "95%"), ("p99", "99%"))}
    return {"t": t, "users": [int(r["User Count"]) for r in rows], "rps": rps, **latency}


def model_call_histogram(metrics_text):
    """{"count", "sum", "buckets": {upper bound: cumulative count}} of the service's model calls, summed over its
    processes."""
    h = {"count": 0.0, "sum": 0.0, "buckets": {}}
    for family in text_string_to_metric_families(metrics_text):
        if family.name != BATCH_METRIC:
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                le = sample.labels["le"]
                h["buckets"][le] = h["buckets"].get(le, 0.0) + sample.value
            elif sample.name.endswith("_count"):
                h["count"] += sample.value
            elif sample.name.endswith("_sum"):
                h["sum"] += sample.value
    return h


def worker_counts(metrics_text):
    """{worker: {"calls", "images", "seconds", "timed_calls"}}: the service's counts by model worker (a label)."""
    counts = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if key := WORKER_SERIES.get(sample.name):
                worker = counts.setdefault(sample.labels.get("worker", ""), dict.fromkeys(WORKER_SERIES.values(), 0.0))
                worker[key] += sample.value
    return counts


def model_calls(before_text, after_text, seconds=None):
    """The model calls made during the run (after minus before, over SECONDS): their count, the mean and quantiles
    of the requests each merged and, from the service's counts by worker, the images, the model's time and how busy
    each worker was; None when there were none."""
    before, after = model_call_histogram(before_text), model_call_histogram(after_text)
    count = after["count"] - before["count"]
    if count <= 0:
        return None
    buckets = sorted((float(le), v - before["buckets"].get(le, 0.0)) for le, v in after["buckets"].items())

    def quantile(q):   # the upper bound of the first bucket holding the q-th call
        return next((le for le, c in buckets if c >= q * count), None)
    calls = {"calls": int(count), "mean_requests_per_call": (after["sum"] - before["sum"]) / count,
             "p50_at_most": quantile(0.5), "p99_at_most": quantile(0.99)}
    start, end = worker_counts(before_text), worker_counts(after_text)
    workers = {w: {k: v - start.get(w, {}).get(k, 0.0) for k, v in counts.items() if k != "timed_calls"}
               for w, counts in sorted(end.items())}
    if workers:   # a service without them (an older version) has only the histogram
        for w in workers.values():
            w["calls"], w["images"] = int(w["calls"]), int(w["images"])
            w["busy"] = w["seconds"] / seconds if seconds else None
        images, model_seconds = sum(w["images"] for w in workers.values()), sum(w["seconds"] for w in workers.values())
        calls.update(images=images, images_per_call=images / count, model_seconds=model_seconds,
                     mean_call_ms=1000 * model_seconds / count, workers=workers)
    return calls


def plot_history(history, path, title):
    """Latency percentiles and throughput over the run."""
    fig, (lat, thr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for key in ("p50", "p95", "p99"):
        lat.plot(history["t"], history[key], marker=".", label=key)
    lat.set_ylabel("latency (ms)")
    lat.set_ylim(bottom=0)
    lat.legend()
    lat.grid(alpha=0.3)
    lat.set_title(title)
    thr.plot(history["t"], history["rps"], marker=".", color="tab:green", label="requests/s")
    thr.set_ylabel("requests/s")
    thr.set_ylim(bottom=0)
    thr.set_xlabel("seconds since start")
    thr.grid(alpha=0.3)
    users = thr.twinx()
    users.step(history["t"], history["users"], where="post", color="tab:gray", alpha=0.6, label="users")
    users.set_ylabel("users")
    users.set_ylim(bottom=0)
    save_figure(fig, path)


def plot_sweep(summaries, path, title):
    """p50/p99 latency against throughput, one point per user count."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    summaries = [s for s in summaries if s["total"]["requests"]]   # a run without answers has no point
    rps = [s["total"]["rps"] for s in summaries]
    for key, style in (("p50_ms", "o-"), ("p99_ms", "s--")):
        ax.plot(rps, [s["total"][key] for s in summaries], style, label=key[:3])
    for s in summaries:
        ax.annotate(f"{s['users']} users", (s["total"]["rps"], s["total"]["p99_ms"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def table(summaries):
    """One printed row per run and endpoint, then the service's batching."""
    head = f"{'users':>5} {'endpoint':<32} {'reqs':>7} {'fails':>5} {'req/s':>8} {'img/s':>8} " \
           f"{'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7}"
    lines = [head, "-" * len(head)]
    for s in summaries:
        for name, e in [*s["endpoints"].items(), ("total", s["total"])]:
            lines.append(f"{s['users']:>5} {name:<32} {e['requests']:>7} {e['failures']:>5} {_fmt(e['rps'], 8, 1)} "
                         f"{_fmt(e.get('images_per_s'), 8, 0)} {_fmt(e['p50_ms'], 7, 0)} {_fmt(e['p95_ms'], 7, 0)} "
                         f"{_fmt(e['p99_ms'], 7, 0)}")
    for s in summaries:
        if b := s["model_calls"]:
            lines.append(f"{s['users']:>5} users: {b['calls']} model calls, {b['mean_requests_per_call']:.2f} "
                         f"requests per call on average (p50 <= {b['p50_at_most']:g}, p99 <= {b['p99_at_most']:g})")
            if "workers" in b:
                lines.append(f"{'':>5}        {b['images']} images, {b['images_per_call']:.1f} per call, "
                             f"{b['mean_call_ms']:.2f} ms per call")
                for name, w in b["workers"].items():
                    busy = f", busy {100 * w['busy']:.0f}% of the run" if w["busy"] is not None else ""
                    lines.append(f"{'':>5}        model worker {name}: {w['calls']} calls, {w['images']} images{busy}")
        else:
            lines.append(f"{s['users']:>5} users: no model-call metrics at {s['host']}/metrics")
    return "\n".join(lines)


def _fmt(value, width, digits):
    return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"
