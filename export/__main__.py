"""python -m export onnx|tensorrt|bento|all — see `python -m export -h`."""
import argparse
import logging
import sys
import time
from pathlib import Path

from training.checkpoint import CheckpointError

from .onnx import ExportError
from .tensorrt import TensorRTUnavailable, unavailable_reason

log = logging.getLogger("export")
DEFAULT_CHECKPOINT = "runs/part3/best.pt"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m export", description="Export a CIFAR-100 checkpoint for serving.")
    sub = p.add_subparsers(dest="command", required=True)

    def checkpoint_arg(cmd):
        cmd.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="a checkpoint of any part (default: %(default)s)")

    def batch_args(cmd):
        cmd.add_argument("--min-batch", type=int, default=1)
        cmd.add_argument("--opt-batch", type=int, default=64, help="the batch size TensorRT tunes for")
        cmd.add_argument("--max-batch", type=int, default=256)
        cmd.add_argument("--workspace-gib", type=float, default=None, help="TensorRT workspace limit")

    cmd = sub.add_parser("onnx", help="write OUT/<part>.onnx (and --fp16: OUT/<part>.fp16.onnx), checked in ONNX Runtime")
    checkpoint_arg(cmd)
    cmd.add_argument("--out", default="artifacts", help="output folder (default: %(default)s)")
    cmd.add_argument("--fp16", action="store_true", help="also write the FP16 variant")

    cmd = sub.add_parser("tensorrt", help="build OUT/<part>.engine (+ .engine.json) from an ONNX file")
    cmd.add_argument("--onnx", required=True, help="TensorRT 11: the .fp16.onnx file; TensorRT 10: either")
    cmd.add_argument("--out", default="artifacts")
    batch_args(cmd)

    cmd = sub.add_parser("bento", help="save the checkpoint and its artifacts to the BentoML model store")
    checkpoint_arg(cmd)
    cmd.add_argument("--artifacts", default="artifacts", help="where `export onnx/tensorrt` wrote (default: %(default)s)")
    cmd.add_argument("--name", default="cifar100-classifier")

    cmd = sub.add_parser("all", help="ONNX, FP16 ONNX, TensorRT (when possible), BentoML model")
    checkpoint_arg(cmd)
    cmd.add_argument("--out", default="artifacts")
    cmd.add_argument("--name", default="cifar100-classifier")
    batch_args(cmd)
    return p.parse_args(argv)


def export_onnx(checkpoint, out, fp16):
    from training.checkpoint import load_classifier, sha256

    from .onnx import export_checkpoint

    model, ckpt = load_classifier(checkpoint, "cpu")
    return export_checkpoint(model, ckpt, sha256(checkpoint), Path(out), fp16=fp16)


def export_tensorrt(onnx_path, out, args):
    from .onnx import read_metadata
    from .tensorrt import build_engine

    if reason := unavailable_reason():
        raise TensorRTUnavailable(f"cannot build a TensorRT engine: {reason}")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ExportError(f"no ONNX file at {onnx_path}")
    part = read_metadata(onnx_path).get("part") or onnx_path.name.split(".")[0]
    return build_engine(onnx_path, Path(out) / f"{part}.engine", args.min_batch, args.opt_batch, args.max_batch,
                        args.workspace_gib)


def run(args):
    if args.command == "onnx":
        export_onnx(args.checkpoint, args.out, args.fp16)
    elif args.command == "tensorrt":
        export_tensorrt(args.onnx, args.out, args)
    elif args.command == "bento":
        from .bento import save_to_store
        save_to_store(args.checkpoint, args.artifacts, args.name)
    else:  # all
        from .bento import save_to_store
        from .tensorrt import tensorrt_major

        written = export_onnx(args.checkpoint, args.out, fp16=True)
        if reason := unavailable_reason():
            log.info("skipping TensorRT: %s", reason)
        else:  # TensorRT 11 takes its precision from the graph; 10 sets FP16 on the FP32 graph itself
            export_tensorrt(written["fp16" if tensorrt_major() >= 11 else "fp32"][0], args.out, args)
        save_to_store(args.checkpoint, args.out, args.name)


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
