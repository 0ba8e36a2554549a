"""ONNX -> serialized TensorRT engine (one optimisation profile over the batch size), checked against ONNX Runtime.

TensorRT 11 networks are always strongly typed: precision comes from the graph, so build the FP16 engine from
the FP16 ONNX file. TensorRT 10 is weakly typed by default: there BuilderFlag.FP16 lets it pick FP16 kernels for
an FP32 graph. INT8 is explicit quantization: the Q/DQ nodes of `export int8 --symmetric`'s file say where
(TensorRT takes signed int8 with zero point 0 only; its calibrator API is deprecated since 10.1); TensorRT 10 also
needs the INT8 flag for them. An engine runs only on the GPU model and TensorRT version it was built with;
<engine>.json records both next to it. Running an engine is serving's job (serving/tensorrt.py); the check here
uses that runner.
"""
import logging
from pathlib import Path

from serving.backends import GPU_CHUNK, BackendError
from serving.tensorrt import TensorRTRunner, device_info, logger, unavailable_reason
from training.checkpoint import sha256
from training.contract import IMAGE_SHAPE, INPUT_NAME
from training.files import atomic_path

from .onnx import Artifact, ExportError, allowed_flips, compare, ort_session, random_batches

log = logging.getLogger(__name__)
CHECK_IMAGES = 512   # enough that the allowed 1% of flipped near-ties is a few images, not none


class TensorRTUnavailable(ExportError):
    pass


def tensorrt_major():
    import tensorrt as trt
    return int(trt.__version__.split(".")[0])


def profile_shapes(min_batch=1, opt_batch=GPU_CHUNK, max_batch=GPU_CHUNK):
    """The input shapes of the engine's one optimisation profile: (smallest, tuned for, largest). TensorRT picks its
    kernels for the middle one; the service calls the engine with chunks of GPU_CHUNK images (Backend.__call__
    splits larger merged batches at the profile's maximum), and `auto` times it on GPU_CHUNK."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ExportError(f"need 1 <= min-batch <= opt-batch <= max-batch, got {min_batch}, {opt_batch}, {max_batch}")
    return tuple((n, *IMAGE_SHAPE) for n in (min_batch, opt_batch, max_batch))


def build_engine(onnx, engine_path, min_batch=1, opt_batch=GPU_CHUNK, max_batch=GPU_CHUNK, workspace_gib=None):
    """Build an engine from an ONNX Artifact, check it against ONNX Runtime, write ENGINE and ENGINE.json.
    Returns the engine's Artifact."""
    precision = onnx.info.get("precision", "fp32")
    if precision == "int8" and (onnx.info.get("quantization") or {}).get("activations") == "uint8":
        raise ExportError(f"{onnx.path.name} has uint8 activations (for ONNX Runtime); TensorRT takes signed int8 "
                          f"with zero point 0: build from the file `python -m export int8 --symmetric` writes")
    if reason := unavailable_reason():
        raise TensorRTUnavailable(f"cannot build a TensorRT engine: {reason}")
    shapes = profile_shapes(min_batch, opt_batch, max_batch)
    import tensorrt as trt

    engine_path = Path(engine_path)
    builder = trt.Builder(logger())
    network = builder.create_network(0)  # explicit batch always (10+); strongly typed always (11+)
    parser = trt.OnnxParser(network, logger())
    if not parser.parse_from_file(str(onnx.path)):
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx.path}: {errors}")
    config = builder.create_builder_config()
    if tensorrt_major() < 11:
        config.set_flag(trt.BuilderFlag.FP16)  # weak typing: let TensorRT 10 choose FP16 kernels
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)   # the Q/DQ layers' int8 kernels (float layers may take FP16)
        else:
            precision = "fp16"
    elif precision == "fp32":
        log.warning("%s is an FP32 graph: TensorRT %s builds it in FP32; pass the .fp16.onnx file for FP16",
                    onnx.path.name, trt.__version__)
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    name = network.get_input(0).name
    profile = builder.create_optimization_profile()
    profile.set_shape(name, *shapes)
    config.add_optimization_profile(profile)
    log.info("building a TensorRT %s engine from %s (batch %d..%d, tuned for %d); this takes a minute or more",
             trt.__version__, onnx.path.name, min_batch, max_batch, opt_batch)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx.path} (see its log above)")

    info = {**device_info(), "min_batch": min_batch, "opt_batch": opt_batch, "max_batch": max_batch,
            "precision": precision, "onnx": onnx.path.name, "onnx_sha256": sha256(onnx.path),
            "part": onnx.info.get("part"), "checkpoint_sha256": onnx.info.get("checkpoint_sha256"),
            "tta": onnx.info.get("tta", "none")}
    with atomic_path(engine_path) as tmp:
        with open(tmp, "wb") as f:
            f.write(serialized)
        info["parity"] = check_engine(tmp, onnx.path)
    engine = Artifact(engine_path, info)
    engine.save()
    log.info("wrote %s (%.1f MB) and %s", engine_path, engine_path.stat().st_size / 1e6, Artifact.sidecar(engine_path).name)
    return engine


def check_engine(engine_path, onnx_path, images=CHECK_IMAGES):
    """The engine against ONNX Runtime on random images: at most allowed_flips(images) top-1 classes differ."""
    batch = random_batches((images,), seed=1)[0]
    expected = ort_session(onnx_path).run(None, {INPUT_NAME: batch})[0]
    try:
        result = compare(expected, TensorRTRunner(engine_path)(batch))
    except BackendError as e:
        raise ExportError(f"the engine does not run: {e}") from None
    log.info("TensorRT vs ONNX Runtime on %d images: max |Δlogit| %.2e, top-1 differs on %d",
             images, result["max_abs_diff"], result["top1_flips"])
    if result["top1_flips"] > allowed_flips(images):
        raise ExportError(f"the TensorRT engine's top-1 class differs from ONNX Runtime's on {result['top1_flips']} "
                          f"of {images} images (at most {allowed_flips(images)} allowed)")
    return result
