"""Inference backends behind one interface: uint8 images N×32×32×3 (NHWC, RGB) in, float32 logits N×100 out.

`load_backend(kind, model_dir)` reads the files of a model store entry (training/contract.py names them):
  torch     checkpoint.pt; on a GPU fp16 + channels_last, torch.compile'd with one CUDA graph per batch bucket
            (compiled at load; CIFAR100_TORCH_COMPILE=0: eager), through preallocated pinned host buffers with
            asynchronous copies, all on one thread; on the CPU fp32 eager
  onnx      model.onnx in ONNX Runtime with I/O binding, CUDA EP on a GPU (checked after the session starts: the CPU
            when the CUDA libraries do not load); CIFAR100_ONNX_PRECISION picks the file, by default model.fp16.onnx
            on a GPU when present, model.int8.onnx on the CPU when export found it faithful and faster
  tensorrt  model.engine through serving.tensorrt.TensorRTRunner, only when the engine was built for this GPU
  auto      every one of them that can run on this machine's device, timed on the same batch after warm-up;
            the fastest serves (describe() shows the measured img/s and why the others were left out)
A device is "cpu", "cuda" (the first GPU this process sees: a model worker sees only its own) or "cuda:N".
"""
import collections
import concurrent.futures
import json
import logging
import os
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import yaml

from serving import settings
from training.contract import (CHECKPOINT_FILE, ENGINE_FILE, ENGINE_INFO_FILE, IMAGE_SHAPE, MODEL_INFO_FILE,
                               NUM_CLASSES, ONNX_FILE, ONNX_FP16_FILE, ONNX_INT8_FILE, ONNX_INT8_INFO_FILE, BatchError,
                               blank_images, check_batch, chunks)

log = logging.getLogger(__name__)
KINDS = ("auto", "torch", "onnx", "tensorrt")
# Images per model call on a GPU: the torch backend's largest CUDA graph, the batch size TensorRT engines are tuned
# for (export/tensorrt.py), and what `auto` times there.
GPU_CHUNK = 256
AUTO_BATCH = {True: GPU_CHUNK, False: 32}   # images per timed call when auto compares backends: on a GPU, on the CPU
# Request bodies arrive as read-only arrays; the models only read their input, so torch's warning about wrapping
# one without a copy says nothing here.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


class BackendError(Exception):
    pass


def cuda_available():
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # a broken CUDA install must not stop a CPU service
        return False


def cuda_index(device):
    """The GPU number in a device name: "cuda:1" -> 1; "cuda" -> 0, the first GPU this process sees."""
    return int(device.partition(":")[2] or 0)


def cpu_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_threads():
    """Threads for a model on the CPU: CIFAR100_CPU_THREADS (a model worker's share, serving/devices.py), else all
    the cores this process may use."""
    return settings.get().cpu_threads or cpu_cores()


class Backend:
    name = device = precision = ""
    max_batch = None  # the largest batch one call of the engine takes; bigger inputs are chunked
    auto = None       # how `auto` chose this backend: measured img/s of each candidate

    def run(self, images):
        raise NotImplementedError

    def __call__(self, images):
        try:
            check_batch(images.dtype, images.shape)
        except BatchError as e:
            raise BackendError(str(e)) from None
        if self.max_batch is None or len(images) <= self.max_batch:
            return self.run(images)
        return np.concatenate([self.run(images[rows]) for rows in chunks(len(images), self.max_batch)])

    def warmup(self, sizes=(1, 64)):
        for n in sizes:
            self(blank_images(n))

    def describe(self):
        return {"backend": self.name, "device": self.device, "precision": self.precision,
                "engine_max_batch": self.max_batch, **({"auto": self.auto} if self.auto else {})}


