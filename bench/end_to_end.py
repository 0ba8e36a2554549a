"""The GPU check: every GPU path of the product, each stage a time-boxed subprocess, one table.

    python bench/end_to_end.py                        # every GPU path in < 5 min on an H100 (preset gpu)
    python bench/end_to_end.py --full                 # 950,000 OOD images through the service and directly, Locust
    python bench/end_to_end.py --preset cpu           # the same stages at CPU sizes: the dry run (the default
                                                      # without a GPU)

bench/gpu_check.sh runs it on the lent GPU machine after installing the wheels it needs. The default flow, with
the model a random-weight ResNet-50 (Part 3) at --resolution:
  1. side by side (on the CPU's two cores: one after another): `python -m export all`; torch.compile of the
     served model (plain and with flip test-time augmentation) into a cache the later stages share; the project's
     GPU tests (pytest, GPU_TESTS); Part 1 and the robust recipe (--weights none, bf16 autocast, channels_last,
     EMA) trained on generated data for 2 epochs, the robust recipe also paused after 1 and resumed;
  2. alone on the machine, for timing: bench/train_throughput.py (training img/s, the data loader's where it
     reports it), bench/backends.py (eager fp32/fp16, the served torch backend compiled, with and without flip,
     ONNX Runtime CUDA and TensorRT where their packages import), then `bentoml serve` in the two-process layout
     and in the one-process layout, each scoring a Kaggle-format OOD set and timing /classify.
--full: export and compile, bench/backends.py, `bentoml serve`, Locust (1 user on /classify, then N users on both
endpoints), the 950,000-image OOD set scored through the service and with --direct.

Each stage's limit is cut from one --budget; a stage that fails or runs out of time is reported as such and the
rest goes on where it can. summary.json and table.txt (in --out) are rewritten after every stage, so a run cut
short still reports what finished; logs.tar.gz holds every stage's log. Figures come from the files the stages
write (bench/gpu_report.py reads them), never from their printed lines. The service is always stopped.
"""
import argparse
import http.client
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench import gpu_report as report  # noqa: E402
from serving.local_server import LocalServer, stop_process_group  # noqa: E402
from serving.score import N_FILES  # noqa: E402
from training.checkpoint import save_random_checkpoint  # noqa: E402
from training.contract import CHECKPOINT_FILE, MODEL_NAME, NUM_CLASSES, random_images  # noqa: E402
from training.files import atomic_path, write_json  # noqa: E402

FULL_SET = 950_000
# Sizes of the default flow; options given on the command line win. The CPU's dry run checks the plumbing: the robust
# recipe on Part 1's small CNN (ResNet-50 trains at ~5 img/s on two cores), one stage at a time.
PRESETS = {
    "gpu": {"resolution": 224, "images": 38_000, "train_per_class": 20, "train_batch": 64, "train_arch": "resnet50",
            "train_steps": 20, "speed_parts": "part1,robust", "workers": 4, "batch_sizes": "1,256",
            "served_tta": "none,flip"},
    "cpu": {"resolution": 32, "images": 1_900, "train_per_class": 1, "train_batch": 32, "train_arch": "simple_cnn",
            "train_steps": 2, "speed_parts": "part1", "workers": 0, "batch_sizes": "1,32", "served_tta": "none"},
}
# The tests that skip without a GPU, run by the check on one. tests/test_gpu_check.py checks that each exists.
GPU_TESTS = ["tests/test_gpu.py", "tests/test_backends.py::test_torch_gpu_call_path[cuda-compiled]",
             "tests/test_workers.py::test_a_bound_worker_sees_exactly_its_gpu",
             "tests/test_export.py::test_tensorrt_engine_build_and_parity"]
COMPILE_CACHE = "/tmp/cifar100-torchinductor"   # outside the wiped scratch folder: a rerun on the machine reuses it


