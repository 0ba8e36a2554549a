"""bench/gpu_check.sh, bench/end_to_end.py and bench/gpu_report.py without a GPU (seconds): the wheel list, where the
results land, the time-boxed stages and the summary written after each, and the figures read back from what the
stages write. The whole dry run (about 3 min on 2 cores) is `bash bench/gpu_check.sh` without a GPU, run by hand:
too slow for the suite."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from bench import gpu_report as report

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("end_to_end", REPO / "bench" / "end_to_end.py")
e2e = importlib.util.module_from_spec(spec)
spec.loader.exec_module(e2e)


def normalise(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_lists():
    text = (REPO / "bench" / "fetch_wheels.sh").read_text()
    return {key: re.search(rf"^{key}=\((.*?)\)", text, re.S | re.M)[1].split() for key in ("REQUIRED", "IF_MISSING")}


def pins():
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return {normalise(n): v for n, v in (ln.split("==", 1) for ln in lines if "==" in ln)}


def test_scripts_parse():
    for script in ("gpu_check.sh", "fetch_wheels.sh"):
        subprocess.run(["bash", "-n", REPO / "bench" / script], check=True)


def test_every_wheel_is_pinned_once():
    lists, pinned = wheel_lists(), pins()
    names = [normalise(n) for n in lists["REQUIRED"] + lists["IF_MISSING"]]
    assert len(names) == len(set(names))
    assert {"bentoml", "locust", "pydantic", "starlette", "tqdm", "matplotlib", "pytest", "pluggy"} <= set(names)
    assert [n for n in names if n not in pinned] == []


def test_downloaded_wheels_match_the_pins():
    folder = REPO / ".whl"
    if not folder.is_dir():
        pytest.skip("no .whl folder (bash bench/fetch_wheels.sh downloads it)")
    wheels = sorted(folder.rglob("*.whl"))
    lists, pinned = wheel_lists(), pins()
    found = {normalise(w.name.split("-")[0]): w for w in wheels}
    assert len(found) == len(wheels), "two versions of one package"
    assert set(found) == {normalise(n) for n in lists["REQUIRED"] + lists["IF_MISSING"]}
    for name, wheel in found.items():
        assert wheel.name.split("-")[1] == pinned[name], wheel.name
        tags = wheel.name[:-4].split("-")[-3:]
        assert tags[0] in ("py3", "py2.py3", "cp312") or tags[1] == "abi3", wheel.name
        assert tags[2] == "any" or "x86_64" in tags[2], wheel.name
    assert sum(w.stat().st_size for w in wheels) < 48 * 2**20   # the device tool carries 64 MiB in all


def gpu_check(tmp_path, *args, **env):
    """bash bench/gpu_check.sh ARGS with this venv's python: (exit code, console.txt of the results folder)."""
    full_env = {**os.environ, "PYTHON": sys.executable, "CIFAR100_BENCH_WORK": str(tmp_path / "work"), **env}
    done = subprocess.run(["bash", "bench/gpu_check.sh", *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=120)
    return done.returncode, done.stdout


def test_results_land_directly_in_the_folder_that_comes_back(tmp_path, monkeypatch):
    """The device tool brings back only what is written under $OUT: the check writes there unless told otherwise,
    and spends its budget from its own start (install included)."""
    monkeypatch.delenv("CIFAR100_BENCH_OUT", raising=False)
    rc, stdout = gpu_check(tmp_path, "--help", OUT=str(tmp_path / "device"))
    assert rc == 0 and "usage: end_to_end.py" in stdout
    assert "usage: end_to_end.py" in (tmp_path / "device" / "console.txt").read_text()
    rc, stdout = gpu_check(tmp_path, OUT=str(tmp_path / "device"), CIFAR100_BENCH_OUT=str(tmp_path / "mine"),
                           CIFAR100_BENCH_BUDGET="40")
    assert rc == 1 and re.search(r"error: only \d+ s left of 40 after the install", stdout)
    assert "results in " + str(tmp_path / "mine") in (tmp_path / "mine" / "console.txt").read_text()


def test_a_stage_that_runs_too_long_is_killed_with_its_children(tmp_path):
    stages = e2e.Stages(budget=60, logs=tmp_path, log_file=tmp_path / "log.txt")
    pid_file = tmp_path / "child.pid"
    start = time.monotonic()
    status, text = stages.run("sleepy", ["bash", "-c", f"echo hello; sleep 60 & echo $! > {pid_file}; wait"], cap=5)
    assert status == "timed" and stages.results["sleepy"]["status"] == "timed out"
    assert "hello" in text and time.monotonic() - start < 25
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)   # the grandchild went with its group


