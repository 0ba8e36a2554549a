"""INT8 against FP32 in ONNX Runtime on this machine's CPU, as the service runs them (serving/backends.py's ONNX
backend: its session options, I/O binding), in alternating rounds; also signed symmetric int8 activations (what
TensorRT takes) against the default uint8 ones, to tell whether one file could serve both.

    python -m bench.int8 [--models part1,resnet50-32,resnet50-224] [--checkpoint part1=runs/part1/best.pt]
                         [--data-dir DATA] [--rounds 3] [--seconds 3] [--json FILE]

A model without --checkpoint gets random weights (`export random`). Calibration: a seeded sample of DATA's training
images (as `export int8`) with --data-dir, else generated look-alike images (training/synthetic.py). This bench
times; it does not check: `export int8` would refuse a random-weight model that does not reproduce FP32, and its
accuracy means nothing.
"""
import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from export.int8 import quantize, sample
from export.onnx import export_checkpoint
from serving.backends import OnnxBackend, cpu_threads
from training.checkpoint import load_classifier, save_random_checkpoint, sha256
from training.contract import CHECKPOINT_FILE, ONNX_FILE, ONNX_INT8_FILE, random_images
from training.files import write_json
from training.synthetic import make_images

log = logging.getLogger("bench")
MODELS = {"part1": ("part1", 32, 256), "resnet50-32": ("part3", 32, 256), "resnet50-224": ("part3", 224, 64)}
VARIANTS = ("fp32", "int8", "int8-symmetric")


def calibration_images(ckpt, data_dir, n):
    if data_dir:
        return sample(data_dir, ckpt["recipe"], calib_images=n, check_images=1)[0]
    rng = np.random.default_rng(0)
    return make_images(rng.integers(0, 100, n), rng)


def backends(name, checkpoint, data_dir, calib, scratch):
    """{variant: OnnxBackend} over folders laid out as a store entry (the variant's file as model.int8.onnx)."""
    part, resolution, _ = MODELS[name]
    root = Path(scratch) / name
    if checkpoint is None:
        checkpoint = save_random_checkpoint(root / "random.pt", part, resolution=resolution)
    model, ckpt = load_classifier(checkpoint)
    fp32 = export_checkpoint(model, ckpt, sha256(checkpoint), root, sizes=(1,))["fp32"].path
    images = calibration_images(ckpt, data_dir, calib)
    made = {}
    for variant in VARIANTS:
        folder = root / variant
        folder.mkdir()
        (folder / CHECKPOINT_FILE).symlink_to(Path(checkpoint).resolve())
        (folder / ONNX_FILE).symlink_to(fp32)
        if variant != "fp32":
            start = time.perf_counter()
            quantize(fp32, folder / ONNX_INT8_FILE, images, symmetric=variant == "int8-symmetric")
            log.info("%s %s: quantized in %.0f s", name, variant, time.perf_counter() - start)
        made[variant] = OnnxBackend(folder, "cpu", precision="fp32" if variant == "fp32" else "int8")
    return made, ckpt


def timed(backend, batch, seconds):
    """(img/s, ms of process CPU per image) over at least 2 calls and SECONDS."""
    backend(batch)
    calls, wall, cpu = 0, time.perf_counter(), time.process_time()
    while calls < 2 or time.perf_counter() - wall < seconds:
        backend(batch)
        calls += 1
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return calls * len(batch) / wall, 1e3 * cpu / (calls * len(batch))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.int8", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("\n"):])
    p.add_argument("--models", default=",".join(MODELS), help="of %(default)s")
    p.add_argument("--checkpoint", action="append", default=[], metavar="MODEL=PATH",
                   help="a trained checkpoint for MODEL (default: random weights)")
    p.add_argument("--data-dir", help="calibrate on this training data (default: generated images)")
    p.add_argument("--calib-images", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0, help="per variant per round (at least 2 calls)")
    p.add_argument("--json", help="write the figures here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "root"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    log.setLevel(logging.INFO)
    checkpoints = dict(c.split("=", 1) for c in a.checkpoint)
    report = {"threads": cpu_threads(), "rounds": a.rounds, "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as scratch:
        for name in a.models.split(","):
            made, ckpt = backends(name, checkpoints.get(name), a.data_dir, a.calib_images, scratch)
            batch = random_images(MODELS[name][2], seed=1)
            reference = made["fp32"](batch).argmax(1)
            rows = {v: {"img_per_s": [], "cpu_ms_per_image": [],
                        "top1_agreement_with_fp32": float((made[v](batch).argmax(1) == reference).mean())}
                    for v in VARIANTS}
            for _ in range(a.rounds):   # alternating: each round's variants see about the same background load
                for variant, backend in made.items():
                    speed, cpu = timed(backend, batch, a.seconds)
                    rows[variant]["img_per_s"].append(round(speed, 1))
                    rows[variant]["cpu_ms_per_image"].append(round(cpu, 3))
            ratios = [i / f for i, f in zip(rows["int8"]["img_per_s"], rows["fp32"]["img_per_s"])]
            report["models"][name] = {"part": ckpt["recipe"]["name"], "resolution": ckpt["recipe"]["resolution"],
                                      "batch": len(batch), "variants": rows,
                                      "int8_over_fp32": round(statistics.median(ratios), 2)}
            print(f"\n{name} ({ckpt['recipe']['arch']} at {ckpt['recipe']['resolution']} px), batch {len(batch)}, "
                  f"{cpu_threads()} threads")
            for variant, row in rows.items():
                print(f"  {variant:<15} img/s {', '.join(f'{s:,.0f}' for s in row['img_per_s']):<28} "
                      f"CPU ms/image {statistics.median(row['cpu_ms_per_image']):.3f}   "
                      f"top-1 = fp32 on random images {100 * row['top1_agreement_with_fp32']:.1f}%")
            print(f"  int8/fp32 (median of the rounds' ratios): {report['models'][name]['int8_over_fp32']:.2f}",
                  flush=True)
            del made
            if a.json:
                write_json(a.json, report)


if __name__ == "__main__":
    main()
