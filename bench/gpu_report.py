"""What the GPU check's stages wrote, read back into figures, and the one table that shows them.

bench/end_to_end.py calls these after every stage. Each reads a file a stage wrote (JSON, a checkpoint, a JUnit XML
report), never a stage's printed lines, and returns None (or []) when the file is not there: a stage that failed or
ran out of time leaves its row saying so, not a made-up figure.
"""
import csv
import json
import math
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np

from serving.score import N_FILES, figures

README_RESNET50_TRAIN = 4200   # img/s: README's estimate for ResNet-50 at 224 px in bf16 (plain PyTorch, H200)
NOT_INSTALLED = "package not installed on this machine"


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def fmt(x, digits=0):
    return "-" if x is None else f"{x:,.{digits}f}"


# ---------------------------------------------------------------- bench/backends.py

def bench_rows(path):
    """The measured rows of bench/backends.py's --json file (written after every row: there even when the stage
    was cut short)."""
    return [r for r in (read_json(path) or {}).get("results", []) if "error" not in r]


def compiled(path):
    """What a compile stage (bench/backends.py with no batch sizes) loaded: [{tta, load_seconds, precision,
    warmup_seconds, compile_error}]."""
    rows = []
    for r in (read_json(path) or {}).get("loaded", []):
        d = r.get("describe", {})
        rows.append({"tta": r["tta"], "load_seconds": r["load_seconds"], "precision": r["precision"],
                     "warmup_seconds": d.get("warmup_seconds"), "compile_error": d.get("compile_error")})
    return rows


# ---------------------------------------------------------------- scoring (the --full flow)

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


# ---------------------------------------------------------------- training

def history(run_dir):
    """The per-epoch rows a training run keeps in its last.pt (also when it paused), or None."""
    from training.checkpoint import CheckpointError, load_checkpoint
    try:
        return load_checkpoint(Path(run_dir) / "last.pt")["progress"]["history"]
    except (CheckpointError, KeyError):
        return None


def resume_check(straight, resumed):
    """Whether a run paused after epoch 1 and resumed repeats the uninterrupted one in epoch 2. The epoch-1 rows of
    the two runs (the same work twice) show this machine's run-to-run noise (cuDNN and atomics on a GPU; none on
    the CPU): epoch 2 after the resume must stay within ten times that, and its learning rate must be the same."""
    if not straight or not resumed or len(straight) < 2 or len(resumed) < 2:
        return None
    keys = ("train_loss", "val_loss", "val_acc")

    def worst(a, b):
        return max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-12) for k in keys)
    noise, after = worst(straight[0], resumed[0]), worst(straight[1], resumed[1])
    same_lr = straight[1]["lr"] == resumed[1]["lr"]
    if after == 0 and same_lr:
        verdict = "continues exactly (bit-identical epoch 2)"
    elif after <= max(10 * noise, 1e-6) and same_lr:
        verdict = "continues exactly (within run-to-run noise)"
    else:
        verdict = "differs from the uninterrupted run"
    return {"verdict": verdict, "ok": verdict.startswith("continues"), "epoch2_rel_diff": after,
            "epoch1_rel_diff": noise, "same_lr": same_lr, "keys": list(keys)}


def training_summary(train_dir):
    """Part 1 and the robust recipe as the training stage ran them (OUT/<run>/<part>/metrics.json and last.pt)."""
    out = {}
    for name, run in (("part1", "straight/part1"), ("robust", "straight/robust")):
        m = read_json(Path(train_dir) / run / "metrics.json")
        if m:
            out[name] = {k: m.get(k) for k in ("device", "batch_size", "epochs_run", "images_per_s", "best_val_acc",
                                               "test_acc")}
            out[name]["recipe"] = {k: m.get("recipe", {}).get(k) for k in ("arch", "resolution", "ema_decay",
                                                                          "batch_size_cap")}
    out["resume"] = resume_check(history(Path(train_dir) / "straight/robust"),
                                 history(Path(train_dir) / "paused/robust"))
    return out


def first_key(row, *words, skip=()):
    """The first numeric entry of ROW whose key holds every one of WORDS (and none of SKIP): (key, value)."""
    for key, value in row.items():
        if isinstance(value, (int, float)) and all(w in key for w in words) and not any(w in key for w in skip):
            return key, value
    return None, None


