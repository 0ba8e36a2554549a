"""Memory soak: does the service's resident memory stay flat under a long Locust load?

    python -m bench.soak [--minutes 10] [--users 4] [--home ~/bentoml] [--out build/soak] [--max-growth-mb 50]

Starts `bentoml serve serving.service:Classifier` on a free 127.0.0.1 port (the latest model of --home's store; without --home, a random-weight Part 1 model exported into OUT/bentoml), runs a headless
Locust load (`python -m loadtest`: /classify uploads and /classify_batch arrays) for --minutes, and samples
every --every seconds the RSS (and PSS, which splits shared pages fairly) of every process of the server's
tree: the `bentoml serve` arbiter, the Classifier front and the Model worker. The first --warmup seconds
of load are warm-up (allocators, ONNX Runtime arenas and BentoML's batcher settle). Then it stops
everything, prints per process: RSS at the end of warm-up, at the end (medians of 30 s), max, and the slope
of a least-squares line over the second half (MB/min); writes OUT/soak.json and OUT/soak.png.
Exit status 1 when total RSS grew more than --max-growth-mb after warm-up (or any request failed).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

from serving.local_server import LocalServer, process_label, stop_process_group
from training.contract import MODEL_NAME

REPO = Path(__file__).resolve().parents[1]
MB = 2**20
WINDOW_S = 30   # start/end RSS are medians over this many seconds, so one sample's noise does not decide

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("\n"):])
    p.add_argument("--minutes", type=float, default=10, help="load duration, warm-up included (default %(default)s)")
    p.add_argument("--warmup", type=float, default=60, help="seconds of load before the start RSS (default %(default)s)")
    p.add_argument("--users", type=int, default=4, help="Locust users, half /classify, half /classify_batch")
    p.add_argument("--batch", type=int, default=64, help="images per /classify_batch request (default %(default)s)")
    p.add_argument("--every", type=float, default=5, help="seconds between RSS samples (default %(default)s)")
    p.add_argument("--backend", choices=["auto", "torch", "onnx", "tensorrt"], default=None, help="CIFAR100_BACKEND")
    p.add_argument("--home", help="BENTOML_HOME whose latest model to serve (default: a tiny random model)")
    p.add_argument("--out", default="build/soak", help="folder for soak.json, soak.png, logs (default %(default)s)")
    p.add_argument("--json", help="JSON path (default OUT/soak.json)")
    p.add_argument("--plot", help="PNG path (default OUT/soak.png)")
    p.add_argument("--max-growth-mb", type=float, default=50, help="allowed total RSS growth after warm-up")
    a = p.parse_args(argv)
    if not 0 < a.minutes <= 120 or not 1 <= a.users <= 64 or not 0.5 <= a.every <= 60:
        p.error("--minutes must be in (0, 120], --users in 1..64, --every in 0.5..60")
    if not 0 <= a.warmup < a.minutes * 60 - 2 * WINDOW_S:
        p.error(f"--warmup must leave at least {2 * WINDOW_S} s of the run to measure")
    return a


def run(cmd, env, log):
    print("+", " ".join(map(str, cmd)), flush=True)
    with open(log, "ab") as f:
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=900)
    if done.returncode:
        sys.exit(f"error: `{' '.join(map(str, cmd[1:]))}` failed; see {log}")


def tiny_store(out):
    """A BENTOML_HOME holding a random-weight Part 1 model (made once per OUT)."""
    home = out / "bentoml"
    if (home / "models" / MODEL_NAME / "latest").exists():
        return home
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    checkpoint = out / "model" / "part1.pt"
    run([sys.executable, "-m", "export", "random", "--part", "part1", "--out", checkpoint], env, out / "export.log")
    run([sys.executable, "-m", "export", "all", "--checkpoint", checkpoint, "--out", out / "model"], env,
        out / "export.log")
    return home


def sample(root):
    """{pid: (label, rss bytes, pss bytes)} for the root process and all its descendants."""
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return {}
    out = {}
    for proc in procs:
        try:
            mem = proc.memory_full_info()   # PSS reads /proc/PID/smaps_rollup
            out[proc.pid] = (process_label(proc), mem.rss, getattr(mem, "pss", mem.rss))
        except psutil.Error:
            pass
    return out


def slope_mb_per_min(t, y):
    """Least-squares slope of y (bytes) against t (s), in MB/min."""
    if len(t) < 2:
        return None
    mt, my = statistics.fmean(t), statistics.fmean(y)
    var = sum((x - mt) ** 2 for x in t)
    return sum((x - mt) * (v - my) for x, v in zip(t, y)) / var * 60 / MB if var else None


def summarise(series, t, warmup, duration):
    """Per series: start (median of the WINDOW_S after warm-up), end (median of the last WINDOW_S), max, growth,
    slope over the second half of the run. Values in MB."""
    def window(values, lo, hi):
        picked = [v for x, v in zip(t, values) if lo <= x <= hi and v is not None]
        return statistics.median(picked) / MB if picked else None

    rows = {}
    for name, values in series.items():
        start, end = window(values, warmup, warmup + WINDOW_S), window(values, t[-1] - WINDOW_S, t[-1])
        half = [(x, v) for x, v in zip(t, values) if x >= duration / 2 and v is not None]
        present = [v for v in values if v is not None]
        rows[name] = {"start_mb": start, "end_mb": end, "max_mb": max(present) / MB if present else None,
                      "growth_mb": end - start if start is not None and end is not None else None,
                      "slope_mb_per_min": slope_mb_per_min(*zip(*half)) if len(half) > 1 else None}
    return rows


def table(rows, key="rss"):
    head = f"{'process (' + key.upper() + ')':<32} {'start MB':>9} {'end MB':>8} {'max MB':>8} {'growth MB':>10} {'MB/min 2nd half':>16}"
    lines = [head, "-" * len(head)]
    f = lambda v, w, d=1: f"{v:>{w}.{d}f}" if v is not None else f"{'-':>{w}}"  # noqa: E731
    for name, r in rows.items():
        lines.append(f"{name:<32} {f(r['start_mb'], 9)} {f(r['end_mb'], 8)} {f(r['max_mb'], 8)} "
                     f"{f(r['growth_mb'], 10)} {f(r['slope_mb_per_min'], 16, 2)}")
    return "\n".join(lines)


def plot(t, series, warmup, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.files import save_figure
    fig, (procs, total) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    minutes = [x / 60 for x in t]
    for name, values in series["rss"].items():
        ax = total if name == "total" else procs
        ax.plot(minutes, [v / MB if v is not None else None for v in values], label=f"{name} RSS")
    total.plot(minutes, [v / MB for v in series["pss"]["total"]], "--", label="total PSS")
    for ax in (procs, total):
        ax.axvspan(0, warmup / 60, color="gray", alpha=0.15, label="warm-up")
        ax.set_ylabel("MB")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    procs.set_title(title)
    total.set_xlabel("minutes of load")
    save_figure(fig, path)


def main(argv=None):
    a = parse_args(argv)
    os.chdir(REPO)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = Path(a.json or out / "soak.json"), Path(a.plot or out / "soak.png")
    home = Path(a.home).expanduser() if a.home else tiny_store(out)
    duration = int(a.minutes * 60)
    server = locust = None
    t, samples = [], []
    try:
        try:
            server = LocalServer(home, {"CIFAR100_BACKEND": a.backend} if a.backend else None, run_dir=out / "serve",
                                 ready_timeout=300)
        except RuntimeError as e:
            sys.exit(f"error: {e}")
        url = server.url
        root = psutil.Process(server.process.pid)
        print(f"serving at {url}; {a.users} users for {duration} s, RSS sampled every {a.every} s", flush=True)
        locust_log = open(out / "locust.log", "wb")
        locust = subprocess.Popen([sys.executable, "-m", "loadtest", "--host", url, "--users", str(a.users),
                                   "--run-time", f"{duration}s", "--batch", str(a.batch), "--out", out / "locust"],
                                  cwd=REPO, stdout=locust_log, stderr=subprocess.STDOUT, start_new_session=True)
        began = time.monotonic()
        while locust.poll() is None and time.monotonic() - began < duration + 180:
            now = time.monotonic() - began
            if now <= duration:   # Locust itself takes a few seconds to start and to write its reports
                t.append(round(now, 2))
                samples.append(sample(root))
                total = sum(rss for _, rss, _ in samples[-1].values())
                if len(samples) == 1 or int(now // 60) != int(t[-2] // 60):   # a progress line a minute
                    print(f"{now:6.0f} s  total RSS {total / MB:7.1f} MB  ({len(samples[-1])} processes)", flush=True)
            time.sleep(max(0.0, a.every - (time.monotonic() - began - now)))
        if server.process.poll() is not None:
            sys.exit(f"error: bentoml serve exited during the run ({server.process.returncode}); see {server.log_path}")
    finally:
        if locust is not None:
            stop_process_group(locust.pid, leader=locust)
        if server:
            server.stop()
    if locust.returncode not in (0, 1):
        print(f"warning: locust ended with exit {locust.returncode}; see {out / 'locust.log'}", file=sys.stderr)

    # One series per process (pid-qualified when names repeat, e.g. CIFAR100_WORKERS>1), plus the total.
    names = {}
    for s in samples:
        for pid, (name, _, _) in s.items():
            names.setdefault(pid, name)
    counts = {n: list(names.values()).count(n) for n in names.values()}
    keyed = {pid: (n if counts[n] == 1 else f"{n} [{pid}]") for pid, n in names.items()}
    series = {}
    for i, key in ((1, "rss"), (2, "pss")):
        series[key] = {keyed[pid]: [s[pid][i] if pid in s else None for s in samples] for pid in names}
        series[key]["total"] = [sum(v[i] for v in s.values()) for s in samples]
    rows = {key: summarise(series[key], t, a.warmup, duration) for key in series}
    summary_path = out / "locust" / f"u{a.users}_summary.json"
    load = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    growth = rows["rss"]["total"]["growth_mb"]
    failures = load["total"]["failures"] if load else None
    passed = growth is not None and growth <= a.max_growth_mb and failures == 0

    print(table(rows["rss"], "rss"))
    print(table(rows["pss"], "pss"))
    if load:
        tot = load["total"]
        print(f"load: {tot['requests']} requests ({tot['rps']:.1f}/s), {tot['failures']} failed, "
              f"p50 {tot['p50_ms']:.0f} ms, p99 {tot['p99_ms']:.0f} ms")
    verdict = (f"{'PASS' if passed else 'FAIL'}: total RSS grew {growth:+.1f} MB after {a.warmup:g} s warm-up "
               f"(limit {a.max_growth_mb:g} MB), slope over the second half "
               f"{rows['rss']['total']['slope_mb_per_min']:+.2f} MB/min" if growth is not None
               else "FAIL: not enough samples")
    if failures:
        verdict += f"; {failures} requests failed"
    print(verdict)

    from training.files import write_json
    result = {"verdict": verdict, "passed": passed, "max_growth_mb": a.max_growth_mb, "minutes": a.minutes,
              "warmup_s": a.warmup, "users": a.users, "batch": a.batch, "every_s": a.every,
              "backend": a.backend or "auto", "model_home": str(home), "tiny_model": not a.home,
              "machine": {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()},
              "summary": rows, "load": load, "t_s": t,
              "series_mb": {k: {n: [round(v / MB, 2) if v is not None else None for v in vs] for n, vs in s.items()}
                            for k, s in series.items()}}
    write_json(json_path, result)
    plot(t, series, a.warmup, png_path, f"bentoml serve under {a.users} Locust users ({a.minutes:g} min): "
                                        f"{'PASS' if passed else 'FAIL'}")
    print(f"wrote {json_path}, {png_path} (logs and Locust reports in {out})")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