def test_stages_share_one_budget_and_run_side_by_side(tmp_path):
    stages = e2e.Stages(budget=3, logs=tmp_path, log_file=tmp_path / "log.txt")
    assert stages.run("late", ["true"], cap=100)[0] == "skipped"
    changes = []
    stages = e2e.Stages(budget=60, logs=tmp_path, log_file=tmp_path / "log.txt",
                        on_change=lambda: changes.append(dict(stages.results)))
    assert stages.run("fails", ["bash", "-c", "exit 3"], cap=10)[0] == "failed"
    assert stages.results["fails"]["status"] == "failed (exit 3)"
    assert "fails: failed (exit 3)" in (tmp_path / "log.txt").read_text()
    start = time.monotonic()
    slow, quick = stages.start("slow", ["sleep", "2"], cap=10), stages.start("quick", ["true"], cap=10)
    assert stages.wait(slow)[0] == "ok" and stages.wait(quick)[0] == "ok"
    assert time.monotonic() - start < 4   # side by side
    assert stages.results["quick"]["seconds"] < 1 < stages.results["slow"]["seconds"]   # each its own end
    assert [list(c) for c in changes] == [["fails"], ["fails", "slow"], ["fails", "slow", "quick"]]


def test_the_summary_is_rewritten_after_every_stage(tmp_path, monkeypatch):
    """A run cut short (here, by its budget) still reports what finished, at every step."""
    seen = []

    def flow(a, s, stages, work, out, home):
        stages.run("first", ["true"], cap=10)
        seen.append(json.loads((out / "summary.json").read_text())["stages"])
        assert "first" in (out / "table.txt").read_text()
        stages.run("second", ["sleep", "30"], cap=100)   # past the budget: stopped

    monkeypatch.setattr(e2e, "default_flow", flow)
    monkeypatch.setattr(e2e, "machine_info", lambda: {"torch": "x", "cpu_threads": 2, "cuda": False,
                                                      "tensorrt_unavailable": "the tensorrt package is not installed"})
    out = tmp_path / "out"
    assert e2e.main(["--out", str(out), "--work", str(tmp_path / "work"), "--budget", "6", "--preset", "cpu"]) == 0
    assert seen == [{"first": {"status": "ok", "seconds": pytest.approx(0, abs=1), "limit_s": 6}}]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["second"]["status"] == "timed out" and summary["config"]["preset"] == "cpu"
    assert re.search(r"stage second\s+timed out", (out / "table.txt").read_text())
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert {"logs/first.log", "logs/second.log", "logs/log.txt"} <= set(tar.getnames())
    assert sorted(os.listdir(out)) == ["logs.tar.gz", "summary.json", "table.txt"]   # a handful of files


def test_presets(monkeypatch):
    a = e2e.parse_args(["--preset", "cpu"])
    assert (a.resolution, a.images, a.train_arch, a.batch_sizes, a.full, a.budget) == (32, 1900, "simple_cnn", "1,32",
                                                                                     False, 270)
    a = e2e.parse_args(["--preset", "gpu", "--full"])
    assert (a.resolution, a.images, a.batch_sizes, a.budget) == (224, 950_000, "1,100,256", 540)
    a = e2e.parse_args(["--preset", "gpu", "--full", "--images", "5000", "--resolution", "32", "--batch-sizes", "1"])
    assert (a.resolution, a.images, a.batch_sizes) == (32, 5000, "1")
    monkeypatch.setenv("CIFAR100_BENCH_OUT", "/somewhere")
    assert e2e.parse_args([]).out == "/somewhere"


def test_the_gpu_tests_exist():
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           *e2e.GPU_TESTS], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    collected = [ln for ln in done.stdout.splitlines() if "::" in ln]
    assert len(collected) >= 7 and all(any(ln.startswith(t) for ln in collected) for t in e2e.GPU_TESTS)


def test_the_ood_set_is_what_the_scoring_client_takes(tmp_path):
    from serving.score import open_ood_dir
    e2e.write_ood(tmp_path, 15)
    sources, layout, _ = open_ood_dir(tmp_path)
    assert layout == "kaggle"
    assert [len(s.images) for s in sources] == [15] * 19
    assert not np.array_equal(sources[0].images, sources[1].images)   # not 19 copies of one file