def speed_summary(path):
    """bench/train_throughput.py's JSON, read defensively: the step's img/s per part ("images_per_s"), and the data
    loader's own img/s where the script reports one (a numeric key with "loader" in its name; with the workers it
    used when a key with "worker" says so), turned into the loader workers that keep the step fed."""
    report = read_json(path)
    if not report:
        return None
    rows = []
    for r in report.get("results", []):
        step_key, step = ("images_per_s", r["images_per_s"]) if "images_per_s" in r else first_key(r, "per_s",
                                                                                                   skip=("loader",))
        row = {"part": r.get("part"), "arch": r.get("arch"), "resolution": r.get("resolution"),
               "batch_size": r.get("batch_size"), "step_img_per_s": step, "step_key": step_key}
        loader_key, loader = first_key(r, "loader", "per_s")
        workers_key, workers = first_key(r, "worker")
        if loader:
            row.update(loader_img_per_s=loader, loader_key=loader_key, loader_workers=workers)
            per_worker = loader / (workers or 1)
            if step and workers:
                row["workers_to_feed_step"] = math.ceil(step / per_worker)
        if r.get("arch") == "resnet50" and r.get("resolution") == 224 and step:
            row["vs_readme_estimate"] = step / README_RESNET50_TRAIN
        rows.append(row)
    return {"device": report.get("device"), "rows": rows}


# ---------------------------------------------------------------- GPU tests

