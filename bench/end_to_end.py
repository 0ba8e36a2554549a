"""End-to-end speed check of one model: raw backends, the BentoML service scoring a Kaggle-sized OOD set,
Locust latency. One table on stdout (and OUT/table.txt), everything in OUT/summary.json.

    python bench/end_to_end.py                                   # ResNet-50 @224, 950,000 OOD images
    python bench/end_to_end.py --images 5000 --resolution 32     # CPU dry run, a few minutes

bench/gpu_check.sh runs it on the lent GPU machine after installing the wheels it needs. Stages:
random-weight ResNet-50 (Part 3) checkpoint -> `python -m export all` -> bench/backends.py -> `bentoml serve`
-> Locust (1 user on /classify, then N users on both endpoints) -> serving.score through the service ->
serving.score --direct (no service). Each stage is a subprocess with a time limit cut from one --budget;
a stage that fails or runs out of time is reported as such and the rest goes on where it can (a scoring
run cut short reports the images it finished and projects the full set from that rate). The service
is always stopped. Figures come from the JSON files the stages write (--json), never from their printed lines.
"""
import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from serving.local_server import LocalServer, stop_process_group  # noqa: E402
from serving.score import N_FILES, figures  # noqa: E402
from training.checkpoint import save_random_checkpoint  # noqa: E402
from training.contract import CHECKPOINT_FILE, ENGINE_FILE, MODEL_NAME, NUM_CLASSES  # noqa: E402
from training.files import atomic_path, write_json  # noqa: E402

FULL_SET = 950_000


class Stages:
    """Subprocesses under one deadline; each stage's status, seconds and log tail are recorded."""

    def __init__(self, budget, logs, log_file):
        self.deadline = time.monotonic() + budget
        self.logs, self.log_file = logs, log_file
        self.results, self.groups = {}, set()

    def left(self):
        return self.deadline - time.monotonic()

    def note(self, text):
        print(text, flush=True)
        with open(self.log_file, "a") as f:
            f.write(text + "\n")

    def run(self, name, cmd, cap, reserve=0.0, env=None):
        """Run CMD (stdout+stderr to logs/NAME.log) for at most min(cap, time left - reserve) seconds.
        Returns (status, output text); status is ok | failed (exit N) | timed out | skipped."""
        limit = min(cap, self.left() - reserve)
        if limit < 5:
            self.results[name] = {"status": "skipped: no time left", "seconds": 0.0}
            self.note(f"== {name}: skipped, no time left")
            return "skipped", ""
        self.note(f"== {name} (limit {limit:.0f} s): {' '.join(map(str, cmd))}")
        log = self.logs / f"{name}.log"
        start = time.monotonic()
        with open(log, "w") as out:
            proc = subprocess.Popen(list(map(str, cmd)), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})}, start_new_session=True)
            self.groups.add(proc.pid)
            try:
                rc = proc.wait(timeout=limit)
                status = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                stop_process_group(proc.pid, grace=15, leader=proc)
                status = "timed out"
            finally:
                self.groups.discard(proc.pid)
        seconds = time.monotonic() - start
        text = log.read_text(errors="replace")
        self.results[name] = {"status": status, "seconds": round(seconds, 1), "limit_s": round(limit)}
        self.note(f"   {name}: {status} in {seconds:.1f} s")
        tail = tail_lines(text, 40 if status != "ok" else 8)
        with open(self.log_file, "a") as f:
            f.write(tail + "\n")
        if status != "ok":
            print(tail, flush=True)
        return status.split(" ")[0], text

    def stop_all(self):
        for pid in list(self.groups):
            stop_process_group(pid, grace=15)


def tail_lines(text, n):
    lines = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return "\n".join("   | " + ln[:300] for ln in lines[-n:])


# ---------------------------------------------------------------- the machine