# ---------------------------------------------------------------- figures read back (bench/gpu_report.py)

def test_scoring_rates_from_a_finished_and_a_cut_short_run(tmp_path):
    from serving.score import figures
    (tmp_path / "x.json").write_text(json.dumps(figures(4940, 23.8, True, requests=19)))
    done = report.score_result("ok", tmp_path / "x.json", tmp_path / "x.csv", 25)
    assert done == {"complete": True, "images": 4940, "requests": 19, "seconds": 23.8,
                    "img_per_s": pytest.approx(4940 / 23.8), "process_seconds": 25}
    parts = tmp_path / "cut.csv.parts"
    parts.mkdir()
    for i in range(3):
        np.save(parts / f"chunk{i:06d}.npy", np.full(4, i, np.uint8))
    cut = report.score_result("timed", tmp_path / "cut.json", tmp_path / "cut.csv", 2.0)
    assert cut["complete"] is False and cut["images"] == 12 and cut["img_per_s"] == 6.0
    assert cut.keys() == done.keys() - {"requests"}   # one schema


def test_service_and_direct_labels_are_compared_chunk_by_chunk(tmp_path):
    per_file, chunk = 10, 4                       # chunks of 4, 4, 2 in each of the 19 files
    labels = np.arange(190) % 100
    (tmp_path / "a.csv").write_text("id,label\n" + "".join(f"x_{i},{y}\n" for i, y in enumerate(labels)))
    a = report.chunk_labels(tmp_path / "a.csv", per_file, chunk)
    assert len(a) == 57 and [len(a[i]) for i in range(3)] == [4, 4, 2]
    parts = tmp_path / "b.csv.parts"
    parts.mkdir()
    np.save(parts / "chunk000001.npy", a[1])
    np.save(parts / "chunk000002.npy", (a[2] + 1) % 100)
    b = report.chunk_labels(tmp_path / "b.csv", per_file, chunk)
    assert report.agreement(a, b) == {"images": 6, "same_label": 4 / 6}
    assert report.agreement(a, {}) is None


def epoch(lr, train_loss, val_loss, val_acc):
    return {"lr": lr, "train_loss": train_loss, "val_loss": val_loss, "val_acc": val_acc, "train_acc": 0.1}


def test_a_resume_is_judged_against_the_machines_own_noise():
    straight = [epoch(1e-3, 4.0, 4.1, 0.05), epoch(5e-4, 3.0, 3.2, 0.20)]
    assert report.resume_check(straight, [dict(r) for r in straight])["verdict"] == "continues exactly (bit-identical epoch 2)"
    noisy = [epoch(1e-3, 4.0 * (1 + 1e-5), 4.1, 0.05), epoch(5e-4, 3.0 * (1 + 5e-5), 3.2, 0.20)]
    check = report.resume_check(straight, noisy)   # a GPU: the same work twice differs a little
    assert check["ok"] and check["verdict"].endswith("(within run-to-run noise)")
    assert check["epoch1_rel_diff"] == pytest.approx(1e-5) and check["epoch2_rel_diff"] == pytest.approx(5e-5)
    lost_state = [noisy[0], epoch(5e-4, 3.4, 3.5, 0.12)]   # e.g. the optimiser or the EMA not restored
    assert report.resume_check(straight, lost_state)["verdict"] == "differs from the uninterrupted run"
    restarted_schedule = [straight[0], {**straight[1], "lr": 1e-3}]
    assert not report.resume_check(straight, restarted_schedule)["ok"]
    assert report.resume_check(straight, straight[:1]) is None and report.resume_check(None, straight) is None