class Stages:
    """Subprocesses under one deadline, one after another or side by side; each stage's status, seconds and log
    tail are recorded, and ON_CHANGE runs after each (the summary is rewritten)."""

    def __init__(self, budget, logs, log_file, on_change=lambda: None):
        self.deadline = time.monotonic() + budget
        self.logs, self.log_file, self.on_change = logs, log_file, on_change
        self.results, self.running, self.ended = {}, {}, {}

    def left(self):
        return self.deadline - time.monotonic()

    def note(self, text):
        print(text, flush=True)
        with open(self.log_file, "a") as f:
            f.write(text + "\n")

    def record(self, name, status, seconds, **extra):
        """A stage's result (also for work done in this process: the service's start)."""
        self.results[name] = {"status": status, "seconds": round(seconds, 1), **extra}
        self.note(f"   {name}: {status} in {seconds:.1f} s")
        self.on_change()

    def start(self, name, cmd, cap, reserve=0.0, env=None):
        """Start CMD (stdout+stderr to logs/NAME.log) with at most min(cap, time left - reserve) seconds; returns
        NAME to wait() for, or None when no time is left (recorded as skipped)."""
        limit = min(cap, self.left() - reserve)
        if limit < 5:
            self.record(name, "skipped: no time left", 0.0)
            return None
        self.note(f"== {name} (limit {limit:.0f} s): {' '.join(map(str, cmd))}")
        with open(self.logs / f"{name}.log", "w") as out:
            proc = subprocess.Popen(list(map(str, cmd)), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})}, start_new_session=True)
        self.running[name] = (proc, time.monotonic(), limit)
        # When it ends, also while this process waits for another stage.
        threading.Thread(target=lambda: (proc.wait(), self.ended.setdefault(name, time.monotonic())),
                         daemon=True).start()
        return name

    def wait(self, name):
        """Wait for a started stage until its limit; returns (ok | failed | timed | skipped, its log text)."""
        if name not in self.running:
            return "skipped", ""
        proc, start, limit = self.running[name]
        try:
            rc = proc.wait(timeout=max(0.0, start + limit - time.monotonic()))
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            stop_process_group(proc.pid, grace=10, leader=proc)
            status = "timed out"
        del self.running[name]
        seconds = self.ended.pop(name, time.monotonic()) - start
        text = (self.logs / f"{name}.log").read_text(errors="replace")
        tail = tail_lines(text, 40 if status != "ok" else 8)
        with open(self.log_file, "a") as f:
            f.write(tail + "\n")
        if status != "ok":
            print(tail, flush=True)
        self.record(name, status, seconds, limit_s=round(limit))
        return status.split(" ")[0], text

    def run(self, name, cmd, cap, reserve=0.0, env=None):
        return self.wait(self.start(name, cmd, cap, reserve, env))

    def stop_all(self):
        for proc, _, _ in list(self.running.values()):
            stop_process_group(proc.pid, grace=10, leader=proc)


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
    for dist in ("bentoml", "locust", "pytest", "onnxruntime", "onnxruntime-gpu", "onnx", "numpy", "tensorrt",
                 "tensorrt-cu13", "tensorrt-cu12", "wandb"):
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


def compile_cache():
    """torch.compile's caches on disk, shared by every stage (FX graph and AOTAutograd caches: a later process
    that traces the same graph loads its kernels instead of compiling them). Returns (folder, warm at start)."""
    folder = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", COMPILE_CACHE))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return str(folder), folder.is_dir() and any(folder.iterdir())


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


def png_bytes():
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(random_images(1)[0]).save(buffer, "PNG")
    return buffer.getvalue()


def classify_latency(url, seconds=8.0, requests=300, warmup=10):
    """/classify with one PNG as the raw body, one request at a time on one connection: p50/p99 in ms."""
    address = urllib.parse.urlparse(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    body, times, start = png_bytes(), [], time.monotonic()
    try:
        for i in range(warmup + requests):
            t0 = time.perf_counter()
            connection.request("POST", "/classify", body, {"Content-Type": "image/png"})
            response = connection.getresponse()
            text = response.read()
            if response.status != 200:
                raise RuntimeError(f"/classify answered {response.status}: {text[:200]!r}")
            if i >= warmup:
                times.append(1e3 * (time.perf_counter() - t0))
            if time.monotonic() - start > seconds:
                break
    finally:
        connection.close()
    return {"requests": len(times), "p50_ms": statistics.median(times),
            "p99_ms": float(np.percentile(times, 99))} if times else None


class GpuSampler:
    """nvidia-smi utilisation/memory every 0.5 s while a stage runs (nothing without nvidia-smi)."""

    def __init__(self, path):
        self.proc, self.path = None, path
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                          "--format=csv,noheader,nounits", "-lms", "500"],
                                         stdout=open(path, "w"), stderr=subprocess.DEVNULL, start_new_session=True)

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
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


