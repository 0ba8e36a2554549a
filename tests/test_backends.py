"""The backends of serving/backends.py against the PyTorch model they were exported from (CPU here)."""
import numpy as np
import pytest
import torch

from serving.backends import BackendError, load_backend
from training.checkpoint import load_classifier


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (37, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def reference(model_dir, images):
    model, _ = load_classifier(model_dir / "checkpoint.pt")
    with torch.inference_mode():
        return model(torch.from_numpy(images)).numpy()


@pytest.mark.parametrize("kind, name, precision", [("torch", "torch", "fp32"), ("onnx", "onnx", "fp32"),
                                                    ("auto", "onnx", "fp32")])
def test_backend_matches_pytorch(model_dir, images, reference, kind, name, precision):
    backend = load_backend(kind, model_dir)
    assert (backend.name, backend.device, backend.precision) == (name, "cpu", precision)
    logits = backend(images)
    assert logits.dtype == np.float32 and logits.shape == (37, 100)
    np.testing.assert_allclose(logits, reference, atol=1e-4, rtol=1e-4)
    assert (logits.argmax(1) == reference.argmax(1)).all()


def test_large_inputs_are_chunked(model_dir, images, reference):
    backend = load_backend("onnx", model_dir)
    backend.max_batch = 8  # as a TensorRT engine's profile would limit it
    np.testing.assert_allclose(backend(images), reference, atol=1e-4, rtol=1e-4)


def test_auto_falls_back_to_torch_without_onnx(model_dir, tmp_path):
    (tmp_path / "checkpoint.pt").symlink_to(model_dir / "checkpoint.pt")
    assert load_backend("auto", tmp_path).name == "torch"
    with pytest.raises(BackendError, match="no model.onnx"):
        load_backend("onnx", tmp_path)


def test_tensorrt_unavailable_says_why(model_dir):
    with pytest.raises(BackendError, match="TensorRT backend unavailable: no TensorRT engine"):
        load_backend("tensorrt", model_dir)


def test_bad_kind_and_bad_input(model_dir):
    with pytest.raises(BackendError, match="unknown backend 'jax'"):
        load_backend("jax", model_dir)
    backend = load_backend("onnx", model_dir)
    with pytest.raises(BackendError, match="expected uint8 N×32×32×3"):
        backend(np.zeros((2, 32, 32, 3), np.float32))
