"""Inference backends behind one interface: uint8 images N×32×32×3 (NHWC, RGB) in, float32 logits N×100 out.

`load_backend(kind, model_dir)` reads the files of a `cifar100-classifier` store entry (contract #1):
  torch     checkpoint.pt; on a GPU fp16 + channels_last (optionally torch.compile'd with CUDA graphs
            for fixed batch buckets: CIFAR100_TORCH_COMPILE=1); on the CPU fp32
  onnx      model.onnx (model.fp16.onnx on a GPU when present) in ONNX Runtime, CUDA EP on a GPU
  tensorrt  model.engine through export.tensorrt.TensorRTRunner, only when the engine was built for this GPU
  auto      tensorrt if its engine fits this GPU, else onnx (CUDA on a GPU, CPU otherwise), else torch
"""
import json
import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
KINDS = ("auto", "torch", "onnx", "tensorrt")


class BackendError(Exception):
    pass


def cuda_available():
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # a broken CUDA install must not stop a CPU service
        return False


def cpu_threads():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Backend:
    name = device = precision = ""
    max_batch = None  # the largest batch one call of the engine takes; bigger inputs are chunked

    def run(self, images):
        raise NotImplementedError

    def __call__(self, images):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
            raise BackendError(f"expected uint8 N×32×32×3 images, got {images.dtype} {images.shape}")
        if self.max_batch is None or len(images) <= self.max_batch:
            return self.run(images)
        return np.concatenate([self.run(images[i:i + self.max_batch])
                               for i in range(0, len(images), self.max_batch)])

    def warmup(self, sizes=(1, 64)):
        for n in sizes:
            self(np.zeros((n, 32, 32, 3), np.uint8))

    def describe(self):
        return {"backend": self.name, "device": self.device, "precision": self.precision,
                "engine_max_batch": self.max_batch}


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model_dir, device=None, compile=None):
        import torch
        from training.checkpoint import load_classifier

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, _ = load_classifier(Path(model_dir) / "checkpoint.pt", self.device)
        if self.device.startswith("cuda"):
            # fp16 tensor cores; Preprocess's NHWC->NCHW permute already yields channels_last memory.
            model = model.half().to(memory_format=torch.channels_last)
            self.precision = "fp16"
        else:
            torch.set_num_threads(cpu_threads())
            self.precision = "fp32"
        compile = os.environ.get("CIFAR100_TORCH_COMPILE", "0") == "1" if compile is None else compile
        self.buckets = None
        if compile and self.device.startswith("cuda"):
            # CUDA graphs need fixed shapes: pad every batch up to a power-of-two bucket.
            model = torch.compile(model, mode="reduce-overhead", dynamic=False)
            self.max_batch = int(os.environ.get("CIFAR100_MAX_BATCH_SIZE", "1024"))
            self.buckets = [1 << i for i in range(self.max_batch.bit_length()) if 1 << i <= self.max_batch]
            self.precision += "+cudagraphs"
        self.model = model

    def run(self, images):
        torch, n = self.torch, len(images)
        x = torch.from_numpy(images)
        if self.buckets:
            bucket = next(b for b in self.buckets if b >= n)
            if bucket > n:
                x = torch.cat([x, x.new_zeros((bucket - n, *x.shape[1:]))])
        with torch.inference_mode():
            logits = self.model(x.to(self.device, non_blocking=True))
        return logits[:n].float().cpu().numpy()

    def warmup(self, sizes=(1, 64)):
        super().warmup(self.buckets or sizes)


class OnnxBackend(Backend):
    name = "onnx"

    def __init__(self, model_dir, device=None):
        import onnxruntime as ort

        model_dir = Path(model_dir)
        gpu = (device or ("cuda" if cuda_available() else "cpu")).startswith("cuda")
        if gpu and "CUDAExecutionProvider" not in ort.get_available_providers():
            log.warning("GPU present but this onnxruntime has no CUDAExecutionProvider; using the CPU")
            gpu = False
        path = model_dir / "model.onnx"
        self.precision = "fp32"
        if gpu and (model_dir / "model.fp16.onnx").is_file():
            path, self.precision = model_dir / "model.fp16.onnx", "fp16"
        if not path.is_file():
            raise BackendError(f"no {path.name} in {model_dir}")
        if gpu and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels that torch brings
        options = ort.SessionOptions()
        options.intra_op_num_threads = cpu_threads()  # one session, one request batch at a time
        options.inter_op_num_threads = 1
        # No busy-waiting between calls: the service's HTTP front shares these cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = (["CUDAExecutionProvider"] if gpu else []) + ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def run(self, images):
        logits = self.session.run([self.output_name], {self.input_name: images})[0]
        return logits.astype(np.float32, copy=False)


def engine_mismatch(model_dir):
    """Why the TensorRT engine cannot run here (a string), or None when it fits this GPU."""
    engine, meta_path = Path(model_dir) / "model.engine", Path(model_dir) / "model.engine.json"
    if not engine.is_file() or not meta_path.is_file():
        return "no TensorRT engine in the model"
    from export.tensorrt import device_info, unavailable_reason
    if (why := unavailable_reason()) is not None:
        return why
    meta = json.loads(meta_path.read_text())
    for key, value in device_info().items():
        if str(meta.get(key)) != value:
            return f"engine built for {key}={meta.get(key)}, this machine has {value}"
    return None


class TensorRTBackend(Backend):
    name = "tensorrt"
    device = "cuda"
    precision = "fp16"

    def __init__(self, model_dir, device=None):
        if (why := engine_mismatch(model_dir)) is not None:
            raise BackendError(f"TensorRT backend unavailable: {why}")
        from export.tensorrt import TensorRTRunner

        meta = json.loads((Path(model_dir) / "model.engine.json").read_text())
        self.runner = TensorRTRunner(Path(model_dir) / "model.engine")
        self.max_batch = int(meta["max_batch"])

    def run(self, images):
        return np.asarray(self.runner(images), dtype=np.float32)


def load_backend(kind, model_dir, device=None):
    """The backend `kind` (auto|torch|onnx|tensorrt) over the files in `model_dir`."""
    if kind not in KINDS:
        raise BackendError(f"unknown backend {kind!r}: use one of {', '.join(KINDS)}")
    if kind == "auto":
        if (why := engine_mismatch(model_dir)) is None:
            kind = "tensorrt"
        elif (Path(model_dir) / "model.onnx").is_file():
            log.info("auto backend: not TensorRT (%s); using ONNX Runtime", why)
            kind = "onnx"
        else:
            kind = "torch"
    return {"torch": TorchBackend, "onnx": OnnxBackend, "tensorrt": TensorRTBackend}[kind](model_dir, device)