class TorchBackend(Backend):
    name = "torch"
    # On a GPU with torch.compile: calls are cut into chunks of GPU_CHUNK, each padded up to a power of two from 2,
    # one CUDA graph per bucket. 2, not 1: torch.compile specialises a batch of 1 (one more compile).
    BUCKETS = [2 << i for i in range(GPU_CHUNK.bit_length() - 1)]

    def __init__(self, model_dir, device=None, compile=None, tta=None):
        import torch
        from training.checkpoint import load_classifier
        from training.models import TTA

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # The exported graphs hold the model's test-time augmentation; here it wraps the checkpoint's model.
        self.tta = tta or stored_metadata(model_dir).get("tta", "none")
        model, _ = load_classifier(Path(model_dir) / CHECKPOINT_FILE, self.device)
        model = TTA[self.tta](model)
        self.buckets, self.warmup_seconds, self.calls, self.compile_error = None, {}, None, None
        if not self.device.startswith("cuda"):
            torch.set_num_threads(cpu_threads())
            self.model, self.precision = model, "fp32"
            return
        # fp16 tensor cores; Preprocess's NHWC->NCHW permute already yields channels_last memory.
        self.model = model.half().to(memory_format=torch.channels_last)
        if compile is None:
            compile = settings.get().torch_compile
        self.precision = "fp16+compile" if compile else "fp16"
        self.prepare_calls(compile)

    def prepare_calls(self, compile):
        """How a GPU is served (the CPU runs it too, for the tests): preallocated buffers, chunks, all calls
        on one thread; with `compile`, torch.compile'd and warmed up bucket by bucket here."""
        self.eager, self.chunk = self.model, settings.get().max_batch_size
        if compile:
            # reduce-overhead: Inductor kernels replayed as CUDA graphs, one per bucket. The batch dimension
            # is marked dynamic, so Dynamo compiles two graphs (convolutions guard on batch >= 16), not one
            # per bucket (8 static compiles of ~22 s each, and its recompile limit is 8).
            self.model = self.torch.compile(self.eager, mode="reduce-overhead")
            self.buckets, self.chunk = self.BUCKETS, self.BUCKETS[-1]
            # A few fixed shapes: cuDNN may time its convolution algorithms once per shape (at warm-up).
            self.torch.backends.cudnn.benchmark = True
        self.capacity = 0
        self.reserve(self.chunk)
        # One thread: the buffers serve one call at a time, and torch.compile's CUDA graphs belong to the
        # thread that recorded them (a call from another of BentoML's threads would record them again, in
        # another memory pool).
        self.calls = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="model", initializer=setup_model_thread if self.device.startswith("cuda") else None,
            initargs=(self.torch, self.device))   # not a bound method: the thread would keep this backend alive
        if compile:
            self.warmup()   # compiled now, in bucket order: a compiled backend is ready when it exists

    def reserve(self, n):
        """Buffers for n images, made once per size (whole chunks): pinned host memory makes both copies
        asynchronous DMA. Padding rows are whatever an earlier call left: in eval mode each image's logits
        are its own."""
        rows = -(-n // self.chunk) * self.chunk
        if rows > self.capacity:
            torch, pinned = self.torch, self.device.startswith("cuda")
            self.host_in = torch.empty((rows, *IMAGE_SHAPE), dtype=torch.uint8, pin_memory=pinned)
            self.host_out = torch.empty((rows, NUM_CLASSES), dtype=torch.float32, pin_memory=pinned)
            self.device_in = torch.empty((rows, *IMAGE_SHAPE), dtype=torch.uint8, device=self.device)
            self.capacity = rows

    def run(self, images):
        if self.calls is None:   # the CPU as served: eager, from whichever thread calls
            with self.torch.inference_mode():
                return self.model(self.torch.from_numpy(images)).numpy()
        return self.calls.submit(self.run_in_chunks, images).result()

    def run_in_chunks(self, images):
        """One copy in, the chunks queued back to back, one copy out per chunk, one wait for the GPU."""
        torch, n = self.torch, len(images)
        self.reserve(n)
        with torch.inference_mode():
            np.copyto(self.host_in[:n].numpy(), images)
            self.device_in[:n].copy_(self.host_in[:n], non_blocking=True)
            for rows in chunks(n, self.chunk):
                self.run_chunk(rows.start, rows.stop - rows.start)
            if self.device.startswith("cuda"):
                torch.cuda.current_stream(self.device).synchronize()
        return self.host_out[:n].numpy().copy()

    def run_chunk(self, start, rows):
        bucket = next(b for b in self.buckets if b >= rows) if self.buckets else rows
        batch = self.device_in[start:start + bucket]
        if self.buckets:
            self.torch._dynamo.maybe_mark_dynamic(batch, 0)
        # The copy is queued on the stream before the next chunk's graph replays over these logits.
        self.host_out[start:start + rows].copy_(self.model(batch)[:rows].float(), non_blocking=True)

    def warmup(self, sizes=(1, 64)):
        if not self.buckets:
            return super().warmup(sizes)
        for bucket in reversed(self.buckets):
            if bucket in self.warmup_seconds:
                continue
            start = time.perf_counter()
            try:
                super().warmup([bucket] * 3)   # CUDA graph trees: warm-up run, recording, first replay
            except Exception as e:   # Triton/Inductor trouble on this machine: serve eager rather than nothing
                log.exception("torch.compile failed on a batch of %d; serving the eager model", bucket)
                self.model, self.buckets = self.eager, None
                self.torch.backends.cudnn.benchmark = False   # any batch size again: no timing per shape
                self.precision = self.precision.removesuffix("+compile")
                self.compile_error = f"{type(e).__name__}: {e}"
                return
            self.warmup_seconds[bucket] = round(time.perf_counter() - start, 1)
            log.info("torch.compile: batch %d ready in %.1f s", bucket, self.warmup_seconds[bucket])

    def describe(self):
        extra = {"buckets": self.buckets, "warmup_seconds": self.warmup_seconds} if self.warmup_seconds else {}
        extra["tta"] = self.tta
        if self.calls is not None:
            extra["images_per_model_call"] = self.chunk
        if self.compile_error:
            extra["compile_error"] = self.compile_error
        return {**super().describe(), **extra}


def setup_model_thread(torch, device):
    """A GPU model thread's setup: its GPU, and CUDA graph trees of its own. torch before 2.13 keeps their state only
    in the thread that imported them: a compiled call from any other thread (a second backend's model thread)
    fails an assertion and the warm-up falls back to eager (pytorch#123177, fixed by pytorch#184357)."""
    if ":" in device:
        torch.cuda.set_device(device)
    own_cudagraph_trees(torch)


def own_cudagraph_trees(torch):
    """Give the calling thread its own CUDA graph trees state, as torch >= 2.13 does by itself; a thread that has
    one keeps it."""
    from torch._inductor import cudagraph_trees as trees

    if hasattr(trees.local, "tree_manager_containers") or torch._C._is_key_in_tls("tree_manager_containers"):
        return
    trees.local.tree_manager_containers = {}
    trees.local.tree_manager_locks = collections.defaultdict(threading.Lock)
    torch._C._stash_obj_in_tls("tree_manager_containers", trees.local.tree_manager_containers)
    torch._C._stash_obj_in_tls("tree_manager_locks", trees.local.tree_manager_locks)


def cuda_provider(device):
    """ONNX Runtime's CUDA provider for DEVICE with the service's options: the GPU it names (device_id), and cuDNN's
    heuristic choice of convolution algorithm. The provider's default, an exhaustive search, times every algorithm
    on the first call of each new input shape, and the batcher makes every batch size from 1 to its maximum: each
    new one would pay that search on a live request."""
    return "CUDAExecutionProvider", {"device_id": cuda_index(device), "cudnn_conv_algo_search": "HEURISTIC"}


ONNX_FILES = {"fp32": ONNX_FILE, "fp16": ONNX_FP16_FILE, "int8": ONNX_INT8_FILE}


def int8_preferred(model_dir):
    """Whether the CPU should run model.int8.onnx: export wrote it (so it passed its check against FP32) and measured
    it faster than FP32 on the CPU; the figures are in its sidecar."""
    info = Path(model_dir) / ONNX_INT8_INFO_FILE
    if not (Path(model_dir) / ONNX_INT8_FILE).is_file() or not info.is_file():
        return False
    check = json.loads(info.read_text()).get("check") or {}
    return bool(check.get("passed") and (check.get("speed") or {}).get("faster"))


def onnx_precision(model_dir, gpu, wanted=None):
    """The precision of the ONNX file to serve: WANTED (else CIFAR100_ONNX_PRECISION) when set, and its file must be
    there; otherwise fp16 on a GPU when exported, int8 on the CPU when int8_preferred(), else fp32."""
    wanted = wanted or settings.get().onnx_precision
    if wanted is not None:
        if not (Path(model_dir) / ONNX_FILES[wanted]).is_file():
            raise BackendError(f"no {ONNX_FILES[wanted]} in {model_dir} for CIFAR100_ONNX_PRECISION={wanted}: "
                               f"export it, or unset the setting")
        return wanted
    if gpu:
        return "fp16" if (Path(model_dir) / ONNX_FP16_FILE).is_file() else "fp32"
    return "int8" if int8_preferred(model_dir) else "fp32"


class OnnxBackend(Backend):
    name = "onnx"

    def __init__(self, model_dir, device=None, precision=None):
        import onnxruntime as ort

        self.wanted = precision
        model_dir = Path(model_dir)
        if not (model_dir / ONNX_FILE).is_file():
            raise BackendError(f"no {ONNX_FILE} in {model_dir}")
        wanted = device or ("cuda" if cuda_available() else "cpu")
        if wanted.startswith("cuda"):
            try:
                self.start(ort, model_dir, wanted)
                return
            except BackendError as e:
                if device:   # asked for by name (auto does): refuse rather than run on the CPU
                    raise
                log.warning("%s; running ONNX Runtime on the CPU", e)
        self.start(ort, model_dir, "cpu")

    def start(self, ort, model_dir, device):
        """The session on DEVICE over the file onnx_precision() picks."""
        gpu = device.startswith("cuda")
        precision = onnx_precision(model_dir, gpu, self.wanted)
        path = model_dir / ONNX_FILES[precision]
        if gpu:
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendError("this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels that torch brings
        options = ort.SessionOptions()
        options.intra_op_num_threads = cpu_threads()  # one session, one request batch at a time
        options.inter_op_num_threads = 1
        # No busy-waiting between calls: the service's HTTP front shares these cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ([cuda_provider(device)] if gpu else []) + ["CPUExecutionProvider"]
        session = ort.InferenceSession(str(path), options, providers=providers)
        if gpu and session.get_providers()[0] != "CUDAExecutionProvider":
            # get_available_providers() lists CUDA whenever onnxruntime-gpu is installed, even when its CUDA or cuDNN
            # libraries fail to load; the session then runs on the CPU without a word (ONNX Runtime logs why).
            raise BackendError(f"ONNX Runtime's CUDA provider did not start (its log above says why): the session "
                               f"would run on {', '.join(session.get_providers())}")
        self.session, self.device, self.precision = session, device, precision
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name

    def run(self, images):
        # I/O binding: the logits stay where the model made them until one copy to the host at the end.
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, np.ascontiguousarray(images))
        if self.device.startswith("cuda"):
            binding.bind_output(self.output_name, "cuda", cuda_index(self.device))
        else:
            binding.bind_output(self.output_name, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0].astype(np.float32, copy=False)


def engine_mismatch(model_dir, device="cuda"):
    """Why the TensorRT engine cannot run on DEVICE (a string), or None when it fits that GPU."""
    engine, info = Path(model_dir) / ENGINE_FILE, Path(model_dir) / ENGINE_INFO_FILE
    if not engine.is_file() or not info.is_file():
        return "no TensorRT engine in the model"
    from serving.tensorrt import device_info, unavailable_reason
    if (why := unavailable_reason()) is not None:
        return why
    if not device.startswith("cuda"):
        return f"TensorRT runs on a GPU, not on {device}"
    built_for = json.loads(info.read_text())
    for key, value in device_info(device).items():
        if str(built_for.get(key)) != value:
            return f"engine built for {key}={built_for.get(key)}, this machine has {value}"
    return None


class TensorRTBackend(Backend):
    name = "tensorrt"
    device = "cuda"

    def __init__(self, model_dir, device=None):
        device = device or "cuda"
        if (why := engine_mismatch(model_dir, device)) is not None:
            raise BackendError(f"TensorRT backend unavailable: {why}")
        from serving.tensorrt import TensorRTRunner

        self.runner = TensorRTRunner(Path(model_dir) / ENGINE_FILE, device)
        self.device = device
        self.max_batch = self.runner.max_batch   # the engine's profile: Backend.__call__ has checked and split
        self.precision = json.loads((Path(model_dir) / ENGINE_INFO_FILE).read_text())["precision"]

    def run(self, images):
        return np.asarray(self.runner.run(images), dtype=np.float32)


BACKENDS = {"tensorrt": TensorRTBackend, "onnx": OnnxBackend, "torch": TorchBackend}


def stored_metadata(model_dir):
    """The metadata export gave a model store entry (in BentoML's model.yaml); {} for a folder without one."""
    path = Path(model_dir) / MODEL_INFO_FILE
    return (yaml.safe_load(path.read_text()) or {}).get("metadata") or {} if path.is_file() else {}


def load_backend(kind, model_dir, device=None, tta=None):
    """The backend `kind` (auto|torch|onnx|tensorrt) over the files in `model_dir`. `tta` (the PyTorch backend only;
    exported graphs hold theirs) overrides the entry's own test-time augmentation."""
    if kind not in KINDS:
        raise BackendError(f"unknown backend {kind!r}: use one of {', '.join(KINDS)}")
    if kind == "auto":
        return fastest_backend(model_dir, device, tta)
    return TorchBackend(model_dir, device, tta=tta) if kind == "torch" else BACKENDS[kind](model_dir, device)


def images_per_second(backend, batch, min_seconds=0.5, min_calls=3):
    backend(batch)   # first call: lazy initialisation, autotuning
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < min_seconds:
        backend(batch)
        calls += 1
    return calls * len(batch) / (time.perf_counter() - start)


def fastest_backend(model_dir, device=None, tta=None):
    """auto: every backend that loads for this machine's device, timed on the same batch; the fastest wins."""
    device = device or ("cuda" if cuda_available() else "cpu")
    candidates, left_out = {}, {}
    for kind, make in BACKENDS.items():
        try:
            candidates[kind] = make(model_dir, device, tta=tta) if kind == "torch" else make(model_dir, device)
        except Exception as e:   # a missing file or library, an engine for another GPU: say why, go on
            left_out[kind] = str(e).removeprefix("TensorRT backend unavailable: ")
    batch = blank_images(AUTO_BATCH[device.startswith("cuda")])
    speed = {}
    for kind, backend in list(candidates.items()):
        try:
            speed[kind] = round(images_per_second(backend, batch))
        except Exception as e:   # loads but cannot run here (e.g. out of memory): leave it out too
            left_out[kind] = f"failed on a batch of {len(batch)}: {type(e).__name__}: {e}"
            del candidates[kind]
    if not speed:
        raise BackendError(f"no backend can serve {model_dir}: " + "; ".join(f"{k}: {v}" for k, v in left_out.items()))
    best = max(speed, key=speed.get)
    chosen = candidates.pop(best)
    candidates.clear()   # free the others (and their device memory) now
    if device.startswith("cuda"):
        import torch
        torch.cuda.empty_cache()
    chosen.auto = {"batch": len(batch), "img_per_s": speed, "left_out": left_out}
    log.info("auto backend: %s (%s img/s at batch %d; left out: %s)", best,
             ", ".join(f"{k} {v}" for k, v in speed.items()), len(batch), left_out or "none")
    return chosen
