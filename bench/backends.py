"""Throughput of every artifact of one model on this machine: uint8 numpy in, float32 logits out.

    python bench/backends.py --checkpoint runs/part3/best.pt [--artifacts artifacts/] [--tta flip] [--json bench.json]
    python bench/backends.py --model-dir ~/bentoml/models/cifar100-classifier/<version>

Backends: PyTorch eager FP32, eager FP16 channels_last (CUDA), torch.compile (--compile), ONNX
Runtime CPU (FP32, and INT8 where `export int8` wrote it) and CUDA (FP32, FP16, INT8),
TensorRT (when an engine, the package and a GPU are here);
with --model-dir also `served-<kind>`: serving/backends.py's backends exactly as the service runs them.
Each is timed end to end (host uint8 batch -> host logits) per batch size; the median of the timed
calls is reported. Iterations stop early after --max-seconds per cell, so CPU runs stay short. Every
cell's logits are compared with eager FP32 PyTorch on the same images: largest |difference| and the
share of equal top-1 classes. ONNX files missing next to a checkpoint are exported into a temporary folder first.
"""
import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from export.onnx import Artifact, ExportError, export_checkpoint, ort_session
from training.checkpoint import CheckpointError, load_classifier, sha256
from export.int8 import int8_name
from training.contract import (CHECKPOINT_FILE, ENGINE_FILE, INPUT_NAME, NUM_CLASSES, ONNX_FILE, ONNX_FP16_FILE,
                               ONNX_INT8_FILE, random_images)
from training.files import write_json
from training.models import TTA

log = logging.getLogger("bench")


def load_model(checkpoint, tta):
    """The checkpoint's model in eval mode, with test-time augmentation TTA around it."""
    return TTA[tta](load_classifier(checkpoint)[0]).eval()


def torch_runner(model, device, half=False):
    model = model.to(device)
    if half:
        model = model.half().to(memory_format=torch.channels_last)

    def run(images):
        with torch.inference_mode():
            return model(torch.from_numpy(images).to(device, non_blocking=True)).float().cpu().numpy()
    return run


def compiled_runner(model, device):
    half = device.startswith("cuda")
    model = model.to(device)
    if half:
        model = model.half().to(memory_format=torch.channels_last)
    compiled = torch.compile(model, dynamic=False)  # one graph per batch size; warm-up compiles it

    def run(images):
        with torch.inference_mode():
            return compiled(torch.from_numpy(images).to(device, non_blocking=True)).float().cpu().numpy()
    return run, "fp16" if half else "fp32"


def ort_runner(path, device):
    session = ort_session(path, device, tf32=True)  # serving settings: TF32 allowed on the GPU
    provider = session.get_providers()[0]
    if device.startswith("cuda") and provider != "CUDAExecutionProvider":
        return None

    def run(images):
        return session.run(None, {INPUT_NAME: images})[0]
    return run


def find_artifacts(args, scratch):
    """(checkpoint path, {"onnx": path, "onnx_fp16": path, "onnx_int8": path, "engine": path} of those present;
    the INT8 file only where `export int8` wrote it: it needs the training data)."""
    if args.model_dir:
        root = Path(args.model_dir)
        names = {"onnx": ONNX_FILE, "onnx_fp16": ONNX_FP16_FILE, "onnx_int8": ONNX_INT8_FILE, "engine": ENGINE_FILE}
        return root / CHECKPOINT_FILE, {k: root / v for k, v in names.items() if (root / v).is_file()}
    checkpoint = Path(args.checkpoint)
    model, ckpt = load_classifier(checkpoint)
    part, digest, root = ckpt["recipe"]["name"], sha256(checkpoint), Path(args.artifacts)
    names = {"onnx": f"{part}.onnx", "onnx_fp16": f"{part}.fp16.onnx", "onnx_int8": int8_name(part),
             "engine": f"{part}.engine"}
    found = {}
    for key, name in names.items():
        try:
            artifact = Artifact.load(root / name)
        except ExportError:   # not there, or exported by an older version
            continue
        if artifact.info.get("checkpoint_sha256") == digest and artifact.info.get("tta", "none") == args.tta:
            found[key] = artifact.path
        else:
            log.warning("ignoring %s: exported from another checkpoint or with other --tta", artifact.path)
    if "onnx" not in found or "onnx_fp16" not in found:
        log.info("exporting ONNX files for %s into %s", checkpoint, scratch)
        written = export_checkpoint(model, ckpt, digest, Path(scratch), fp16=True, tta=args.tta)
        found.setdefault("onnx", written["fp32"].path)
        found.setdefault("onnx_fp16", written["fp16"].path)
    return checkpoint, found


