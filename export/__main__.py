"""python -m export onnx|int8|tensorrt|bento|all|random — see `python -m export -h`. Each step is a function of
export/__init__.py whose keyword arguments are the step's options."""
import argparse
import logging
import sys
import time

from serving.backends import GPU_CHUNK
from training.checkpoint import CheckpointError, save_random_checkpoint
from training.contract import MODEL_NAME
from training.models import TTA
from training.recipes import RECIPES

from . import export_all, export_bento, export_int8, export_onnx, export_tensorrt
from .int8 import CALIB_IMAGES, CHECK_IMAGES
from .onnx import ExportError
from .tensorrt import TensorRTUnavailable

log = logging.getLogger("export")
DEFAULT_CHECKPOINT = "runs/part3/best.pt"


def parse_args(argv=None, prog="python -m export"):
    p = argparse.ArgumentParser(prog=prog, description="Export a CIFAR-100 checkpoint for serving.")
    sub = p.add_subparsers(dest="command", required=True)

    def checkpoint_arg(cmd):
        cmd.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="a checkpoint of any part (default: %(default)s)")

    def batch_args(cmd):
        cmd.add_argument("--min-batch", type=int, default=1)
        cmd.add_argument("--opt-batch", type=int, default=GPU_CHUNK,
                         help="the batch size TensorRT tunes for (default %(default)s: the service's chunk on a GPU)")
        cmd.add_argument("--max-batch", type=int, default=GPU_CHUNK)
        cmd.add_argument("--workspace-gib", type=float, default=None, help="TensorRT workspace limit")

    def tta_arg(cmd):
        cmd.add_argument("--tta", choices=sorted(TTA), default="none",
                         help="test-time augmentation inside the exported model: flip averages each image's logits "
                              "with its mirror's (about twice the compute; default %(default)s)")

    def int8_args(cmd):
        cmd.add_argument("--data-dir", default="data",
                         help="the training data to calibrate on and check with: the folder `python -m training "
                              "--data-dir` reads (cifar-100-python/ in the official format; default %(default)s)")
        cmd.add_argument("--calib-images", type=int, default=CALIB_IMAGES,
                         help="training images to calibrate on, a seeded sample (default %(default)s)")
        cmd.add_argument("--check-images", type=int, default=CHECK_IMAGES,
                         help="images of the recipe's validation split, unseen by calibration, that INT8 must "
                              "reproduce FP32 on (default %(default)s)")
        cmd.add_argument("--calib-dir", default=None,
                         help="calibrate on the images of this Kaggle-style folder (distortion00.npy ...) or "
                              "CIFAR-100-C folder instead of training images; the check stays on --data-dir")
        cmd.add_argument("--seed", type=int, default=0, help="the samples' seed (default %(default)s)")

    cmd = sub.add_parser("onnx", help="write OUT/<part>.onnx (and --fp16: OUT/<part>.fp16.onnx), checked in ONNX Runtime")
    checkpoint_arg(cmd)
    tta_arg(cmd)
    cmd.add_argument("--out", default="artifacts", help="output folder (default: %(default)s)")
    cmd.add_argument("--fp16", action="store_true", help="also write the FP16 variant")
    cmd.set_defaults(step=export_onnx)

    cmd = sub.add_parser("int8", help="write OUT/<part>.int8.onnx next to an FP32 ONNX file: calibrated static "
                                      "quantization, written only if it reproduces FP32 on held-out images")
    cmd.add_argument("--onnx", required=True, help="the FP32 file `export onnx` wrote (with its .json)")
    int8_args(cmd)
    cmd.add_argument("--symmetric", action="store_true",
                     help="signed int8 activations, zero point 0: <part>.int8-symmetric.onnx, the file TensorRT takes "
                          "(ONNX Runtime on x86 runs the default uint8 file faster)")
    cmd.set_defaults(step=export_int8)

    cmd = sub.add_parser("tensorrt", help="build OUT/<part>.engine (+ .engine.json) from an ONNX file")
    cmd.add_argument("--onnx", required=True, help="TensorRT 11: the .fp16.onnx file; TensorRT 10: either; INT8: "
                                                   "the .int8-symmetric.onnx file (`export int8 --symmetric`)")
    cmd.add_argument("--out", default="artifacts")
    batch_args(cmd)
    cmd.set_defaults(step=export_tensorrt)

    cmd = sub.add_parser("bento", help="save the checkpoint and its artifacts to the BentoML model store")
    checkpoint_arg(cmd)
    cmd.add_argument("--artifacts", default="artifacts", help="where `export onnx/tensorrt` wrote (default: %(default)s)")
    cmd.add_argument("--name", default=MODEL_NAME)
    cmd.set_defaults(step=export_bento)

    cmd = sub.add_parser("all", help="ONNX, FP16 ONNX, INT8 ONNX (--int8), TensorRT (when possible), BentoML model")
    checkpoint_arg(cmd)
    tta_arg(cmd)
    cmd.add_argument("--out", default="artifacts")
    cmd.add_argument("--name", default=MODEL_NAME)
    batch_args(cmd)
    cmd.add_argument("--int8", action="store_true",
                     help="also the INT8 ONNX file (as `export int8`), stored only if it passes its check")
    int8_args(cmd)
    cmd.set_defaults(step=export_all)

    cmd = sub.add_parser("random", help="write a checkpoint of a part's model with random weights (tests, benchmarks)")
    cmd.add_argument("--part", choices=sorted(RECIPES), default="part1")
    cmd.add_argument("--out", required=True, help="the checkpoint file to write")
    cmd.add_argument("--resolution", type=int, default=None, help="the network's input size (default: the part's)")
    cmd.add_argument("--seed", type=int, default=0)
    cmd.set_defaults(step=random_checkpoint)
    return p.parse_args(argv)


def random_checkpoint(out, *, part="part1", resolution=None, seed=0):
    path = save_random_checkpoint(out, part, seed, **({"resolution": resolution} if resolution else {}))
    log.info("wrote %s: %s with random weights", path, part)
    return path


def run(args):
    """The step's function, called with the options as keyword arguments."""
    options = {k: v for k, v in vars(args).items() if k not in ("command", "step")}
    return args.step(**options)


def main(argv=None, prog="python -m export"):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript"):  # one line per optimiser pass otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(argv, prog)
    start = time.perf_counter()
    try:
        run(args)
    except (CheckpointError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, TensorRTUnavailable) else 1)
    log.info("done in %.0f s", time.perf_counter() - start)


if __name__ == "__main__":
    main()
