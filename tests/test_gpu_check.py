"""bench/gpu_check.sh and bench/end_to_end.py without a GPU (seconds): the wheel list, the time-boxed stages,
the OOD set it writes, and the numbers it reports. The whole dry run (about 3.5 min on 2 cores) is
`bash bench/gpu_check.sh --images 5000 --resolution 32`, run by hand: too slow for the suite."""
import importlib.util
import json
import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

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
    assert {"bentoml", "locust", "pydantic", "starlette", "tqdm", "matplotlib"} <= set(names)
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


def test_stages_share_one_budget(tmp_path):
    stages = e2e.Stages(budget=3, logs=tmp_path, log_file=tmp_path / "log.txt")
    assert stages.run("late", ["true"], cap=100)[0] == "skipped"
    stages = e2e.Stages(budget=60, logs=tmp_path, log_file=tmp_path / "log.txt")
    assert stages.run("fails", ["bash", "-c", "exit 3"], cap=10)[0] == "failed"
    assert stages.results["fails"]["status"] == "failed (exit 3)"
    assert "fails: failed (exit 3)" in (tmp_path / "log.txt").read_text()


def test_the_ood_set_is_what_the_scoring_client_takes(tmp_path):
    from serving.score import open_ood_dir
    e2e.write_ood(tmp_path, 15)
    sources, layout, _ = open_ood_dir(tmp_path)
    assert layout == "kaggle"
    assert [len(s.images) for s in sources] == [15] * 19
    assert not np.array_equal(sources[0].images, sources[1].images)   # not 19 copies of one file


def test_scoring_rates_from_a_finished_and_a_cut_short_run(tmp_path):
    from serving.score import figures
    (tmp_path / "x.json").write_text(json.dumps(figures(4940, 23.8, True, requests=19)))
    done = e2e.score_result("ok", tmp_path / "x.json", tmp_path / "x.csv", 25)
    assert done == {"complete": True, "images": 4940, "requests": 19, "seconds": 23.8,
                    "img_per_s": pytest.approx(4940 / 23.8), "process_seconds": 25}
    parts = tmp_path / "cut.csv.parts"
    parts.mkdir()
    for i in range(3):
        np.save(parts / f"chunk{i:06d}.npy", np.full(4, i, np.uint8))
    cut = e2e.score_result("timed", tmp_path / "cut.json", tmp_path / "cut.csv", 2.0)
    assert cut["complete"] is False and cut["images"] == 12 and cut["img_per_s"] == 6.0
    assert cut.keys() == done.keys() - {"requests"}   # one schema


def test_service_and_direct_labels_are_compared_chunk_by_chunk(tmp_path):
    per_file, chunk = 10, 4                       # chunks of 4, 4, 2 in each of the 19 files
    labels = np.arange(190) % 100
    (tmp_path / "a.csv").write_text("id,label\n" + "".join(f"x_{i},{y}\n" for i, y in enumerate(labels)))
    a = e2e.chunk_labels(tmp_path / "a.csv", per_file, chunk)
    assert len(a) == 57 and [len(a[i]) for i in range(3)] == [4, 4, 2]
    parts = tmp_path / "b.csv.parts"
    parts.mkdir()
    np.save(parts / "chunk000001.npy", a[1])
    np.save(parts / "chunk000002.npy", (a[2] + 1) % 100)
    b = e2e.chunk_labels(tmp_path / "b.csv", per_file, chunk)
    assert e2e.agreement(a, b) == {"images": 6, "same_label": 4 / 6}
    assert e2e.agreement(a, {}) is None


def bench_json(path):
    """What bench/backends.py --json writes, a failed row included."""
    def row(backend, precision, batch, ms, img_per_s, diff, agree):
        return {"backend": backend, "device": "cuda", "precision": precision, "batch": batch, "iters": 30,
                "ms_per_batch": ms, "img_per_s": img_per_s, "max_abs_diff": diff, "top1_agree": agree}
    results = [row("torch-eager", "fp32", 1, 3.1, 323, 0.0, 1.0), row("torch-eager", "fp32", 256, 34.0, 7529, 2.1e-5, 1.0),
               row("torch-eager", "fp16+channels_last", 256, 15.3, 16732, 0.012, 0.996),
               {"backend": "onnxruntime", "device": "cuda", "precision": "fp16", "batch": 256, "error": "RuntimeError"},
               row("served-torch", "fp16+compile", 256, 15.0, 17067, 0.012, 0.996)]
    path.write_text(json.dumps({"machine": {}, "results": results}))
    return path


def test_the_table_answers_the_questions(tmp_path):
    raw = e2e.bench_rows(bench_json(tmp_path / "backends.json"))
    assert e2e.bench_rows(tmp_path / "missing.json") == []
    assert [(r["backend"], r["precision"], r["batch"]) for r in raw] == [
        ("torch-eager", "fp32", 1), ("torch-eager", "fp32", 256), ("torch-eager", "fp16+channels_last", 256),
        ("served-torch", "fp16+compile", 256)]
    assert raw[2]["top1_agree"] == pytest.approx(0.996) and raw[2]["max_abs_diff"] == pytest.approx(0.012)
    endpoint = {"requests": 100, "failures": 0, "rps": 6.5, "p50_ms": 12.0, "p99_ms": 40.0}
    s = {"config": {"resolution": 224, "full_set": 950_000, "bench_batch": 256, "backend": "torch",
                    "locust_users": 32, "budget": 480},
         "machine": {"gpu": "NVIDIA H200", "torch": "2.11.0+cu130", "cpu_threads": 16, "cuda": True},
         "stages": {"export": {"status": "ok", "seconds": 40.0}}, "raw": raw, "ratios": {},
         "missing_backends": {"tensorrt": "the tensorrt package is not installed"},
         "score_service": {"complete": True, "images": 950_000, "seconds": 95.0, "img_per_s": 10_000.0},
         "score_direct": {"complete": False, "images": 500_000, "seconds": 40.0, "img_per_s": 12_500.0},
         "locust_low": {"endpoints": {"/classify": endpoint}}, "seconds": 400,
         "service_info": {"backend": "torch", "auto": {"batch": 256, "img_per_s": {"torch": 16900}, "left_out": {}},
                          "warmup_seconds": {"256": 40.2, "128": 1.1, "8": 5.5},
                          "workers": [{"worker": 1, "device": {"gpu": "0", "device": "cuda:0"}}]}}
    e2e.finish(s, tmp_path)
    assert s["ratios"]["service_over_raw"] == pytest.approx(10_000 / 17_067)   # the service's own backend, raw
    assert s["ratios"]["service_over_direct"] == pytest.approx(0.8)
    text = e2e.table(s)
    assert "16,732 img/s" in text and "not measured" in text and "tensorrt" in text and "top-1 = fp32 on 99.6%" in text
    assert re.search(r"service backend \(auto\)\s+torch\s+torch 16,900 img/s at batch 256", text)
    assert re.search(r"service model workers\s+1\s+worker 1: 0", text)
    assert re.search(r"service torch.compile warm-up\s+47 s\s+b256 40.2 s, b128 1.1 s, b8 5.5 s", text)
    assert re.search(r"service scoring: 950,000 images\s+95 s\s+measured", text)
    assert re.search(r"direct scoring \(no service\): 950,000 images\s+76 s\s+projected", text)
    assert re.search(r"/classify \(1 user\)\s+p50 12 ms, p99 40 ms", text)
    assert (tmp_path / "table.txt").read_text() == text + "\n"
    assert json.loads((tmp_path / "summary.json").read_text())["ratios"]["service_over_direct"] == pytest.approx(0.8)