def machine_info():
    import importlib.metadata as md

    import torch
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cpu_threads": len(os.sched_getaffinity(0)),
            "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}", cuda_runtime=torch.version.cuda)
    for dist in ("bentoml", "locust", "onnxruntime", "onnxruntime-gpu", "onnx", "numpy", "tensorrt",
                 "tensorrt-cu13", "tensorrt-cu12"):
        try:
            info[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    try:
        import onnxruntime
        info["ort_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        info["ort_providers"] = []
    from serving.tensorrt import unavailable_reason
    info["tensorrt_unavailable"] = unavailable_reason()
    return info


# ---------------------------------------------------------------- the model and the data

def write_ood(folder, per_file):
    """distortion00..18.npy, uint8 per_file×32×32×3 each: one block of synthetic images, rolled per file."""
    from training.synthetic import make_images

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, NUM_CLASSES, per_file)
    block = np.concatenate([make_images(labels[i:i + 10_000], rng) for i in range(0, per_file, 10_000)])
    for k in range(N_FILES):
        with atomic_path(folder / f"distortion{k:02d}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, np.roll(block, 7919 * k, axis=0), allow_pickle=False)


def store_entry(bentoml_home):
    entries = sorted((bentoml_home / "models" / MODEL_NAME).glob(f"*/{CHECKPOINT_FILE}"), key=lambda p: p.stat().st_mtime)
    return entries[-1].parent if entries else None


# ---------------------------------------------------------------- the service

def get_json(url, timeout=10.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def model_stats(url):
    """The Model process's counters from GET /info: model_calls, images, largest_call, seconds ({} if none)."""
    try:
        return get_json(url + "/info").get("stats") or {}
    except (OSError, ValueError):
        return {}


class GpuSampler:
    """nvidia-smi utilisation/memory every 0.5 s while a stage runs (nothing without nvidia-smi)."""

    def __init__(self, path):
        self.proc, self.path = None, path
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                          "--format=csv,noheader,nounits", "-lms", "500"],
                                         stdout=open(path, "w"), stderr=subprocess.DEVNULL, start_new_session=True)

    def stop(self):
        if self.proc is None:
            return None
        stop_process_group(self.proc.pid, grace=3, leader=self.proc)
        rows = []
        for line in Path(self.path).read_text().splitlines():
            try:
                rows.append([float(x) for x in line.split(",")[:2]])
            except ValueError:
                continue
        if not rows:
            return None
        util = [r[0] for r in rows]
        return {"gpu_util_mean_pct": round(sum(util) / len(util)), "gpu_util_max_pct": max(util),
                "gpu_mem_max_mib": max(r[1] for r in rows), "samples": len(rows)}


# ---------------------------------------------------------------- results

def bench_rows(path):
    """The measured rows of bench/backends.py's --json file (written after every row: there even when the stage
    was cut short)."""
    try:
        return [r for r in json.loads(Path(path).read_text())["results"] if "error" not in r]
    except (OSError, ValueError, KeyError):
        return []


def score_result(status, json_path, out_csv, seconds):
    """serving.score's --json figures, or, when the run was cut short, the images of its saved chunks."""
    if status == "ok" and Path(json_path).is_file():
        return {**json.loads(Path(json_path).read_text()), "process_seconds": round(seconds, 1)}
    parts = Path(f"{out_csv}.parts")
    images = sum(len(np.load(p, allow_pickle=False)) for p in parts.glob("chunk*.npy")) if parts.is_dir() else 0
    return figures(images, seconds, False, process_seconds=round(seconds, 1))


def chunk_labels(out_csv, per_file, chunk_size):
    """{chunk index: labels} from the finished CSV, or from OUT.parts when the run was cut short."""
    parts = Path(f"{out_csv}.parts")
    if Path(out_csv).is_file():
        with open(out_csv, newline="") as f:
            labels = np.array([int(row["label"]) for row in csv.DictReader(f)])
        sizes = [min(chunk_size, per_file - s) for _ in range(N_FILES) for s in range(0, per_file, chunk_size)]
        return dict(enumerate(np.split(labels, np.cumsum(sizes)[:-1])))
    if parts.is_dir():
        return {int(p.stem[5:]): np.load(p, allow_pickle=False) for p in parts.glob("chunk*.npy")}
    return {}


def agreement(a, b):
    common = sorted(a.keys() & b.keys())
    if not common:
        return None
    x, y = np.concatenate([a[i] for i in common]), np.concatenate([b[i] for i in common])
    return {"images": int(len(x)), "same_label": float((x == y).mean())} if len(x) == len(y) else None


def locust_summary(folder):
    found = sorted(Path(folder).glob("u*_summary.json"))
    return json.loads(found[0].read_text()) if found else None


def fmt(x, digits=0):
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def table(s):
    """The rows that answer: how fast is each piece, and how much of the raw speed reaches the client."""
    rows = []
    m = s["machine"]
    rows.append(("machine", m.get("gpu", "CPU only"), f"torch {m['torch']}, {m['cpu_threads']} CPU threads"))
    rows.append(("model", "ResNet-50", f"Part 3, random weights, {s['config']['resolution']} px"))
    for name in ("checkpoint", "export", "bench", "service_start", "write_ood", "locust_low", "locust_load",
                 "score_service", "score_direct"):
        st = s["stages"].get(name)
        if st:
            rows.append((f"stage {name}", f"{st['status']}", f"{st['seconds']:.0f} s"))
    b = s["config"]["bench_batch"]
    for r in s["raw"]:
        if r["batch"] == b:
            rows.append((f"raw {r['backend']} {r['device']} {r['precision']} b{b}", f"{fmt(r['img_per_s'])} img/s",
                         f"{r['ms_per_batch']:.2f} ms/batch, top-1 = fp32 on {100 * r['top1_agree']:.1f}%, "
                         f"max |diff| {r['max_abs_diff']:.1e}"))
    for r in s["raw"]:
        if r["batch"] == 1:
            rows.append((f"raw {r['backend']} {r['device']} {r['precision']} b1", f"{r['ms_per_batch']:.2f} ms", ""))
    for name, reason in s["missing_backends"].items():
        rows.append((f"raw {name}", "not measured", reason))
    info = s.get("service_info", {})
    if auto := info.get("auto"):
        rows.append(("service backend (auto)", info["backend"],
                     ", ".join(f"{k} {v:,} img/s" for k, v in auto["img_per_s"].items()) + f" at batch {auto['batch']}"))
    if workers := info.get("workers"):
        rows.append(("service model workers", str(len(workers)),
                     ", ".join(f"worker {w['worker']}: {w['device'].get('gpu', w['device']['device'])}" for w in workers)))
    if warmup := info.get("warmup_seconds"):
        rows.append(("service torch.compile warm-up", f"{sum(warmup.values()):.0f} s",
                     ", ".join(f"b{k} {v} s" for k, v in warmup.items())))
    if error := info.get("compile_error"):
        rows.append(("service torch.compile", "failed: serves eager", error[:120]))
    if s.get("compile_skipped"):
        rows.append(("service torch.compile", "skipped", s["compile_skipped"]))
    full = s["config"]["full_set"]
    for key, label in (("score_service", "service scoring"), ("score_direct", "direct scoring (no service)")):
        r = s.get(key)
        if not r:
            continue
        done = "" if r["complete"] else " (cut short)"
        rows.append((label, f"{fmt(r['img_per_s'])} img/s",
                     f"{r['images']:,} images in {r['seconds']:.1f} s{done}"))
        if r["img_per_s"]:
            rows.append((f"{label}: {full:,} images", f"{full / r['img_per_s']:.0f} s",
                         "measured" if r["complete"] and r["images"] == full else "projected from the rate"))
    ratios = s["ratios"]
    if ratios.get("service_over_raw") is not None:
        rows.append(("service / raw (same backend)", f"{ratios['service_over_raw']:.2f}", ratios["raw_reference"]))
    if ratios.get("service_over_direct") is not None:
        rows.append(("service / direct", f"{ratios['service_over_direct']:.2f}", ""))
    if s.get("service_model_busy"):
        sb = s["service_model_busy"]
        rows.append(("service model busy while scoring", f"{100 * sb['busy_fraction']:.0f}%",
                     f"mean model batch {sb['mean_batch']:.0f}, largest {sb['largest_call']}"))
    if s.get("gpu_while_scoring"):
        g = s["gpu_while_scoring"]
        rows.append(("GPU util while scoring", f"{g['gpu_util_mean_pct']}% mean", f"max memory {g['gpu_mem_max_mib']:.0f} MiB"))
    if s.get("agreement"):
        a = s["agreement"]
        rows.append(("service vs direct labels", f"{100 * a['same_label']:.2f}% same", f"{a['images']:,} images"))
    for key, label in (("locust_low", "1 user"), ("locust_load", f"{s['config']['locust_users']} users")):
        summary = s.get(key)
        if not summary:
            continue
        for endpoint, e in summary["endpoints"].items():
            extra = f", {fmt(e.get('images_per_s'))} img/s" if e.get("images_per_s") else ""
            rows.append((f"{endpoint} ({label})", f"p50 {fmt(e['p50_ms'])} ms, p99 {fmt(e['p99_ms'])} ms",
                         f"{fmt(e['rps'], 1)} req/s{extra}, {e['failures']} failed of {e['requests']}"))
    rows.append(("all stages", f"{s.get('seconds', 0):.0f} s", f"budget {s['config']['budget']:.0f} s"))
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    lines = [f"{'what':<{width}}  {'result':<{vwidth}}  detail", "-" * (width + vwidth + 30)]
    lines += [f"{a:<{width}}  {b:<{vwidth}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__[__doc__.index("\n"):])
    p.add_argument("--out", default="build/gpu_check", help="results: summary.json, table.txt, logs (default %(default)s)")
    p.add_argument("--work", default="/tmp/gpu_check", help="scratch: model store, OOD set (wiped; default %(default)s)")
    p.add_argument("--images", type=int, default=FULL_SET, help="OOD images in all (19 files; default %(default)s)")
    p.add_argument("--resolution", type=int, default=224, help="the ResNet-50's input size (default %(default)s)")
    p.add_argument("--budget", type=float, default=480, help="seconds for all stages (default %(default)s)")
    p.add_argument("--backend", default="auto", help="the service's CIFAR100_BACKEND (default %(default)s)")
    p.add_argument("--chunk-size", type=int, default=4096, help="images per scoring request (default %(default)s)")
    p.add_argument("--in-flight", type=int, default=8, help="scoring requests at once (default %(default)s)")
    p.add_argument("--batch-sizes", default="1,100,256",
                   help="for bench/backends.py (100: the served torch backend pads it to its 128 bucket)")
    p.add_argument("--locust-seconds", type=int, default=15, help="each Locust run (default %(default)s)")
    p.add_argument("--locust-users", type=int, default=32, help="users of the loaded Locust run (default %(default)s)")
    p.add_argument("--keep-data", action="store_true", help="keep the OOD set in WORK/ood (deleted at the end otherwise)")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    out, work = Path(a.out).resolve(), Path(a.work).resolve()
    if work == Path("/") or work == REPO:
        sys.exit(f"error: --work {work} would be wiped; give a scratch folder")
    shutil.rmtree(work, ignore_errors=True)
    logs = work / "logs"
    logs.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "log.txt").write_text("")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # the finally block below still runs

    stages = Stages(a.budget, logs, out / "log.txt")
    per_file = max(a.images // N_FILES // 5 * 5, 5)
    s = {"config": {**{k: v for k, v in vars(a).items() if k not in ("out", "work")}, "full_set": FULL_SET,
                    "per_file": per_file, "images_written": per_file * N_FILES,
                    "bench_batch": max(int(b) for b in a.batch_sizes.split(","))},
         "stages": stages.results, "raw": [], "missing_backends": {}, "ratios": {}}
    service = sampler = None
    started = time.monotonic()
    try:
        s["machine"] = machine_info()
        cuda = s["machine"]["cuda"]
        stages.note(json.dumps(s["machine"]))
        home = work / "bentoml"
        env = {"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True", "PYTHONUNBUFFERED": "1"}
        os.environ.update(env)

        ckpt = work / "part3.pt"
        t0 = time.monotonic()
        save_random_checkpoint(ckpt, "part3", resolution=a.resolution)   # speed does not need accuracy
        stages.results["checkpoint"] = {"status": "ok", "seconds": round(time.monotonic() - t0, 1)}

        status, _ = stages.run("export", [sys.executable, "-m", "export", "all", "--checkpoint", ckpt,
                                          "--out", work / "artifacts"], cap=240)
        entry = store_entry(home)
        if entry is None:
            raise RuntimeError("export did not produce a model store entry; see the export log above")

        bench = [sys.executable, "bench/backends.py", "--model-dir", entry, "--batch-sizes", a.batch_sizes,
                 "--iters", 30, "--max-seconds", 3, "--json", out / "backends.json"]
        stages.run("bench", bench, cap=200, reserve=0.55 * stages.left())
        s["raw"] = bench_rows(out / "backends.json")
        if cuda and "CIFAR100_TORCH_COMPILE" not in os.environ and not any(
                r["backend"] == "served-torch" and r["precision"].endswith("+compile") for r in s["raw"]):
            # torch.compile failed or did not finish within the bench stage: the service and the direct run
            # would spend the rest of the budget compiling again. Eager still measures the rest.
            os.environ["CIFAR100_TORCH_COMPILE"] = "0"
            s["compile_skipped"] = "no compiled served-torch row from the bench stage: the service serves eager"
            stages.note(f"== {s['compile_skipped']}")
        m = s["machine"]
        if cuda and "CUDAExecutionProvider" not in m["ort_providers"]:
            s["missing_backends"]["onnxruntime cuda"] = (f"onnxruntime {m.get('onnxruntime-gpu') or m.get('onnxruntime')}"
                                                         f" has no CUDAExecutionProvider (CPU build)")
        if m["tensorrt_unavailable"] or not (entry / ENGINE_FILE).is_file():
            s["missing_backends"]["tensorrt"] = m["tensorrt_unavailable"] or "no engine in the store entry"

        # The OOD set is written while the service starts (CPU work vs. the service's model loading).
        ood = work / "ood"
        writer = threading.Thread(target=write_ood, args=(ood, per_file))
        t0 = time.monotonic()
        writer.start()
        try:
            service = LocalServer(home, {"CIFAR100_BACKEND": a.backend, "CIFAR100_MODEL": f"{MODEL_NAME}:latest"},
                                  run_dir=work / "service", ready_timeout=max(5, min(240, stages.left() - 60)))
            ready = "ok"
        except RuntimeError as e:   # its message ends with the server log's tail
            ready = str(e)
        stages.results["service_start"] = {"status": ready.splitlines()[0], "seconds": round(time.monotonic() - t0, 1)}
        stages.note(f"== service: {ready} in {time.monotonic() - t0:.1f} s" + (f" at {service.url}" if service else ""))
        writer.join()
        stages.results["write_ood"] = {"status": "ok", "seconds": round(time.monotonic() - t0, 1),
                                       "images": per_file * N_FILES}
        if service is None:
            raise RuntimeError("the service did not become ready")
        s["service_info"] = get_json(service.url + "/info")

        loadtest = [sys.executable, "-m", "loadtest", "--host", service.url]
        stages.run("locust_low", loadtest + ["--users", 1, "--tags", "images", "--run-time", f"{a.locust_seconds}s",
                                             "--out", work / "locust_low"], cap=a.locust_seconds + 60, reserve=120)
        s["locust_low"] = locust_summary(work / "locust_low")
        stages.run("locust_load", loadtest + ["--users", a.locust_users, "--batch", 256, "--run-time",
                                              f"{a.locust_seconds}s", "--out", work / "locust_load"],
                   cap=a.locust_seconds + 60, reserve=120)
        s["locust_load"] = locust_summary(work / "locust_load")

        before = model_stats(service.url)
        sampler = GpuSampler(logs / "gpu_service.csv")
        score = [sys.executable, "-m", "serving.score", "--ood-dir", ood, "--chunk-size", a.chunk_size]
        # What is left, less a share for the direct run, stopping the service and the report.
        status, _ = stages.run("score_service", score + ["--url", service.url, "--in-flight", a.in_flight,
                                                         "--out", work / "service.csv", "--json", work / "service.json"],
                               cap=1e9, reserve=max(25, 0.35 * stages.left()))
        after = model_stats(service.url)   # at once: the service goes on with queued chunks
        s["gpu_while_scoring"] = sampler.stop()
        seconds = stages.results["score_service"]["seconds"]
        if status != "skipped":
            s["score_service"] = r = score_result(status, work / "service.json", work / "service.csv", seconds)
            calls, images = (after.get(k, 0) - before.get(k, 0) for k in ("model_calls", "images"))
            if not r["complete"] and images > r["images"]:
                # Cut short with many chunks in flight, few are finished: count what the model has done.
                r.update(images=images, img_per_s=images / seconds, counted="images through the model (/info)")
            if calls:
                s["service_model_busy"] = {"busy_fraction": min(1.0, (after["seconds"] - before.get("seconds", 0)) / seconds),
                                           "mean_batch": images / calls, "largest_call": after["largest_call"],
                                           "model_calls": calls}
        service.stop()
        service = None

        status, _ = stages.run("score_direct", score + ["--direct", entry, "--backend", a.backend, "--out",
                                                        work / "direct.csv", "--json", work / "direct.json"],
                               cap=1e9, reserve=8)
        if status != "skipped":
            s["score_direct"] = score_result(status, work / "direct.json", work / "direct.csv",
                                             stages.results["score_direct"]["seconds"])
        s["agreement"] = agreement(chunk_labels(work / "service.csv", per_file, a.chunk_size),
                                   chunk_labels(work / "direct.csv", per_file, a.chunk_size))
    except Exception as e:
        s["error"] = f"{type(e).__name__}: {e}"
        stages.note(f"error: {s['error']}")
    except (KeyboardInterrupt, SystemExit):
        s["error"] = "stopped by a signal before the end"
        raise
    finally:
        if sampler is not None and sampler.proc is not None and sampler.proc.poll() is None:
            sampler.stop()
        if service is not None:
            service.stop()
        stages.stop_all()
        if not a.keep_data:   # 2.9 GB at full size; the logs stay in WORK/logs
            shutil.rmtree(work / "ood", ignore_errors=True)
        s["seconds"] = round(time.monotonic() - started, 1)
        finish(s, out)
    return 1 if "error" in s else 0


def finish(s, out):
    """Ratios, the table, summary.json; also after an error (with what there is)."""
    b = s["config"]["bench_batch"]
    served = s.get("service_info", {}).get("backend")   # the backend the service chose (auto measures)
    raw = next((r for r in s["raw"] if r["backend"] == f"served-{served}" and r["batch"] == b), None)
    service, direct = s.get("score_service"), s.get("score_direct")
    if raw and service and service["img_per_s"]:
        s["ratios"]["service_over_raw"] = service["img_per_s"] / raw["img_per_s"]
        s["ratios"]["raw_reference"] = f"served-{served} {raw['precision']} b{b}: {raw['img_per_s']:,.0f} img/s"
    if service and direct and service["img_per_s"] and direct["img_per_s"]:
        s["ratios"]["service_over_direct"] = service["img_per_s"] / direct["img_per_s"]
    text = table(s) if "machine" in s else "no results"
    print("\n" + text + ("\n\nerror: " + s["error"] if "error" in s else ""), flush=True)
    with atomic_path(out / "table.txt") as tmp:
        tmp.write_text(text + "\n")
    write_json(out / "summary.json", s)
    print(f"\nwrote {out}/summary.json, table.txt, log.txt" +
          (", backends.json" if (out / "backends.json").is_file() else ""), flush=True)


if __name__ == "__main__":
    sys.exit(main())