# onnxruntime: on the bench's device (CUDA on a GPU); onnxruntime-cpu: on the CPU also when a GPU is there.
NAMES = ("torch-eager", "torch-compile", "onnxruntime", "onnxruntime-cpu", "tensorrt", "served-torch", "served-onnx",
         "served-tensorrt")


def ort_unavailable(device):
    """Why ONNX Runtime cannot run on DEVICE here (a string), or None."""
    import onnxruntime as ort
    if device.startswith("cuda") and "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (the CPU build is installed)"
    return None


def backends(args, checkpoint, artifacts, device, skipped):
    """(name, device, precision, tta, runner) for every backend of args.only that can run here, made one at a time
    so that each is timed alone (no idle ONNX Runtime thread pools or GPU copies of other models around). Why one
    cannot run goes into SKIPPED."""
    gpu, want = device.startswith("cuda"), set(args.only.split(","))
    if "torch-eager" in want:
        yield "torch-eager", device, "fp32", args.tta, torch_runner(load_model(checkpoint, args.tta), device)
        if gpu:
            yield ("torch-eager", device, "fp16+channels_last", args.tta,
                   torch_runner(load_model(checkpoint, args.tta), device, True))
    if args.compile and "torch-compile" in want:
        run, precision = compiled_runner(load_model(checkpoint, args.tta), device)
        yield "torch-compile", device, precision, args.tta, run
    if "onnxruntime-cpu" in want or ("onnxruntime" in want and not gpu):
        yield "onnxruntime", "cpu", "fp32", args.tta, ort_runner(artifacts["onnx"], "cpu")
        if "onnx_int8" in artifacts:
            yield "onnxruntime", "cpu", "int8", args.tta, ort_runner(artifacts["onnx_int8"], "cpu")
        else:
            skipped["onnxruntime int8"] = "no INT8 file (python -m export int8)"
    if "onnxruntime" in want:
        if gpu and (reason := ort_unavailable(device)):
            skipped["onnxruntime"] = reason
        elif gpu:
            for key, precision in (("onnx", "fp32"), ("onnx_fp16", "fp16"), ("onnx_int8", "int8")):
                if key not in artifacts:
                    continue
                if (run := ort_runner(artifacts[key], device)) is None:
                    skipped["onnxruntime"] = "its CUDA provider did not start (ONNX Runtime's log says why)"
                    break
                yield "onnxruntime", device, precision, args.tta, run
    if "tensorrt" in want:
        from serving.tensorrt import TensorRTRunner, unavailable_reason
        if reason := unavailable_reason():
            skipped["tensorrt"] = reason
        elif "engine" not in artifacts:
            skipped["tensorrt"] = "no engine (python -m export tensorrt)"
        else:
            precision = Artifact.load(artifacts["engine"]).info.get("precision", "fp16")   # fp16 or int8
            yield "tensorrt", device, precision, args.tta, TensorRTRunner(artifacts["engine"], device)
    if args.model_dir:
        from serving.backends import BackendError, load_backend
        for kind in ("torch", "onnx", "tensorrt"):
            if f"served-{kind}" not in want:
                continue
            for tta in (args.served_tta.split(",") if kind == "torch" and args.served_tta else [None]):
                try:
                    backend = load_backend(kind, args.model_dir, device, tta=tta)
                except BackendError as e:
                    skipped[f"served-{kind}"] = str(e)
                    continue
                yield f"served-{kind}", backend.device, backend.precision, getattr(backend, "tta", "none"), backend


def reference_logits(model, images, device):
    """Eager fp32 logits of MODEL (on DEVICE): what every backend should compute. On a GPU with TF32 off, so that
    they are fp32's own (a CPU takes seconds per 256 images at 224 px)."""
    if not device.startswith("cuda"):
        with torch.inference_mode():
            return model(torch.from_numpy(images)).numpy()
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            return model(torch.from_numpy(images).to(device)).cpu().numpy()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def test_images(batch):
    return random_images(batch, seed=batch)


def time_cell(run, batch, iters, max_seconds, warmup, sync):
    images = test_images(batch)
    for _ in range(warmup):
        run(images)
    sync()
    times, start = [], time.perf_counter()
    while len(times) < iters and (len(times) < 3 or time.perf_counter() - start < max_seconds):
        t0 = time.perf_counter()
        logits = run(images)
        sync()
        times.append(time.perf_counter() - t0)
    assert logits.shape == (batch, NUM_CLASSES) and logits.dtype == np.float32
    median = statistics.median(times)
    return {"batch": batch, "iters": len(times), "ms_per_batch": 1e3 * median,
            "ms_p90": 1e3 * float(np.percentile(times, 90)), "img_per_s": batch / median}, logits


