"""The backends of serving/backends.py against the PyTorch model they were exported from (CPU here)."""
import numpy as np
import pytest
import torch

from serving.backends import BackendError, TorchBackend, load_backend
from training.checkpoint import load_classifier


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (37, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def reference(model_dir, images):
    model, _ = load_classifier(model_dir / "checkpoint.pt")
    with torch.inference_mode():
        return model(torch.from_numpy(images)).numpy()


@pytest.mark.parametrize("kind", ["torch", "onnx", "auto"])
def test_backend_matches_pytorch(model_dir, images, reference, kind):
    backend = load_backend(kind, model_dir)
    assert (backend.device, backend.precision) == ("cpu", "fp32")
    assert backend.name == kind or kind == "auto"
    logits = backend(images)
    assert logits.dtype == np.float32 and logits.shape == (37, 100)
    np.testing.assert_allclose(logits, reference, atol=1e-4, rtol=1e-4)
    assert (logits.argmax(1) == reference.argmax(1)).all()


def test_large_inputs_are_chunked(model_dir, images, reference):
    backend = load_backend("onnx", model_dir)
    backend.max_batch = 8  # as a TensorRT engine's profile would limit it
    np.testing.assert_allclose(backend(images), reference, atol=1e-4, rtol=1e-4)


def test_auto_serves_the_fastest_it_measured(model_dir):
    backend = load_backend("auto", model_dir)
    speed = backend.auto["img_per_s"]
    assert set(speed) == {"torch", "onnx"} and min(speed.values()) > 0
    assert backend.name == max(speed, key=speed.get)
    assert backend.auto["left_out"] == {"tensorrt": "no TensorRT engine in the model"}
    assert backend.describe()["auto"] == backend.auto


def test_auto_falls_back_to_torch_without_onnx(model_dir, tmp_path):
    (tmp_path / "checkpoint.pt").symlink_to(model_dir / "checkpoint.pt")
    backend = load_backend("auto", tmp_path)
    assert backend.name == "torch" and "no model.onnx" in backend.auto["left_out"]["onnx"]
    with pytest.raises(BackendError, match="no model.onnx"):
        load_backend("onnx", tmp_path)


def test_auto_without_any_model_file_says_why(tmp_path):
    with pytest.raises(BackendError, match="no backend can serve .*onnx: no model.onnx"):
        load_backend("auto", tmp_path)


def test_tensorrt_unavailable_says_why(model_dir):
    with pytest.raises(BackendError, match="TensorRT backend unavailable: no TensorRT engine"):
        load_backend("tensorrt", model_dir)


def test_bad_kind_and_bad_input(model_dir):
    with pytest.raises(BackendError, match="unknown backend 'jax'"):
        load_backend("jax", model_dir)
    backend = load_backend("onnx", model_dir)
    with pytest.raises(BackendError, match="expected an array of uint8 N×32×32×3"):
        backend(np.zeros((2, 32, 32, 3), np.float32))


NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned memory, CUDA graphs, fp16)")


@pytest.mark.parametrize("device, compile", [("cpu", True), ("cpu", False), pytest.param("cuda", True, marks=NO_GPU)],
                         ids=["cpu-compiled", "cpu-eager", "cuda-compiled"])
def test_torch_gpu_call_path(model_dir, reference, images, device, compile):
    """How a GPU is served (one thread, buffers, chunks, padded buckets, torch.compile with a dynamic batch
    dimension); the CPU runs the same path, without pinned memory and CUDA graphs."""
    import concurrent.futures
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    if device == "cuda":
        backend = load_backend("torch", model_dir)   # as served: compiled and warmed up at load
        assert backend.precision == "fp16+compile", backend.describe()
    else:
        backend = TorchBackend(model_dir, device="cpu")
        backend.prepare_calls(compile)
    graphs = counters["stats"]["unique_graphs"]
    if compile:
        assert backend.chunk == 256 and sorted(backend.warmup_seconds) == backend.buckets, backend.describe()
        assert 1 <= graphs - before <= 2, f"{graphs - before} graphs compiled for {len(backend.buckets)} buckets"
    odd = np.concatenate([images] * 50)[:1500]
    expected = np.concatenate([reference] * 50)[:1500]
    sizes = [1, 3, 37, 255, 257, 1500]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:   # as BentoML calls it: from several threads
        outputs = list(pool.map(lambda n: backend(odd[:n]), sizes))
    assert counters["stats"]["unique_graphs"] == graphs, "a call after warm-up compiled again"
    tolerance = 0.05 if device == "cuda" else 1e-4   # fp16 on the GPU
    for n, logits in zip(sizes, outputs):
        np.testing.assert_allclose(logits, expected[:n], atol=tolerance, rtol=tolerance)
    assert backend.capacity == -(-1500 // backend.chunk) * backend.chunk


def test_torch_compile_failure_serves_the_eager_model(model_dir, reference, images, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no working C++ compiler")
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: broken)
    backend = TorchBackend(model_dir, device="cpu")
    backend.prepare_calls(compile=True)
    assert backend.buckets is None and not torch.backends.cudnn.benchmark
    assert backend.describe()["compile_error"] == "RuntimeError: no working C++ compiler"
    np.testing.assert_allclose(backend(images), reference, atol=1e-4, rtol=1e-4)
