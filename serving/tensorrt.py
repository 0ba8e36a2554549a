"""Run a serialized TensorRT engine (TensorRT 10/11 name-based tensor API): uint8 N×32×32×3 in, float32 N×100 out.

An engine runs only on the GPU model and TensorRT version it was built with; `device_info()` names both, and
export/tensorrt.py records them in <engine>.json. Export builds engines with the same logger as this runner
(TensorRT warns when a process creates several).
"""
import functools
import threading
from pathlib import Path

import numpy as np

from training.contract import blank_images

from .backends import Backend, BackendError, cuda_index


def unavailable_reason():
    """Why no engine can be built or run here (a string), or None."""
    try:
        import tensorrt  # noqa: F401
    except Exception as e:   # not installed (ImportError), or a broken install or driver (OSError, ...)
        if isinstance(e, ImportError) and e.name == "tensorrt":
            return "the tensorrt package is not installed (pip install '.[tensorrt]')"
        return f"the tensorrt package does not load: {type(e).__name__}: {e}"
    import torch
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


@functools.cache
def logger():
    """The one TensorRT logger of this process."""
    import tensorrt as trt
    return trt.Logger(trt.Logger.WARNING)


def device_info(device="cuda"):
    """What an engine is tied to, as strings (compared before an engine is loaded): of the GPU DEVICE names."""
    import tensorrt as trt
    import torch
    index = cuda_index(device)
    return {"tensorrt_version": trt.__version__, "gpu_name": torch.cuda.get_device_name(index),
            "compute_capability": "{}.{}".format(*torch.cuda.get_device_capability(index))}


class TensorRTRunner(Backend):
    """Buffers are torch CUDA tensors; the engine runs on a private torch stream of its GPU (DEVICE: "cuda" or
    "cuda:N"). Calling it checks the batch and splits one larger than the engine's profile (Backend.__call__); `run`
    zero-pads one smaller than its minimum."""

    def __init__(self, engine_path, device="cuda"):
        if reason := unavailable_reason():
            raise BackendError(f"cannot run a TensorRT engine: {reason}")
        import tensorrt as trt
        import torch

        self.torch = torch
        self.device = torch.device("cuda", cuda_index(device))
        # TensorRT puts an engine and its execution context on the GPU current when they are made.
        with torch.cuda.device(self.device):
            self.runtime = trt.Runtime(logger())
            self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
            if self.engine is None:
                raise BackendError(f"TensorRT {trt.__version__} cannot load {engine_path}: engines only run on the "
                                   "GPU model and TensorRT version they were built with")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        if self.engine.get_tensor_dtype(self.input) != trt.DataType.UINT8:
            raise BackendError(f"{engine_path}: input {self.input} is {self.engine.get_tensor_dtype(self.input)}, "
                               "expected uint8")
        self.out_dtype = torch.float32 if self.engine.get_tensor_dtype(self.output) == trt.DataType.FLOAT \
            else torch.float16
        low, _, high = self.engine.get_tensor_profile_shape(self.input, 0)
        self.min_batch, self.max_batch = int(low[0]), int(high[0])
        self.stream = torch.cuda.Stream(self.device)
        self.lock = threading.Lock()  # one execution context: one batch at a time

    def run(self, images):
        torch, n = self.torch, len(images)
        images = np.ascontiguousarray(images)
        if n < self.min_batch:
            images = np.concatenate([images, blank_images(self.min_batch - n)])
        with self.lock, torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            x = torch.from_numpy(images).to(self.device)
            if not self.context.set_input_shape(self.input, tuple(x.shape)):
                raise BackendError(f"TensorRT refused input shape {tuple(x.shape)}")
            y = torch.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=self.out_dtype, device=self.device)
            self.context.set_tensor_address(self.input, x.data_ptr())
            self.context.set_tensor_address(self.output, y.data_ptr())
            if not self.context.execute_async_v3(stream_handle=self.stream.cuda_stream):
                raise BackendError("TensorRT execute_async_v3 failed")
            logits = y[:n].float().cpu()  # a copy on this stream: waits for the engine
        return logits.numpy()
