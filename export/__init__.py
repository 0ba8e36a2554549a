"""A checkpoint to ONNX (FP32, FP16, INT8), a TensorRT engine and the BentoML model store; each file checked before
it is written. `python -m export STEP` runs these functions, with the same names for its options:

    from export import export_all
    model = export_all("runs/part1/best.pt", out="artifacts")   # the bentoml.Model now in the store
"""
import logging
from pathlib import Path

from serving.backends import GPU_CHUNK
from training.contract import MODEL_NAME

from .int8 import CALIB_IMAGES, CHECK_IMAGES

log = logging.getLogger(__name__)


def load(checkpoint):
    """(model on the CPU, checkpoint dict, the file's sha256)."""
    from training.checkpoint import load_classifier, sha256

    model, ckpt = load_classifier(checkpoint, "cpu")
    return model, ckpt, sha256(checkpoint)


def export_onnx(checkpoint, out="artifacts", *, fp16=False, tta="none"):
    """OUT/<part>.onnx (and with FP16 OUT/<part>.fp16.onnx), each checked in ONNX Runtime: {precision: Artifact}.
    tta="flip" puts flip test-time augmentation inside the graph."""
    from .onnx import export_checkpoint

    return export_checkpoint(*load(checkpoint), Path(out), fp16=fp16, tta=tta)


def export_int8(onnx, data_dir="data", *, calib_images=CALIB_IMAGES, check_images=CHECK_IMAGES, seed=0,
                symmetric=False, calib_dir=None):
    """OUT/<part>.int8.onnx next to the FP32 ONNX file ONNX (a file or an Artifact): calibrated on CALIB_IMAGES of
    the training images in DATA_DIR (seeded), written only if it reproduces the FP32 file on CHECK_IMAGES of its
    validation split; calib_dir: calibrate on a Kaggle-style (or CIFAR-100-C) folder's images instead; symmetric=True
    writes the signed, zero-point-0 variant TensorRT takes. Its Artifact."""
    from .int8 import export_int8 as quantize
    from .onnx import Artifact

    onnx = onnx if isinstance(onnx, Artifact) else Artifact.load(onnx)
    return quantize(onnx, data_dir, calib_images, check_images, seed, symmetric, calib_dir)


def export_tensorrt(onnx, out="artifacts", *, min_batch=1, opt_batch=GPU_CHUNK, max_batch=GPU_CHUNK, workspace_gib=None):
    """OUT/<part>.engine (+ .engine.json) built from ONNX (a file or an Artifact) and checked: its Artifact."""
    from .onnx import Artifact
    from .tensorrt import build_engine

    onnx = onnx if isinstance(onnx, Artifact) else Artifact.load(onnx)
    return build_engine(onnx, Path(out) / f"{onnx.info['part']}.engine", min_batch, opt_batch, max_batch,
                        workspace_gib)


def export_bento(checkpoint, artifacts="artifacts", *, name=MODEL_NAME):
    """The checkpoint and what export_onnx/export_tensorrt wrote from it into ARTIFACTS, as a new version of NAME in
    the BentoML model store: the bentoml.Model."""
    from training.checkpoint import load_checkpoint, sha256

    from . import bento

    ckpt, digest = load_checkpoint(checkpoint), sha256(checkpoint)
    found = bento.find_artifacts(artifacts, ckpt["recipe"]["name"], digest)
    return bento.save_to_store(checkpoint, ckpt, digest, found, name)


def export_all(checkpoint, out="artifacts", *, name=MODEL_NAME, tta="none", min_batch=1, opt_batch=GPU_CHUNK,
               max_batch=GPU_CHUNK, workspace_gib=None, int8=False, data_dir="data", calib_images=CALIB_IMAGES,
               check_images=CHECK_IMAGES, seed=0, calib_dir=None):
    """ONNX, FP16 ONNX, with int8=True the INT8 ONNX file (export_int8's options) when it passes its check, the
    TensorRT engine where TensorRT and a GPU are present, then the model store: the bentoml.Model. Each step hands
    what it made to the next; nothing is read back from disk."""
    from serving.tensorrt import unavailable_reason

    from . import bento
    from .int8 import Int8Refused
    from .onnx import export_checkpoint

    model, ckpt, digest = load(checkpoint)
    written = export_checkpoint(model, ckpt, digest, Path(out), fp16=True, tta=tta)
    artifacts = list(written.values())
    if int8:
        try:
            artifacts.append(export_int8(written["fp32"], data_dir, calib_images=calib_images,
                                         check_images=check_images, seed=seed, calib_dir=calib_dir))
        except Int8Refused as e:   # the other artifacts stand; the store gets no INT8 file
            log.warning("%s", e)
    if reason := unavailable_reason():
        log.info("skipping TensorRT: %s", reason)
    else:  # TensorRT 11 takes its precision from the graph; 10 sets FP16 on the FP32 graph itself
        from .tensorrt import tensorrt_major
        artifacts.append(export_tensorrt(written["fp16" if tensorrt_major() >= 11 else "fp32"], out,
                                         min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
                                         workspace_gib=workspace_gib))
    return bento.save_to_store(checkpoint, ckpt, digest, artifacts, name)
