"""ONNX -> serialized TensorRT engine (one optimisation profile over the batch size), and a runner.

TensorRT 11 networks are always strongly typed: precision comes from the graph, so build the FP16
engine from the FP16 ONNX file. TensorRT 10 is weakly typed by default: there BuilderFlag.FP16 lets it
pick FP16 kernels for an FP32 graph. An engine runs only on the GPU architecture and TensorRT version
it was built with; <engine>.json records both next to it.
"""
import logging
import threading
from pathlib import Path

import numpy as np

from training.checkpoint import sha256
from training.files import atomic_path, write_json

from .onnx import INPUT, ExportError, compare, ort_session, random_batches, read_metadata

log = logging.getLogger(__name__)
MIN_TOP1_AGREEMENT = 0.99


class TensorRTUnavailable(ExportError):
    pass


def unavailable_reason():
    """Why no engine can be built or run here (a string), or None."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt package is not installed (pip install '.[tensorrt]')"
    import torch
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


def tensorrt_major():
    import tensorrt as trt
    return int(trt.__version__.split(".")[0])


def device_info():
    """What an engine is tied to; the serving backend compares these strings before loading one."""
    import tensorrt as trt
    import torch
    return {"tensorrt_version": trt.__version__, "gpu_name": torch.cuda.get_device_name(),
            "compute_capability": "{}.{}".format(*torch.cuda.get_device_capability())}


def build_engine(onnx_path, engine_path, min_batch=1, opt_batch=64, max_batch=256, workspace_gib=None):
    """Build, check against ONNX Runtime, and write ENGINE plus ENGINE.json; returns the JSON dict."""
    if reason := unavailable_reason():
        raise TensorRTUnavailable(f"cannot build a TensorRT engine: {reason}")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ExportError(f"need 1 <= min-batch <= opt-batch <= max-batch, got {min_batch}, {opt_batch}, {max_batch}")
    import tensorrt as trt

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise ExportError(f"no ONNX file at {onnx_path}")
    props = read_metadata(onnx_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch always (10+); strongly typed always (11+)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    precision = props.get("precision", "fp32")
    if tensorrt_major() < 11:
        config.set_flag(trt.BuilderFlag.FP16)  # weak typing: let TensorRT 10 choose FP16 kernels
        precision = "fp16"
    elif precision != "fp16":
        log.warning("%s is an FP32 graph: TensorRT %s builds it in FP32; pass the .fp16.onnx file for FP16",
                    onnx_path.name, trt.__version__)
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    name = network.get_input(0).name
    profile = builder.create_optimization_profile()
    profile.set_shape(name, (min_batch, 32, 32, 3), (opt_batch, 32, 32, 3), (max_batch, 32, 32, 3))
    config.add_optimization_profile(profile)
    log.info("building a TensorRT %s engine from %s (batch %d..%d, tuned for %d); this takes a minute or more",
             trt.__version__, onnx_path.name, min_batch, max_batch, opt_batch)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")

    info = {**device_info(), "min_batch": min_batch, "opt_batch": opt_batch, "max_batch": max_batch,
            "precision": precision, "onnx": onnx_path.name, "onnx_sha256": sha256(onnx_path),
            "part": props.get("part"), "checkpoint_sha256": props.get("checkpoint_sha256")}
    with atomic_path(engine_path) as tmp:
        with open(tmp, "wb") as f:
            f.write(serialized)
        info["parity"] = check_engine(tmp, onnx_path, opt_batch)
    write_json(engine_path.with_name(engine_path.name + ".json"), info)
    log.info("wrote %s (%.1f MB) and %s.json", engine_path, engine_path.stat().st_size / 1e6, engine_path.name)
    return info


def check_engine(engine_path, onnx_path, batch):
    """Top-1 agreement of the engine with ONNX Runtime on one random batch (>= 99% or ExportError)."""
    images = random_batches((batch,), seed=1)[0]
    expected = ort_session(onnx_path).run(None, {INPUT: images})[0]
    result = compare(expected, TensorRTRunner(engine_path)(images))
    log.info("TensorRT vs ONNX Runtime on %d images: max |Δlogit| %.2e, top-1 agreement %.2f%%",
             batch, result["max_abs_diff"], 100 * result["top1_agreement"])
    if result["top1_agreement"] < MIN_TOP1_AGREEMENT:
        raise ExportError(f"TensorRT engine agrees with ONNX Runtime on only {100 * result['top1_agreement']:.2f}% "
                          f"of top-1 predictions (need {100 * MIN_TOP1_AGREEMENT:g}%)")
    return result


class TensorRTRunner:
    """Run a serialized engine: uint8 N×32×32×3 numpy in, float32 N×100 numpy out.

    Buffers are torch CUDA tensors; the engine runs on a private torch stream with the TensorRT 10/11
    name-based tensor API (set_input_shape, set_tensor_address, execute_async_v3). Batches larger than
    the engine's profile are split; smaller than its minimum are zero-padded."""

    def __init__(self, engine_path):
        if reason := unavailable_reason():
            raise TensorRTUnavailable(f"cannot run a TensorRT engine: {reason}")
        import tensorrt as trt
        import torch

        self.torch = torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise ExportError(f"TensorRT {trt.__version__} cannot load {engine_path}: engines only run on the GPU "
                              "architecture and TensorRT version they were built with")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        if self.engine.get_tensor_dtype(self.input) != trt.DataType.UINT8:
            raise ExportError(f"{engine_path}: input {self.input} is {self.engine.get_tensor_dtype(self.input)}, "
                              "expected uint8")
        self.out_dtype = torch.float32 if self.engine.get_tensor_dtype(self.output) == trt.DataType.FLOAT \
            else torch.float16
        low, _, high = self.engine.get_tensor_profile_shape(self.input, 0)
        self.min_batch, self.max_batch = int(low[0]), int(high[0])
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)
        self.lock = threading.Lock()  # one execution context: one batch at a time

    def __call__(self, images):
        images = np.ascontiguousarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
            raise ValueError(f"expected uint8 N×32×32×3 images, got {images.dtype} {images.shape}")
        if len(images) == 0:
            return np.zeros((0, 100), np.float32)
        return np.concatenate([self._run(images[i:i + self.max_batch])
                               for i in range(0, len(images), self.max_batch)])

    def _run(self, images):
        torch, n = self.torch, len(images)
        if n < self.min_batch:
            images = np.concatenate([images, np.zeros((self.min_batch - n, 32, 32, 3), np.uint8)])
        with self.lock, torch.cuda.stream(self.stream):
            x = torch.from_numpy(images).to(self.device)
            if not self.context.set_input_shape(self.input, tuple(x.shape)):
                raise RuntimeError(f"TensorRT refused input shape {tuple(x.shape)}")
            y = torch.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=self.out_dtype, device=self.device)
            self.context.set_tensor_address(self.input, x.data_ptr())
            self.context.set_tensor_address(self.output, y.data_ptr())
            if not self.context.execute_async_v3(stream_handle=self.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            logits = y[:n].float().cpu()  # a copy on this stream: waits for the engine
        return logits.numpy()