def test_training_speed_is_read_defensively(tmp_path):
    rows = [{"part": "part1", "arch": "simple_cnn", "resolution": 32, "batch_size": 256, "steps": 20,
             "images_per_s": 76_000.0},
            {"part": "robust", "arch": "resnet50", "resolution": 224, "batch_size": 256, "steps": 20,
             "images_per_s": 4_000.0, "loader_images_per_s": 3_000.0, "loader_workers": 4}]
    (tmp_path / "speed.json").write_text(json.dumps({"device": "NVIDIA H100", "results": rows}))
    part1, robust = report.speed_summary(tmp_path / "speed.json")["rows"]
    assert part1["step_img_per_s"] == 76_000 and "loader_img_per_s" not in part1 and "vs_readme_estimate" not in part1
    assert robust["vs_readme_estimate"] == pytest.approx(4000 / 4200)
    assert (robust["loader_img_per_s"], robust["loader_workers"]) == (3000, 4)
    assert robust["workers_to_feed_step"] == 6   # 750 img/s per worker against 4,000 img/s of steps
    # Other key names: the step's img/s and the loader's are told apart by "loader".
    (tmp_path / "other.json").write_text(json.dumps({"results": [{"part": "robust", "step_images_per_s": 10.0,
                                                                  "loader_img_per_s": 40.0}]}))
    (row,) = report.speed_summary(tmp_path / "other.json")["rows"]
    assert (row["step_img_per_s"], row["loader_img_per_s"], row["loader_workers"]) == (10, 40, None)
    assert "workers_to_feed_step" not in row and report.speed_summary(tmp_path / "missing.json") is None
    text = "\n".join(" ".join(r) for r in report.training_rows({"train_speed": {"rows": [robust, row]}}))
    assert "0.95× the README's 4,200 img/s estimate" in text and re.search(r"loader workers to feed robust 6", text)


def test_the_gpu_tests_report_is_read_from_pytests_junit_xml(tmp_path):
    (tmp_path / "test_x.py").write_text("import pytest\n\ndef test_ok():\n    pass\n\n"
                                        "@pytest.mark.skip(reason='needs a CUDA GPU')\ndef test_gpu():\n    pass\n\n"
                                        "def test_broken():\n    assert 1 == 2, 'one is not two'\n")
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml",
                    tmp_path / "junit.xml", tmp_path / "test_x.py"], cwd=tmp_path, capture_output=True, timeout=60)
    summary = report.junit_summary(tmp_path / "junit.xml")
    assert (summary["passed"], summary["failed"], summary["skipped"]) == (1, 1, 1)
    assert summary["skip_reasons"] == {"needs a CUDA GPU": 1}
    assert summary["failures"][0].startswith("test_x::test_broken: AssertionError: one is not two")
    assert report.junit_summary(tmp_path / "missing.xml") is None


def test_onnx_runtime_and_tensorrt_rows_say_why_in_plain_words():
    machine = {"cuda": True, "onnxruntime": "1.30.0", "tensorrt_unavailable":
               "the tensorrt package is not installed (pip install '.[tensorrt]')"}
    rows = report.package_rows({"machine": machine, "raw": []})
    assert [r[:2] for r in rows] == [("ONNX Runtime CUDA", "package not installed on this machine"),
                                     ("TensorRT", "package not installed on this machine")]
    assert "CPU build" in rows[0][2] and "not run" in rows[0][2] and "not run" in rows[1][2]
    broken = {"machine": {**machine, "onnxruntime-gpu": "1.31.1"}, "raw": [],
              "bench_skipped": {"served-onnx": "ONNX Runtime's CUDA provider did not start"}}
    assert report.package_rows(broken)[0][1:] == ("installed, not run", "ONNX Runtime's CUDA provider did not start")
    measured = {"machine": machine, "raw": [{"backend": "served-onnx", "device": "cuda"}]}
    assert report.package_rows(measured)[0][1] == "measured"
    assert report.package_rows({"machine": {"cuda": False}})[0][1] == "not run: no GPU here"


def bench_json(path):
    """What bench/backends.py --json writes, a failed row included."""
    def row(backend, precision, batch, ms, img_per_s, diff, agree, tta="none"):
        return {"backend": backend, "device": "cuda", "precision": precision, "tta": tta, "batch": batch,
                "iters": 30, "ms_per_batch": ms, "img_per_s": img_per_s, "max_abs_diff": diff, "top1_agree": agree}
    results = [row("torch-eager", "fp32", 1, 3.1, 323, 0.0, 1.0), row("torch-eager", "fp32", 256, 34.0, 7529, 2.1e-5, 1.0),
               row("torch-eager", "fp16+channels_last", 256, 15.3, 16732, 0.012, 0.996),
               {"backend": "onnxruntime", "device": "cuda", "precision": "fp16", "batch": 256, "error": "RuntimeError"},
               row("served-torch", "fp16+compile", 256, 15.0, 17067, 0.012, 0.996),
               row("served-torch", "fp16+compile", 256, 29.0, 8827, 0.011, 0.996, tta="flip")]
    path.write_text(json.dumps({"machine": {}, "results": results}))
    return path


