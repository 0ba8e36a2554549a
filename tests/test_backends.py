"""The backends of serving/backends.py against the PyTorch model they were exported from (CPU here)."""
from types import SimpleNamespace

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
    with pytest.raises(BackendError, match="expected uint8 N×32×32×3"):
        backend(np.zeros((2, 32, 32, 3), np.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled CUDA path of the torch backend needs a CUDA GPU")
def test_torch_on_a_gpu_compiles_a_few_graphs_at_load_and_none_after(model_dir, reference, images):
    import concurrent.futures
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    backend = load_backend("torch", model_dir)
    assert backend.precision == "fp16+compile" and backend.chunk == 256, backend.describe()
    assert sorted(backend.describe()["warmup_seconds"]) == backend.buckets
    graphs = counters["stats"]["unique_graphs"]
    assert graphs - before <= 3, f"{graphs - before} graphs compiled for {len(backend.buckets)} buckets"
    odd = np.concatenate([images] * 20)[:700]   # 256 + 256 + 188 (padded to 256): chunks and padding
    with concurrent.futures.ThreadPoolExecutor(4) as pool:   # as BentoML calls it: from several threads
        outputs = list(pool.map(lambda n: backend(odd[:n]), [1, 3, 37, 129, 700]))
    assert counters["stats"]["unique_graphs"] == graphs, "a call after warm-up compiled again"
    expected = np.concatenate([reference] * 20)[:700]
    for logits in outputs:   # fp16 against the fp32 reference
        np.testing.assert_allclose(logits, expected[:len(logits)], atol=0.05, rtol=0.05)


@pytest.mark.parametrize("buckets, chunk", [(TorchBackend.BUCKETS, 256), (None, 1024)], ids=["compiled", "eager"])
def test_torch_gpu_call_path_chunks_and_pads_right(model_dir, monkeypatch, buckets, chunk):
    """The GPU call path (buffers, chunks, padded buckets) on the CPU: only pinning and the stream wait,
    which need CUDA, are stubbed; the model is the eager one (a CUDA test above covers the compiled one)."""
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(synchronize=lambda: None))
    backend = TorchBackend(model_dir, device="cpu")
    backend.buckets, backend.chunk, backend.capacity = buckets, chunk, 0
    for n in (1, 3, 255, 257, 1500):
        images = np.random.default_rng(n).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        with torch.inference_mode():
            expected = backend.model(torch.from_numpy(images)).numpy()
        np.testing.assert_allclose(backend.run_on_gpu(images), expected, atol=1e-5)
    assert backend.capacity == -(-1500 // chunk) * chunk