def start_service(stages, name, home, run_dir, env):
    """`bentoml serve` on a free loopback port, or None (its failure recorded under NAME)."""
    t0 = time.monotonic()
    if stages.left() < 30:
        stages.record(name, "skipped: no time left", 0.0)
        return None
    try:
        service = LocalServer(home, {"CIFAR100_MODEL": f"{MODEL_NAME}:latest", **env}, run_dir=run_dir,
                              ready_timeout=max(5, min(240, stages.left() - 20)))
    except RuntimeError as e:   # its message ends with the server log's tail
        stages.note(tail_lines(str(e), 30))
        stages.record(name, str(e).splitlines()[0], time.monotonic() - t0)
        return None
    stages.record(name, "ok", time.monotonic() - t0)
    return service


# ---------------------------------------------------------------- the default flow

def default_flow(a, s, stages, work, out, home):
    py, cuda = sys.executable, s["machine"]["cuda"]
    device = "cuda" if cuda else "cpu"
    timing_reserve = 0.45 * a.budget   # the stages of part 2 (timed alone) need this much at the end
    ckpt, data, train = work / "part3.pt", work / "data", work / "train"
    save_random_checkpoint(ckpt, "part3", resolution=a.resolution)   # speed does not need accuracy
    from training.synthetic import write_dataset
    write_dataset(data, per_class=a.train_per_class)
    ood = threading.Thread(target=write_ood, args=(work / "ood", s["config"]["per_file"]))
    ood.start()

    def start(name, cmd, cap):
        return stages.start(name, cmd, cap, reserve=timing_reserve, env=None if cuda else {"OMP_NUM_THREADS": "1"})

    # Part 1, side by side: export (CPU), compile, the GPU tests and the training runs (the batch-size finder's
    # out-of-memory loop is a GPU test, within a memory limit of its own: here it would take the others' memory).
    # On the CPU's two cores, two at a time, a thread each.
    trt = s["machine"]["tensorrt_unavailable"] is None
    export = stages.start("export", [py, "-m", "export", "all", "--checkpoint", ckpt, "--out", work / "artifacts"],
                          cap=150 + 180 * trt, reserve=timing_reserve)   # a TensorRT build takes 1-3 minutes more
    compiles, compiling = [], cuda and os.environ.get("CIFAR100_TORCH_COMPILE", "1") == "1"
    if compiling:   # the served model, compiled once into the shared cache: plain and with flip, side by side
        model_dir = work / "compile_model"
        model_dir.mkdir()
        (model_dir / CHECKPOINT_FILE).symlink_to(ckpt)
        for tta in a.served_tta.split(","):
            name = "compile" if tta == "none" else f"compile_{tta}"
            compiles.append(start(name, [py, "bench/backends.py", "--model-dir", model_dir, "--only", "served-torch",
                                         "--served-tta", tta, "--batch-sizes", "", "--json", work / f"{name}.json"],
                                  cap=240))
    else:
        stages.record("compile", "skipped: " + ("CIFAR100_TORCH_COMPILE=0" if cuda else "no GPU (the CPU serves eager)"),
                      0.0)
    if cuda:
        tests = start("gpu_tests", [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *GPU_TESTS,
                                    "--junitxml", work / "logs" / "gpu_tests.xml"], cap=240)
    else:
        tests = None
        stages.record("gpu_tests", "skipped: no GPU (they would all skip)", 0.0)
    common = ["--data-dir", data, "--device", device, "--wandb", "disabled", "--workers", a.workers]
    part1 = start("train_part1", [py, "-m", "training", "part1", *common, "--out", train / "straight", "--epochs", 2],
                  cap=120)
    if not cuda:
        stages.wait(export)
        stages.wait(part1)
    robust = ["robust", *common, "--weights", "none", "--arch", a.train_arch, "--epochs", 2,
              "--batch-size", a.train_batch, "--resolution", a.resolution]
    straight = start("train_robust", [py, "-m", "training", *robust, "--out", train / "straight"], cap=150)
    if stages.wait(start("train_robust_pause", [py, "-m", "training", *robust, "--out", train / "paused",
                                               "--pause-after", 1], cap=120))[0] == "ok":
        stages.wait(start("train_robust_resume", [py, "-m", "training", *robust, "--out", train / "paused",
                                                  "--resume"], cap=120))
    stages.wait(part1)
    stages.wait(straight)
    s["training"] = report.training_summary(train)
    for name in compiles:
        stages.wait(name)
    s["compile"] = [row for name in compiles if name for row in report.compiled(work / f"{name}.json")]
    stages.wait(tests)
    s["gpu_tests"] = report.junit_summary(work / "logs" / "gpu_tests.xml")
    stages.wait(export)
    stages.on_change()

    # Part 2, one stage at a time: timings.
    speed = [py, "bench/train_throughput.py", "--parts", a.speed_parts, "--steps", a.train_steps, "--json",
             work / "train_speed.json", "--device", device]
    if not cuda:   # the CPU: the dry run's size, small batches
        speed += ["--resolution", a.resolution, "--batch-size", a.train_batch]
    stages.run("train_speed", speed, cap=90)
    s["train_speed"] = report.speed_summary(work / "train_speed.json")
    stages.on_change()
    entry = store_entry(home)
    if entry is None:
        raise RuntimeError("export did not produce a model store entry; see the export log above")
    served_tta = compiled_or_eager(s, stages) if compiling else a.served_tta
    only = "torch-eager,onnxruntime,tensorrt,served-torch,served-onnx,served-tensorrt" if cuda else \
        "served-torch,served-onnx"
    stages.run("bench", [py, "bench/backends.py", "--model-dir", entry, "--only", only, "--served-tta", served_tta,
                         "--batch-sizes", a.batch_sizes, "--iters", 20, "--max-seconds", 1,
                         "--json", out / "backends.json"], cap=120, reserve=0.3 * a.budget)
    s["raw"] = report.bench_rows(out / "backends.json")
    s["bench_skipped"] = (report.read_json(out / "backends.json") or {}).get("skipped", {})
    stages.on_change()
    ood.join()
    s["layouts"] = {}
    for processes in (2, 1):
        measure_layout(a, s, stages, work, home, processes)
        stages.on_change()