def machine(device):
    info = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpu_threads": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a training checkpoint (ONNX files from --artifacts, else exported)")
    src.add_argument("--model-dir", help="a model's folder in the BentoML model store (models/<name>/<version>)")
    p.add_argument("--artifacts", default="artifacts", help="where `python -m export` wrote (with --checkpoint)")
    p.add_argument("--batch-sizes", default="1,16,64,256", help="'' loads the backends only (e.g. to compile them)")
    p.add_argument("--only", default=",".join(NAMES), help="the backends to time (default: all of %(default)s)")
    p.add_argument("--served-tta", default=None,
                   help="with --model-dir: the served torch backend once per test-time augmentation listed, e.g. "
                        "none,flip (default: the model's own)")
    p.add_argument("--iters", type=int, default=50, help="timed calls per cell at most")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop a cell after this long (at least 3 calls); default 2 on CPU, 10 on GPU")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument("--tta", choices=sorted(TTA), default="none",
                   help="with --checkpoint: time the model with this test-time augmentation (ONNX exported with it)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    gpu = device.startswith("cuda")
    max_seconds = args.max_seconds or (10.0 if gpu else 2.0)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as scratch:
        try:
            checkpoint, artifacts = find_artifacts(args, scratch)
            _, ckpt = load_classifier(checkpoint)
        except (CheckpointError, ExportError, OSError) as e:  # a one-line reason, not a traceback
            sys.exit(f"error: {e}")
        run_all(args, checkpoint, ckpt, artifacts, device, max_seconds, sync)


def run_all(args, checkpoint, ckpt, artifacts, device, max_seconds, sync):
    recipe = ckpt["recipe"]
    log.info("%s (%s at %d px) on %s", checkpoint, recipe["arch"], recipe["resolution"], device)

    results, reference, loaded, skipped = [], {}, [], {}
    report = {"machine": machine(device), "checkpoint": str(checkpoint),
              "model": {"part": recipe["name"], "arch": recipe["arch"], "resolution": recipe["resolution"]},
              "artifacts": {k: str(v) for k, v in artifacts.items()}, "results": results, "loaded": loaded,
              "skipped": skipped}
    reference_models = {}   # per test-time augmentation: eager fp32 (reference_logits)
    header = (f"{'backend':<16} {'device':<6} {'precision':<19} {'tta':<4} {'batch':>5} {'ms/batch':>10} {'img/s':>10} "
              f"{'iters':>5} {'max|diff|':>9} {'top1%':>6}")
    print(header + "\n" + "-" * len(header), flush=True)
    made = backends(args, checkpoint, artifacts, device, skipped)
    while True:
        start = time.perf_counter()
        try:   # loading (and, for served-torch on a GPU, compiling) is timed too
            name, dev, precision, tta, run = next(made)
        except StopIteration:
            break
        loaded.append({"backend": name, "device": dev, "precision": precision, "tta": tta,
                       "load_seconds": round(time.perf_counter() - start, 1),
                       **({"describe": run.describe()} if hasattr(run, "describe") else {})})
        log.info("%s %s %s (tta %s) ready in %.1f s", name, dev, precision, tta, loaded[-1]["load_seconds"])
        if args.json:
            write_json(args.json, report)
        for batch in [int(b) for b in args.batch_sizes.split(",") if b]:
            if (tta, batch) not in reference:
                if tta not in reference_models:
                    reference_models[tta] = load_model(checkpoint, tta).to(device)
                reference[tta, batch] = reference_logits(reference_models[tta], test_images(batch), device)
            try:
                cell, logits = time_cell(run, batch, args.iters, max_seconds, warmup=2 if dev == "cpu" else 5,
                                         sync=sync)
            except Exception as e:   # one backend failing must not hide the others' rows
                log.error("%s %s batch %d failed: %s: %s", name, precision, batch, type(e).__name__, e)
                results.append({"backend": name, "device": dev, "precision": precision, "tta": tta, "batch": batch,
                                 "error": f"{type(e).__name__}: {e}"})
                continue
            expected = reference[tta, batch]
            cell["max_abs_diff"] = float(np.abs(logits - expected).max())
            cell["top1_agree"] = float((logits.argmax(1) == expected.argmax(1)).mean())
            results.append({"backend": name, "device": dev, "precision": precision, "tta": tta, **cell})
            print(f"{name:<16} {dev:<6} {precision:<19} {tta:<4} {batch:>5} {cell['ms_per_batch']:>10.2f} "
                  f"{cell['img_per_s']:>10.0f} {cell['iters']:>5} {cell['max_abs_diff']:>9.2e} "
                  f"{100 * cell['top1_agree']:>6.1f}", flush=True)
            if args.json:   # after every cell: a run stopped by a time limit still leaves its rows
                write_json(args.json, report)
        del run  # free this backend before the next one is built
    for name, reason in skipped.items():
        log.info("skipping %s: %s", name, reason)
    if args.json:
        write_json(args.json, report)
        log.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
