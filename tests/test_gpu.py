"""Paths that exist only on a GPU: each test skips, saying why, on a machine without one. bench/gpu_check.sh runs
them (with the other GPU tests: end_to_end.GPU_TESTS) on the lent GPU machine."""
import gc
import weakref

import numpy as np
import pytest
import torch

from serving.backends import OnnxBackend, TorchBackend, cuda_provider, load_backend
from serving.tensorrt import unavailable_reason
from training.checkpoint import load_classifier
from training.models import TTA

NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytestmark = NO_GPU
FP16 = 0.05   # the served GPU backends compute in fp16: logits within this of eager fp32 on the CPU


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)


def expected(model_dir, images, tta="none"):
    model, _ = load_classifier(model_dir / "checkpoint.pt")
    with torch.inference_mode():
        return TTA[tta](model)(torch.from_numpy(images)).numpy()


def test_two_compiled_backends_in_one_process_both_serve_compiled(model_dir, images):
    """torch before 2.13 kept CUDA graph trees' state in the thread that imported them: the second backend's model
    thread failed its compiled warm-up and served eager without a word but describe()'s compile_error."""
    backends = [TorchBackend(model_dir, "cuda", compile=True, tta=tta) for tta in ("none", "flip")]
    for backend in backends:
        described = backend.describe()
        assert backend.precision == "fp16+compile" and "compile_error" not in described, described
        assert sorted(backend.warmup_seconds) == backend.buckets
        np.testing.assert_allclose(backend(images), expected(model_dir, images, backend.tta), atol=FP16, rtol=FP16)


def test_a_numbered_gpu(model_dir, images):
    """An explicit cuda:N reaches the model, its buffers and its thread."""
    backend = TorchBackend(model_dir, "cuda:0", compile=False)
    assert backend.device == "cuda:0" and backend.precision == "fp16"
    np.testing.assert_allclose(backend(images), expected(model_dir, images), atol=FP16, rtol=FP16)
    assert backend.calls.submit(torch.cuda.current_device).result() == 0


def test_a_backend_let_go_is_freed(model_dir):
    """Its model thread must not keep it (and its GPU memory) alive: `auto` drops the candidates it does not choose."""
    backend = TorchBackend(model_dir, "cuda", compile=False)
    backend(np.zeros((3, 32, 32, 3), np.uint8))
    freed = weakref.ref(backend)
    del backend
    gc.collect()
    assert freed() is None


def test_auto_on_a_gpu_says_what_it_timed_and_left_out(model_dir):
    backend = load_backend("auto", model_dir)
    auto = backend.auto
    assert backend.device.startswith("cuda") and auto["batch"] == 256 and "torch" in auto["img_per_s"]
    assert set(auto["img_per_s"]) | set(auto["left_out"]) == {"torch", "onnx", "tensorrt"}


def ort_cuda_reason(model_dir):
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (the CPU build)"
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=[cuda_provider("cuda")])
    return None if session.get_providers()[0] == "CUDAExecutionProvider" else "its CUDA provider does not start"


def test_onnx_runtime_cuda_with_the_service_options(model_dir, images):
    if reason := ort_cuda_reason(model_dir):
        pytest.skip(f"ONNX Runtime on CUDA: {reason}")
    backend = OnnxBackend(model_dir, "cuda:0")
    options = backend.session.get_provider_options()["CUDAExecutionProvider"]
    assert (options["device_id"], options["cudnn_conv_algo_search"]) == ("0", "HEURISTIC")
    assert backend.device == "cuda:0"
    for n in (1, 37, 300):   # new batch sizes, as the batcher makes them
        np.testing.assert_allclose(backend(images[:n]), expected(model_dir, images[:n]), atol=FP16, rtol=FP16)


@pytest.mark.skipif(unavailable_reason() is not None, reason=f"TensorRT: {unavailable_reason()}")
def test_tensorrt_on_a_numbered_gpu_with_the_service_profile(tmp_path, images):
    from export.onnx import export_checkpoint
    from export.tensorrt import build_engine, tensorrt_major
    from serving.tensorrt import TensorRTRunner
    from training.checkpoint import save_random_checkpoint, sha256

    checkpoint = save_random_checkpoint(tmp_path / "part1.pt", "part1")
    model, ckpt = load_classifier(checkpoint)
    written = export_checkpoint(model, ckpt, sha256(checkpoint), tmp_path, fp16=True, sizes=(1,))
    engine = build_engine(written["fp16" if tensorrt_major() >= 11 else "fp32"], tmp_path / "part1.engine")
    assert (engine.info["min_batch"], engine.info["opt_batch"], engine.info["max_batch"]) == (1, 256, 256)
    runner = TensorRTRunner(engine.path, "cuda:0")
    assert (runner.device.index, runner.max_batch) == (0, 256)
    with torch.inference_mode():
        reference = model(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(runner(images), reference, atol=FP16, rtol=FP16)   # 300: two engine calls


def test_the_batch_size_finder_backs_off_when_memory_runs_out():
    """Its out-of-memory loop, against a limit this process sets itself (2 GiB above what it holds): the rest of the
    card stays free for whatever runs beside it."""
    from training.models import build_classifier
    from training.recipes import Part1
    from training.train import find_batch_size

    device = torch.device("cuda")
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved(device) + 2 * 2**30) / total, device)
    try:
        model = build_classifier(Part1(), pretrained=False).to(device)
        size = find_batch_size(model, device, cap=2**20)
        assert 1 < size < 2**20 and size & (size - 1) == 0   # backed off, to a power of two
        images = torch.randint(0, 256, (size, 32, 32, 3), dtype=torch.uint8, device=device)
        model.eval()   # as the finder probes
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(images).float().sum().backward()   # and that size fits
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