def compiled_or_eager(s, stages):
    """The test-time augmentations the compile stages put in the cache (a cold compile would eat a later stage's
    time). Without the plain model among them, the later stages serve eager (CIFAR100_TORCH_COMPILE=0)."""
    done = [r["tta"] for r in s.get("compile") or [] if not r["compile_error"]]
    if "none" not in done:
        os.environ["CIFAR100_TORCH_COMPILE"] = "0"
        s["compile_skipped"] = "no compiled model from the compile stage: the later stages serve eager"
        stages.note(f"== {s['compile_skipped']}")
    return ",".join(done) or "none"


def measure_layout(a, s, stages, work, home, processes):
    """One layout of the service (CIFAR100_PROCESSES): its start, the OOD set scored through it, /classify; into
    s["layouts"] as they come."""
    service = start_service(stages, f"service_{processes}p", home, work / "service",
                            {"CIFAR100_BACKEND": a.backend, "CIFAR100_PROCESSES": processes})
    if service is None:
        return
    try:
        info = get_json(service.url + "/info")
        s.setdefault("service_info", info)
        r = s["layouts"][str(processes)] = {
            "start_seconds": stages.results[f"service_{processes}p"]["seconds"],
            **{k: info.get(k) for k in ("backend", "precision", "device", "warmup_seconds", "compile_error")}}
        before = model_stats(service.url)
        status, _ = stages.run(f"score_{processes}p", [
            sys.executable, "-m", "serving.score", "--ood-dir", work / "ood", "--chunk-size", a.chunk_size, "--url",
            service.url, "--in-flight", a.in_flight, "--out", work / f"service{processes}.csv",
            "--json", work / f"service{processes}.json"], cap=120, reserve=20 if processes == 2 else 5)
        seconds = stages.results[f"score_{processes}p"]["seconds"]
        if status != "skipped":
            r["score"] = report.score_result(status, work / f"service{processes}.json",
                                             work / f"service{processes}.csv", seconds)
            after = model_stats(service.url)
            if after.get("seconds") is not None and seconds:
                r["model_busy"] = min(1.0, (after["seconds"] - before.get("seconds", 0)) / seconds)
        if stages.left() > 10:
            r["classify"] = classify_latency(service.url, seconds=min(6.0, stages.left() - 8))
    finally:
        service.stop()


