"""python -m export onnx|tensorrt|bento|all|random — see `python -m export -h`."""
import argparse
import logging
import sys
import time
from pathlib import Path

from serving.backends import GPU_CHUNK
from serving.tensorrt import unavailable_reason
from training.checkpoint import CheckpointError, load_checkpoint, load_classifier, save_random_checkpoint, sha256
from training.contract import MODEL_NAME
from training.models import TTA
from training.recipes import RECIPES

from .onnx import Artifact, ExportError
from .tensorrt import TensorRTUnavailable

log = logging.getLogger("export")
DEFAULT_CHECKPOINT = "runs/part3/best.pt"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m export", description="Export a CIFAR-100 checkpoint for serving.")
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

    cmd = sub.add_parser("onnx", help="write OUT/<part>.onnx (and --fp16: OUT/<part>.fp16.onnx), checked in ONNX Runtime")
    checkpoint_arg(cmd)
    tta_arg(cmd)
    cmd.add_argument("--out", default="artifacts", help="output folder (default: %(default)s)")
    cmd.add_argument("--fp16", action="store_true", help="also write the FP16 variant")

    cmd = sub.add_parser("tensorrt", help="build OUT/<part>.engine (+ .engine.json) from an ONNX file")
    cmd.add_argument("--onnx", required=True, help="TensorRT 11: the .fp16.onnx file; TensorRT 10: either")
    cmd.add_argument("--out", default="artifacts")
    batch_args(cmd)

    cmd = sub.add_parser("bento", help="save the checkpoint and its artifacts to the BentoML model store")
    checkpoint_arg(cmd)
    cmd.add_argument("--artifacts", default="artifacts", help="where `export onnx/tensorrt` wrote (default: %(default)s)")
    cmd.add_argument("--name", default=MODEL_NAME)

    cmd = sub.add_parser("all", help="ONNX, FP16 ONNX, TensorRT (when possible), BentoML model")
    checkpoint_arg(cmd)
    tta_arg(cmd)
    cmd.add_argument("--out", default="artifacts")
    cmd.add_argument("--name", default=MODEL_NAME)
    batch_args(cmd)

    cmd = sub.add_parser("random", help="write a checkpoint of a part's model with random weights (tests, benchmarks)")
    cmd.add_argument("--part", choices=sorted(RECIPES), default="part1")
    cmd.add_argument("--out", required=True, help="the checkpoint file to write")
    cmd.add_argument("--resolution", type=int, default=None, help="the network's input size (default: the part's)")
    cmd.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load(checkpoint):
    """(model on the CPU, checkpoint dict, the file's sha256)."""
    model, ckpt = load_classifier(checkpoint, "cpu")
    return model, ckpt, sha256(checkpoint)


def export_tensorrt(onnx, out, args):
    """The engine Artifact built from an ONNX Artifact."""
    from .tensorrt import build_engine

    return build_engine(onnx, Path(out) / f"{onnx.info['part']}.engine", args.min_batch, args.opt_batch,
                        args.max_batch, args.workspace_gib)


def run(args):
    from .bento import find_artifacts, save_to_store
    from .onnx import export_checkpoint

    if args.command == "random":
        overrides = {"resolution": args.resolution} if args.resolution else {}
        path = save_random_checkpoint(args.out, args.part, args.seed, **overrides)
        log.info("wrote %s: %s with random weights", path, args.part)
    elif args.command == "onnx":
        export_checkpoint(*load(args.checkpoint), Path(args.out), fp16=args.fp16, tta=args.tta)
    elif args.command == "tensorrt":
        export_tensorrt(Artifact.load(args.onnx), args.out, args)
    elif args.command == "bento":
        ckpt, digest = load_checkpoint(args.checkpoint), sha256(args.checkpoint)
        save_to_store(args.checkpoint, ckpt, digest, find_artifacts(args.artifacts, ckpt["recipe"]["name"], digest),
                      args.name)
    else:  # all: each step hands what it made to the next; nothing is read back from disk
        from .tensorrt import tensorrt_major

        model, ckpt, digest = load(args.checkpoint)
        written = export_checkpoint(model, ckpt, digest, Path(args.out), fp16=True, tta=args.tta)
        artifacts = list(written.values())
        if reason := unavailable_reason():
            log.info("skipping TensorRT: %s", reason)
        else:  # TensorRT 11 takes its precision from the graph; 10 sets FP16 on the FP32 graph itself
            artifacts.append(export_tensorrt(written["fp16" if tensorrt_major() >= 11 else "fp32"], args.out, args))
        save_to_store(args.checkpoint, ckpt, digest, artifacts, args.name)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript"):  # one line per optimiser pass otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        run(args)
    except (CheckpointError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, TensorRTUnavailable) else 1)
    log.info("done in %.0f s", time.perf_counter() - start)


if __name__ == "__main__":
    main()
