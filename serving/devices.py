"""Which device each model worker uses: one worker per visible GPU by default, each bound to its own.

BentoML 1.4.40 gives every worker of a service the same CUDA_VISIBLE_DEVICES, and numbers them from 1
(`bentoml.server_context.worker_index`). So each worker narrows CUDA_VISIBLE_DEVICES to its own GPU itself, before
anything in it starts CUDA: then the torch, ONNX Runtime and TensorRT backends all see exactly one device, as
`cuda:0`. With more workers than GPUs, workers share GPUs round-robin (worker 3 of 2 GPUs gets the first again);
on the CPU the workers split the cores between them.
"""
import functools
import logging
import os
import subprocess
import sys
from pathlib import Path

from serving import settings

log = logging.getLogger(__name__)
NVIDIA_DRIVER = Path("/proc/driver/nvidia")   # there whenever the NVIDIA kernel driver is loaded


def visible_gpus():
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (else all that NVML sees, else all that CUDA
    sees), found without starting CUDA in this process (which would fix its devices for good)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and not d.strip().startswith("-")]
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:   # no NVML library (nvidia-ml-py missing), no driver, or NVML itself failing
        if not NVIDIA_DRIVER.exists():
            return []   # no NVIDIA driver: the CPU
        log.warning("NVML cannot count the GPUs (%s: %s); asking CUDA in a separate process", type(e).__name__, e)
        return [str(i) for i in range(cuda_device_count())]


@functools.cache
def cuda_device_count():
    """How many GPUs CUDA sees, counted in a child process so that this one does not start CUDA (0 if it fails)."""
    try:
        done = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                              capture_output=True, text=True, timeout=120)
        return int(done.stdout.split()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return 0


def worker_count(setting=None, gpus=None):
    """How many model workers: the setting (CIFAR100_MODEL_WORKERS) when given, else one per visible GPU, else 1."""
    return setting or len(visible_gpus() if gpus is None else gpus) or 1


def device_for_worker(index, gpus):
    """The GPU (a CUDA_VISIBLE_DEVICES name) of worker INDEX (from 1), or None on the CPU."""
    return gpus[(index - 1) % len(gpus)] if gpus else None


def bind_worker(index, workers, cores):
    """Bind this process, model worker INDEX of WORKERS, to its device before CUDA starts: its GPU (the only one it
    then sees) or, on the CPU, its share of the cores: the setting cpu_threads of this process, unless
    CIFAR100_CPU_THREADS set it (the backends read it from there). Returns what it got."""
    gpus = visible_gpus()
    gpu = device_for_worker(index, gpus)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        return {"gpu": gpu, "device": "cuda:0"}
    own = settings.get()
    if own.cpu_threads is None:
        own.cpu_threads = max(1, cores // workers)
    return {"device": "cpu", "threads": own.cpu_threads}