# ---------------------------------------------------------------- the --full flow

def full_flow(a, s, stages, work, out, home):
    py, cuda = sys.executable, s["machine"]["cuda"]
    ckpt = work / "part3.pt"
    save_random_checkpoint(ckpt, "part3", resolution=a.resolution)
    trt = s["machine"]["tensorrt_unavailable"] is None
    export = stages.start("export", [py, "-m", "export", "all", "--checkpoint", ckpt, "--out", work / "artifacts"],
                          cap=240 + 180 * trt)
    if cuda and os.environ.get("CIFAR100_TORCH_COMPILE", "1") == "1":
        # compiled once, while the CPU exports: the bench, the service and the direct run load the cache
        model_dir = work / "compile_model"
        model_dir.mkdir()
        (model_dir / CHECKPOINT_FILE).symlink_to(ckpt)
        stages.run("compile", [py, "bench/backends.py", "--model-dir", model_dir, "--only", "served-torch",
                               "--batch-sizes", "", "--json", work / "compile.json"], cap=240, reserve=0.6 * a.budget)
        s["compile"] = report.compiled(work / "compile.json")
        compiled_or_eager(s, stages)
    stages.wait(export)
    entry = store_entry(home)
    if entry is None:
        raise RuntimeError("export did not produce a model store entry; see the export log above")

    only = "torch-eager,onnxruntime,tensorrt,served-torch,served-onnx,served-tensorrt" if cuda else \
        "torch-eager,onnxruntime,served-torch,served-onnx"
    stages.run("bench", [py, "bench/backends.py", "--model-dir", entry, "--only", only, "--batch-sizes",
                         a.batch_sizes, "--iters", 30, "--max-seconds", 3, "--json", out / "backends.json"],
               cap=200, reserve=0.55 * stages.left())
    s["raw"] = report.bench_rows(out / "backends.json")
    s["bench_skipped"] = (report.read_json(out / "backends.json") or {}).get("skipped", {})

    # The OOD set is written while the service starts (CPU work vs. the service's model loading).
    ood = work / "ood"
    writer = threading.Thread(target=write_ood, args=(ood, s["config"]["per_file"]))
    t0 = time.monotonic()
    writer.start()
    service = start_service(stages, "service_start", home, work / "service", {"CIFAR100_BACKEND": a.backend})
    writer.join()
    stages.record("write_ood", "ok", time.monotonic() - t0, images=s["config"]["images_written"])
    if service is None:
        raise RuntimeError("the service did not become ready")
    sampler = None
    try:
        s["service_info"] = get_json(service.url + "/info")
        loadtest = [py, "-m", "loadtest", "--host", service.url]
        stages.run("locust_low", loadtest + ["--users", 1, "--tags", "images", "--run-time", f"{a.locust_seconds}s",
                                             "--out", work / "locust_low"], cap=a.locust_seconds + 60, reserve=120)
        s["locust_low"] = report.locust_summary(work / "locust_low")
        stages.run("locust_load", loadtest + ["--users", a.locust_users, "--batch", 256, "--run-time",
                                              f"{a.locust_seconds}s", "--out", work / "locust_load"],
                   cap=a.locust_seconds + 60, reserve=120)
        s["locust_load"] = report.locust_summary(work / "locust_load")

        before = model_stats(service.url)
        sampler = GpuSampler(work / "logs" / "gpu_service.csv")
        score = [py, "-m", "serving.score", "--ood-dir", ood, "--chunk-size", a.chunk_size]
        # What is left, less a share for the direct run, stopping the service and the report.
        status, _ = stages.run("score_service", score + ["--url", service.url, "--in-flight", a.in_flight,
                                                         "--out", work / "service.csv", "--json", work / "service.json"],
                               cap=1e9, reserve=max(25, 0.35 * stages.left()))
        after = model_stats(service.url)   # at once: the service goes on with queued chunks
        s["gpu_while_scoring"] = sampler.stop()
        seconds = stages.results["score_service"]["seconds"]
        if status != "skipped":
            s["score_service"] = r = report.score_result(status, work / "service.json", work / "service.csv", seconds)
            calls, images = (after.get(k, 0) - before.get(k, 0) for k in ("model_calls", "images"))
            if not r["complete"] and images > r["images"]:
                # Cut short with many chunks in flight, few are finished: count what the model has done.
                r.update(images=images, img_per_s=images / seconds, counted="images through the model (/info)")
            if calls:
                s["service_model_busy"] = {"busy_fraction": min(1.0, (after["seconds"] - before.get("seconds", 0)) / seconds),
                                           "mean_batch": images / calls, "largest_call": after["largest_call"],
                                           "model_calls": calls}
    finally:
        if sampler is not None:
            sampler.stop()
        service.stop()

    status, _ = stages.run("score_direct", score + ["--direct", entry, "--backend", a.backend, "--out",
                                                    work / "direct.csv", "--json", work / "direct.json"],
                           cap=1e9, reserve=8)
    if status != "skipped":
        s["score_direct"] = report.score_result(status, work / "direct.json", work / "direct.csv",
                                                stages.results["score_direct"]["seconds"])
    s["agreement"] = report.agreement(report.chunk_labels(work / "service.csv", s["config"]["per_file"], a.chunk_size),
                                      report.chunk_labels(work / "direct.csv", s["config"]["per_file"], a.chunk_size))


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__[__doc__.index("\n"):])
    p.add_argument("--out", default=os.environ.get("CIFAR100_BENCH_OUT") or "build/gpu_check",
                   help="results: summary.json, table.txt, backends.json, logs.tar.gz (default $CIFAR100_BENCH_OUT, "
                        "else %(default)s)")
    p.add_argument("--work", default="/tmp/gpu_check", help="scratch: model store, data, logs (wiped; default %(default)s)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="the default flow's sizes (default: gpu where CUDA sees a GPU, else cpu)")
    p.add_argument("--full", action="store_true", help="the 950,000-image flow instead (a second command)")
    p.add_argument("--images", type=int, default=None, help="OOD images in all (19 files; default: the preset's, "
                                                            f"{FULL_SET:,} with --full)")
    p.add_argument("--resolution", type=int, default=None, help="the ResNet-50's input size (default: the preset's)")
    p.add_argument("--budget", type=float, default=None, help="seconds for all stages (default 270; --full 540)")
    p.add_argument("--backend", default="auto", help="the service's CIFAR100_BACKEND (default %(default)s)")
    p.add_argument("--chunk-size", type=int, default=4096, help="images per scoring request (default %(default)s)")
    p.add_argument("--in-flight", type=int, default=8, help="scoring requests at once (default %(default)s)")
    p.add_argument("--batch-sizes", default=None,
                   help="for bench/backends.py (default: the preset's; --full 1,100,256: the served torch backend "
                        "pads 100 to its 128 bucket)")
    p.add_argument("--train-per-class", type=int, default=None, help="generated training images per class")
    p.add_argument("--train-batch", type=int, default=None, help="the robust recipe's batch size in the check")
    p.add_argument("--train-steps", type=int, default=None, help="timed steps of bench/train_throughput.py")
    p.add_argument("--workers", type=int, default=None, help="data-loader workers of the training runs")
    p.add_argument("--locust-seconds", type=int, default=15, help="--full: each Locust run (default %(default)s)")
    p.add_argument("--locust-users", type=int, default=32, help="--full: users of the loaded Locust run (default %(default)s)")
    p.add_argument("--keep-data", action="store_true", help="keep the OOD set in WORK/ood (deleted at the end otherwise)")
    a = p.parse_args(argv)
    if a.preset is None:
        import torch
        a.preset = "gpu" if torch.cuda.is_available() else "cpu"
    if a.full and a.images is None:
        a.images = FULL_SET
    explicit_batches = a.batch_sizes
    for key, value in PRESETS[a.preset].items():
        if getattr(a, key, None) is None:
            setattr(a, key, value)
    if a.full and explicit_batches is None:
        a.batch_sizes = "1,100,256"
    a.budget = a.budget or (540 if a.full else 270)
    return a


def main(argv=None):
    a = parse_args(argv)
    out, work = Path(a.out).resolve(), Path(a.work).resolve()
    if work == Path("/") or work == REPO:
        sys.exit(f"error: --work {work} would be wiped; give a scratch folder")
    shutil.rmtree(work, ignore_errors=True)
    logs = work / "logs"
    logs.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # the finally block below still runs

    per_file = max(a.images // N_FILES // 5 * 5, 5)
    s = {"config": {**{k: v for k, v in vars(a).items() if k not in ("out", "work")}, "full_set": FULL_SET,
                    "per_file": per_file, "images_written": per_file * N_FILES,
                    "bench_batch": max(int(b) for b in a.batch_sizes.split(","))},
         "raw": [], "ratios": {}}
    started = time.monotonic()
    stages = Stages(a.budget, logs, logs / "log.txt", on_change=lambda: finish(s, out, logs, started, quiet=True))
    s["stages"] = stages.results
    try:
        s["machine"] = machine_info()
        s["compile_cache"], s["compile_cache_warm"] = compile_cache()
        stages.note(f"== {'--full' if a.full else 'preset ' + a.preset}, budget {a.budget:.0f} s: "
                    + json.dumps(s["machine"]))
        home = work / "bentoml"
        os.environ.update({"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True", "PYTHONUNBUFFERED": "1",
                           "WANDB_MODE": "disabled"})
        (full_flow if a.full else default_flow)(a, s, stages, work, out, home)
    except Exception as e:
        s["error"] = f"{type(e).__name__}: {e}"
        stages.note(f"error: {s['error']}")
    except (KeyboardInterrupt, SystemExit):
        s["error"] = "stopped by a signal before the end"
        raise
    finally:
        stages.stop_all()
        if not a.keep_data:   # 2.9 GB at full size; the logs stay in WORK/logs
            shutil.rmtree(work / "ood", ignore_errors=True)
        finish(s, out, logs, started)
    return 1 if "error" in s else 0


def finish(s, out, logs, started, quiet=False):
    """Ratios, the table, summary.json, the logs' archive: after every stage and at the end (with what there is)."""
    s["seconds"] = round(time.monotonic() - started, 1)
    b = s["config"]["bench_batch"]
    served = (s.get("service_info") or {}).get("backend")   # the backend the service chose (auto measures)
    raw = next((r for r in s["raw"] if r["backend"] == f"served-{served}" and r["batch"] == b
                and r.get("tta", "none") == "none"), None)
    service, direct = s.get("score_service"), s.get("score_direct")
    if raw and service and service["img_per_s"]:
        s["ratios"]["service_over_raw"] = service["img_per_s"] / raw["img_per_s"]
        s["ratios"]["raw_reference"] = f"served-{served} {raw['precision']} b{b}: {raw['img_per_s']:,.0f} img/s"
    if service and direct and service["img_per_s"] and direct["img_per_s"]:
        s["ratios"]["service_over_direct"] = service["img_per_s"] / direct["img_per_s"]
    text = report.table(s) if "machine" in s else "no results"
    with atomic_path(out / "table.txt") as tmp:
        tmp.write_text(text + "\n")
    write_json(out / "summary.json", s)
    with atomic_path(out / "logs.tar.gz") as tmp, tarfile.open(tmp, "w:gz") as tar:
        tar.add(logs, arcname="logs")
    if not quiet:
        print("\n" + text, flush=True)
        print(f"\nwrote {out}/summary.json, table.txt, logs.tar.gz" +
              (", backends.json" if (out / "backends.json").is_file() else ""), flush=True)


if __name__ == "__main__":
    sys.exit(main())