def test_the_table_answers_the_questions(tmp_path):
    raw = report.bench_rows(bench_json(tmp_path / "backends.json"))
    assert report.bench_rows(tmp_path / "missing.json") == []
    assert [(r["backend"], r["precision"], r["batch"]) for r in raw] == [
        ("torch-eager", "fp32", 1), ("torch-eager", "fp32", 256), ("torch-eager", "fp16+channels_last", 256),
        ("served-torch", "fp16+compile", 256), ("served-torch", "fp16+compile", 256)]
    endpoint = {"requests": 100, "failures": 0, "rps": 6.5, "p50_ms": 12.0, "p99_ms": 40.0}
    layout = {"start_seconds": 31.0, "backend": "torch", "precision": "fp16+compile", "device": "cuda",
              "warmup_seconds": {"256": 2.0, "2": 1.0}, "model_busy": 0.8, "classify": {"requests": 300, "p50_ms": 2.1,
                                                                                       "p99_ms": 4.0}}
    s = {"config": {"resolution": 224, "full_set": 950_000, "bench_batch": 256, "backend": "auto", "full": False,
                    "preset": "gpu", "locust_users": 32, "budget": 265},
         "machine": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "cpu_threads": 16, "cuda": True,
                     "onnxruntime": "1.30.0", "tensorrt_unavailable": "the tensorrt package is not installed"},
         "stages": {"export": {"status": "ok", "seconds": 40.0, "limit_s": 150}}, "raw": raw, "ratios": {},
         "compile": [{"tta": "none", "load_seconds": 61.0, "precision": "fp16+compile", "compile_error": None,
                      "warmup_seconds": {"256": 50.0, "2": 3.0}},
                     {"tta": "flip", "load_seconds": 9.0, "precision": "fp16", "warmup_seconds": None,
                      "compile_error": "AssertionError: "}],
         "training": {"part1": {"device": "cuda", "batch_size": 65536, "epochs_run": 2, "images_per_s": 9000.0,
                                "best_val_acc": 0.05, "test_acc": 0.04, "recipe": {"arch": "simple_cnn", "resolution": 32,
                                                                                   "ema_decay": None,
                                                                                   "batch_size_cap": 1048576}},
                      "resume": report.resume_check([epoch(1e-3, 4, 4, 0.1), epoch(5e-4, 3, 3, 0.2)],
                                                    [epoch(1e-3, 4, 4, 0.1), epoch(5e-4, 3, 3, 0.2)])},
         "gpu_tests": {"passed": 6, "failed": 0, "skipped": 2, "failures": [],
                       "skip_reasons": {"TensorRT: the tensorrt package is not installed": 2}},
         "layouts": {"2": {**layout, "score": {"complete": True, "images": 38_000, "seconds": 4.0, "img_per_s": 9500.0}},
                     "1": {**layout, "score": {"complete": True, "images": 38_000, "seconds": 3.8, "img_per_s": 10_000.0}}},
         "service_info": {"backend": "torch", "auto": {"batch": 256, "img_per_s": {"torch": 16900},
                                                       "left_out": {"onnx": "this onnxruntime has no CUDAExecutionProvider"}},
                          "warmup_seconds": {"256": 2.0, "2": 1.0},
                          "workers": [{"worker": 1, "device": {"gpu": "0", "device": "cuda:0"}}]},
         "seconds": 250}
    e2e.finish(s, tmp_path, tmp_path, time.monotonic() - 250, quiet=True)
    text = (tmp_path / "table.txt").read_text()
    assert "16,732 img/s" in text and "top-1 = fp32 on 99.6%" in text
    assert re.search(r"raw served-torch cuda fp16\+compile tta=flip b256\s+8,827 img/s", text)
    assert re.search(r"torch.compile tta=none \(cold\)\s+61 s\s+fp16\+compile, CUDA graphs for batches 2, 256", text)
    assert re.search(r"torch.compile tta=flip \(cold\)\s+failed: serves eager\s+AssertionError", text)
    assert re.search(r"train Part 1 \(simple_cnn\)\s+9,000 img/s.*batch-size finder: 65536 \(cap 1,048,576\)", text)
    assert re.search(r"resume \(robust, paused after epoch 1\)\s+continues exactly \(bit-identical epoch 2\)", text)
    assert re.search(r"service backend \(auto\)\s+torch\s+torch 16,900 img/s at batch 256; onnx left out: this onnx", text)
    assert re.search(r"service model workers\s+1\s+worker 1: 0", text)
    assert re.search(r"service, two processes \(default\): scoring\s+9,500 img/s\s+38,000 images in 4.0 s, model busy 80%",
                     text)
    assert re.search(r"service, one process: /classify\s+p50 2.1 ms, p99 4.0 ms", text)
    assert re.search(r"service, two processes / one process\s+0.95", text)
    assert re.search(r"GPU tests \(pytest\)\s+6 passed, 0 failed, 2 skipped\s+2× TensorRT", text)
    assert re.search(r"ONNX Runtime CUDA\s+package not installed on this machine\s+onnxruntime 1.30.0 is the CPU build",
                     text)
    assert re.search(r"TensorRT\s+package not installed on this machine", text)
    assert json.loads((tmp_path / "summary.json").read_text())["layouts"]["1"]["score"]["img_per_s"] == 10_000