def junit_summary(path):
    """pytest's --junitxml report: counts, the failures and the skip reasons."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failed, skipped = [], {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '').rpartition('.')[2]}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            problem = case.find("failure") if case.find("failure") is not None else case.find("error")
            failed.append(f"{name}: {(problem.get('message') or '')[:200]}")
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
            reason = re.sub(r"^Skipped: ", "", case.find("skipped").get("message") or "")
            skipped[reason] = skipped.get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failed, "skip_reasons": skipped}


# ---------------------------------------------------------------- ONNX Runtime and TensorRT

def package_rows(s):
    """(what, result, detail) for ONNX Runtime on CUDA and TensorRT: measured, or why not, in plain words."""
    m, skipped = s["machine"], s.get("bench_skipped", {})
    measured = {r["backend"] for r in s.get("raw", []) if r["device"].startswith("cuda")}
    rows = []
    if not m["cuda"]:
        return [("ONNX Runtime CUDA, TensorRT", "not run: no GPU here", "")]
    if measured & {"onnxruntime", "served-onnx"}:
        rows.append(("ONNX Runtime CUDA", "measured", "rows above"))
    elif "onnxruntime-gpu" not in m:
        rows.append(("ONNX Runtime CUDA", NOT_INSTALLED,
                     f"onnxruntime {m.get('onnxruntime', '?')} is the CPU build (no onnxruntime-gpu); its CUDA path "
                     "was reviewed against the documentation, not run"))
    else:
        reason = skipped.get("served-onnx") or skipped.get("onnxruntime") or "no row measured"
        rows.append(("ONNX Runtime CUDA", "installed, not run", reason[:160]))
    trt = m.get("tensorrt_unavailable")
    if measured & {"tensorrt", "served-tensorrt"}:
        rows.append(("TensorRT", "measured", "rows above"))
    elif trt and "not installed" in trt:
        rows.append(("TensorRT", NOT_INSTALLED, "reviewed against the TensorRT 10/11 documentation, not run"))
    else:
        rows.append(("TensorRT", "not run", (trt or skipped.get("served-tensorrt") or skipped.get("tensorrt")
                                             or "no engine was built")[:160]))
    return rows


# ---------------------------------------------------------------- the table

def stage_rows(s):
    return [(f"stage {name}", st["status"], f"{st['seconds']:.0f} s" + (f" (limit {st['limit_s']} s)"
                                                                         if "limit_s" in st else ""))
            for name, st in s["stages"].items()]


def training_rows(s):
    rows, t = [], s.get("training") or {}
    for name, label in (("part1", "train Part 1"), ("robust", "train robust, weights none")):
        if r := t.get(name):
            label = f"{label} ({r['recipe']['arch']})"
            detail = (f"{r['recipe']['resolution']} px, batch {r['batch_size']}, {r['epochs_run']} epochs on "
                      f"{r['device']}, generated data: val acc {fmt(r['best_val_acc'], 3)}")
            if name == "part1":
                detail += f"; batch-size finder: {r['batch_size']} (cap {r['recipe']['batch_size_cap']:,})"
            elif r["recipe"].get("ema_decay"):
                detail += f"; EMA decay {r['recipe']['ema_decay']}"
            rows.append((label, f"{fmt(r['images_per_s'])} img/s", detail + " (epoch average, loader included)"))
    if r := t.get("resume"):
        rows.append(("resume (robust, paused after epoch 1)", r["verdict"],
                     f"epoch 2 vs the uninterrupted run: {r['epoch2_rel_diff']:.1e} relative (epoch 1, the same "
                     f"work twice: {r['epoch1_rel_diff']:.1e}); learning rate {'same' if r['same_lr'] else 'DIFFERS'}"))
    for r in (s.get("train_speed") or {}).get("rows", []):
        detail = f"{r['resolution']} px, batch {r['batch_size']}, training step only (bench/train_throughput.py)"
        if "vs_readme_estimate" in r:
            detail += f"; {r['vs_readme_estimate']:.2f}× the README's {README_RESNET50_TRAIN:,} img/s estimate"
        rows.append((f"training speed {r['part']} ({r['arch']})", f"{fmt(r['step_img_per_s'])} img/s", detail))
        if "loader_img_per_s" in r:
            workers = r.get("workers_to_feed_step")
            rows.append((f"loader workers to feed {r['part']}", "-" if workers is None else str(workers),
                         f"loader {fmt(r['loader_img_per_s'])} img/s ({r['loader_key']}) with "
                         f"{r.get('loader_workers') or '?'} workers"))
        elif r["part"] == "robust":
            rows.append(("loader workers to feed robust", "not reported",
                         "bench/train_throughput.py wrote no data-loader figure"))
    return rows


def compile_rows(s):
    rows = []
    for r in s.get("compile") or []:
        warm = r["warmup_seconds"] or {}
        if r["compile_error"]:
            rows.append((f"torch.compile tta={r['tta']} (cold)", "failed: serves eager", r["compile_error"][:160]))
        else:
            rows.append((f"torch.compile tta={r['tta']} (cold)", f"{r['load_seconds']:.0f} s",
                         f"{r['precision']}, CUDA graphs for batches {', '.join(map(str, sorted(map(int, warm))))}; "
                         "the stages after it load from the shared cache"))
    if s.get("compile_skipped"):
        rows.append(("torch.compile", "not used", s["compile_skipped"]))
    return rows


def raw_rows(s, batch):
    rows = []
    for r in s["raw"]:
        tta = "" if r.get("tta", "none") == "none" else f" tta={r['tta']}"
        if r["batch"] == batch:
            rows.append((f"raw {r['backend']} {r['device']} {r['precision']}{tta} b{batch}",
                         f"{fmt(r['img_per_s'])} img/s", f"{r['ms_per_batch']:.2f} ms/batch, top-1 = fp32 on "
                         f"{100 * r['top1_agree']:.1f}%, max |diff| {r['max_abs_diff']:.1e}"))
    for r in s["raw"]:
        tta = "" if r.get("tta", "none") == "none" else f" tta={r['tta']}"
        if r["batch"] == 1:
            rows.append((f"raw {r['backend']} {r['device']} {r['precision']}{tta} b1", f"{r['ms_per_batch']:.2f} ms",
                         ""))
    return rows


def service_rows(info):
    rows = []
    if auto := info.get("auto"):
        rows.append(("service backend (auto)", info["backend"],
                     ", ".join(f"{k} {v:,} img/s" for k, v in auto["img_per_s"].items()) + f" at batch {auto['batch']}"
                     + "".join(f"; {k} left out: {v[:80]}" for k, v in auto.get("left_out", {}).items())))
    if workers := info.get("workers"):
        rows.append(("service model workers", str(len(workers)),
                     ", ".join(f"worker {w['worker']}: {w['device'].get('gpu', w['device']['device'])}" for w in workers)))
    if warmup := info.get("warmup_seconds"):
        rows.append(("service torch.compile warm-up", f"{sum(warmup.values()):.0f} s",
                     ", ".join(f"b{k} {v} s" for k, v in warmup.items())))
    if error := info.get("compile_error"):
        rows.append(("service torch.compile", "failed: serves eager", error[:120]))
    return rows


def layout_rows(s):
    rows, layouts = [], s.get("layouts") or {}
    for key, label in (("2", "two processes (default)"), ("1", "one process")):
        r = layouts.get(key)
        if not r:
            continue
        if "backend" in r:
            rows.append((f"service, {label}: ready", f"{r['start_seconds']:.0f} s",
                         f"{r['backend']} {r['precision']} on {r['device']}"
                         + (f", compile warm-up {sum(r['warmup_seconds'].values()):.0f} s (cache)"
                            if r.get("warmup_seconds") else "")))
        if sc := r.get("score"):
            rows.append((f"service, {label}: scoring", f"{fmt(sc['img_per_s'])} img/s",
                         f"{sc['images']:,} images in {sc['seconds']:.1f} s" + ("" if sc["complete"] else " (cut short)")
                         + (f", model busy {100 * r['model_busy']:.0f}%" if r.get("model_busy") is not None else "")))
        if c := r.get("classify"):
            rows.append((f"service, {label}: /classify", f"p50 {c['p50_ms']:.1f} ms, p99 {c['p99_ms']:.1f} ms",
                         f"one PNG per request, one at a time, {c['requests']} requests"))
    one, two = (layouts.get(k, {}).get("score") or {} for k in ("1", "2"))
    if one.get("img_per_s") and two.get("img_per_s"):
        rows.append(("service, two processes / one process", f"{two['img_per_s'] / one['img_per_s']:.2f}",
                     "scoring img/s; > 1: the second process earns its place on this machine"))
    return rows


def full_rows(s):
    """The --full flow: 950,000 images through the service and directly, Locust."""
    rows = []
    full = s["config"]["full_set"]
    for key, label in (("score_service", "service scoring"), ("score_direct", "direct scoring (no service)")):
        r = s.get(key)
        if not r:
            continue
        done = "" if r["complete"] else " (cut short)"
        rows.append((label, f"{fmt(r['img_per_s'])} img/s", f"{r['images']:,} images in {r['seconds']:.1f} s{done}"))
        if r["img_per_s"]:
            rows.append((f"{label}: {full:,} images", f"{full / r['img_per_s']:.0f} s",
                         "measured" if r["complete"] and r["images"] == full else "projected from the rate"))
    ratios = s["ratios"]
    if ratios.get("service_over_raw") is not None:
        rows.append(("service / raw (same backend)", f"{ratios['service_over_raw']:.2f}", ratios["raw_reference"]))
    if ratios.get("service_over_direct") is not None:
        rows.append(("service / direct", f"{ratios['service_over_direct']:.2f}", ""))
    if sb := s.get("service_model_busy"):
        rows.append(("service model busy while scoring", f"{100 * sb['busy_fraction']:.0f}%",
                     f"mean model batch {sb['mean_batch']:.0f}, largest {sb['largest_call']}"))
    if g := s.get("gpu_while_scoring"):
        rows.append(("GPU util while scoring", f"{g['gpu_util_mean_pct']}% mean", f"max memory {g['gpu_mem_max_mib']:.0f} MiB"))
    if a := s.get("agreement"):
        rows.append(("service vs direct labels", f"{100 * a['same_label']:.2f}% same", f"{a['images']:,} images"))
    for key, label in (("locust_low", "1 user"), ("locust_load", f"{s['config']['locust_users']} users")):
        for endpoint, e in ((s.get(key) or {}).get("endpoints") or {}).items():
            extra = f", {fmt(e.get('images_per_s'))} img/s" if e.get("images_per_s") else ""
            rows.append((f"{endpoint} ({label})", f"p50 {fmt(e['p50_ms'])} ms, p99 {fmt(e['p99_ms'])} ms",
                         f"{fmt(e['rps'], 1)} req/s{extra}, {e['failures']} failed of {e['requests']}"))
    return rows


def table(s):
    """Every row that has a figure or a reason: training, the served torch path, the service, the GPU tests,
    ONNX Runtime CUDA and TensorRT."""
    m, c = s["machine"], s["config"]
    rows = [("machine", m.get("gpu", "CPU only"), f"torch {m['torch']}, {m['cpu_threads']} CPU threads"),
            ("check", "--full" if c["full"] else f"preset {c['preset']}",
             f"ResNet-50 (Part 3, random weights) at {c['resolution']} px; budget {c['budget']:.0f} s")]
    rows += stage_rows(s) + training_rows(s) + compile_rows(s) + raw_rows(s, c["bench_batch"])
    rows += service_rows(s.get("service_info") or {}) + layout_rows(s) + full_rows(s)
    if (t := s.get("gpu_tests")) is not None:
        rows.append(("GPU tests (pytest)", f"{t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped",
                     "; ".join(t["failures"])[:300] or "; ".join(f"{n}× {why}" for why, n in t["skip_reasons"].items())[:300]))
    rows += package_rows(s)
    rows.append(("all stages", f"{s.get('seconds', 0):.0f} s", f"budget {c['budget']:.0f} s"))
    width, vwidth = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    lines = [f"{'what':<{width}}  {'result':<{vwidth}}  detail", "-" * (width + vwidth + 30)]
    lines += [f"{a:<{width}}  {b:<{vwidth}}  {d}" for a, b, d in rows]
    if "error" in s:
        lines.append(f"error: {s['error']}")
    return "\n".join(lines)