def test_the_full_flows_table(tmp_path):
    raw = report.bench_rows(bench_json(tmp_path / "backends.json"))
    endpoint = {"requests": 100, "failures": 0, "rps": 6.5, "p50_ms": 12.0, "p99_ms": 40.0}
    s = {"config": {"resolution": 224, "full_set": 950_000, "bench_batch": 256, "backend": "torch", "full": True,
                    "preset": "gpu", "locust_users": 32, "budget": 540},
         "machine": {"gpu": "NVIDIA H200", "torch": "2.11.0+cu130", "cpu_threads": 16, "cuda": True},
         "stages": {}, "raw": raw, "ratios": {},
         "score_service": {"complete": True, "images": 950_000, "seconds": 95.0, "img_per_s": 10_000.0},
         "score_direct": {"complete": False, "images": 500_000, "seconds": 40.0, "img_per_s": 12_500.0},
         "locust_low": {"endpoints": {"/classify": endpoint}}, "service_info": {"backend": "torch"}}
    e2e.finish(s, tmp_path, tmp_path, time.monotonic() - 400, quiet=True)
    assert s["ratios"]["service_over_raw"] == pytest.approx(10_000 / 17_067)   # the service's own backend, raw
    assert s["ratios"]["service_over_direct"] == pytest.approx(0.8)
    text = (tmp_path / "table.txt").read_text()
    assert re.search(r"service scoring: 950,000 images\s+95 s\s+measured", text)
    assert re.search(r"direct scoring \(no service\): 950,000 images\s+76 s\s+projected", text)
    assert re.search(r"/classify \(1 user\)\s+p50 12 ms, p99 40 ms", text)
    assert re.search(r"check\s+--full", text)


def test_the_compile_cache_is_shared_and_said_to_be_warm_or_cold(tmp_path, monkeypatch):
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(e2e, "COMPILE_CACHE", str(tmp_path / "cache"))
    assert e2e.compile_cache() == (str(tmp_path / "cache"), False)
    assert (os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"], os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"]) == ("1", "1")
    (tmp_path / "cache" / "fxgraph").mkdir(parents=True)
    assert e2e.compile_cache() == (str(tmp_path / "cache"), True)   # a rerun on the same machine
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert e2e.compile_cache()[0] == str(tmp_path / "mine")


def test_bench_backends_says_why_it_skipped_a_backend(model_dir, tmp_path):
    """What the check's rows for ONNX Runtime CUDA and TensorRT read: the load time of each backend it ran and the
    reason for each it could not."""
    done = subprocess.run([sys.executable, "bench/backends.py", "--model-dir", model_dir, "--only",
                           "served-onnx,served-tensorrt,tensorrt", "--batch-sizes", "1", "--iters", "3",
                           "--json", tmp_path / "b.json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    bench = json.loads((tmp_path / "b.json").read_text())
    assert [(r["backend"], r["tta"]) for r in bench["loaded"]] == [("served-onnx", "none")]
    assert bench["loaded"][0]["describe"]["backend"] == "onnx" and bench["loaded"][0]["load_seconds"] >= 0
    from serving.tensorrt import unavailable_reason
    assert bench["skipped"] == {"tensorrt": unavailable_reason() or "no engine (python -m export tensorrt)",
                                "served-tensorrt": "TensorRT backend unavailable: no TensorRT engine in the model"}
    assert [(r["backend"], r["batch"]) for r in bench["results"]] == [("served-onnx", 1)]
