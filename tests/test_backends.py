"""The backends of serving/backends.py against the PyTorch model they were exported from (CPU here; the paths that
exist only on a GPU are in test_gpu.py)."""
import concurrent.futures
import json

import numpy as np
import pytest
import torch

import serving.backends
from serving import settings
from serving.backends import (BackendError, OnnxBackend, TorchBackend, cpu_threads, cuda_provider, engine_mismatch,
                              load_backend, own_cudagraph_trees)
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


@pytest.fixture(scope="module")
def with_int8(model_dir, tmp_path_factory):
    """make(sidecar) -> a copy of the model's entry with model.int8.onnx (quantized here, calibrated on random
    images) and, unless None, SIDECAR as model.int8.onnx.json."""
    from export.int8 import quantize
    from training.contract import random_images

    int8_file = tmp_path_factory.mktemp("int8") / "model.int8.onnx"
    quantize(model_dir / "model.onnx", int8_file, random_images(64, seed=3))

    def make(sidecar, name="entry"):
        entry = tmp_path_factory.mktemp(name)
        for f in model_dir.iterdir():
            (entry / f.name).symlink_to(f)
        (entry / "model.int8.onnx").symlink_to(int8_file)
        if sidecar is not None:
            (entry / "model.int8.onnx.json").write_text(json.dumps(sidecar))
        return entry
    return make


def passed(faster):
    return {"precision": "int8", "check": {"passed": True, "speed": {"faster": faster}}}


@pytest.fixture
def environ(monkeypatch):
    """Settings read afresh after the test sets a variable."""
    monkeypatch.delenv("CIFAR100_ONNX_PRECISION", raising=False)
    settings.get.cache_clear()
    yield monkeypatch
    settings.get.cache_clear()


def test_onnx_serves_int8_on_the_cpu_when_export_found_it_faithful_and_faster(with_int8, images, reference, environ):
    backend = load_backend("onnx", with_int8(passed(faster=True)))
    assert (backend.device, backend.precision, backend.describe()["precision"]) == ("cpu", "int8", "int8")
    assert "model.int8.onnx" in backend.session._model_path
    logits = backend(images)
    assert logits.dtype == np.float32 and logits.shape == (37, 100)
    assert (logits.argmax(1) == reference.argmax(1)).mean() >= 0.9   # random weights and calibration: near-ties
    assert 0 < np.abs(logits - reference).max() < 0.1 * np.abs(reference).max()   # int8 indeed, and close
    auto = load_backend("auto", with_int8(passed(faster=True)))   # auto weighs the ONNX backend as it serves
    assert auto.auto["img_per_s"].keys() == {"torch", "onnx"}
    assert auto.name == "torch" or auto.precision == "int8"


@pytest.mark.parametrize("sidecar", [None, passed(faster=False),
                                     {"check": {"passed": False, "speed": {"faster": True}}}])
def test_onnx_serves_fp32_unless_int8_passed_and_was_faster(with_int8, images, reference, environ, sidecar):
    backend = load_backend("onnx", with_int8(sidecar))
    assert backend.precision == "fp32"
    np.testing.assert_allclose(backend(images), reference, atol=1e-4, rtol=1e-4)


def test_the_onnx_precision_setting_chooses_the_file(with_int8, model_dir, environ):
    entry = with_int8(passed(faster=True))
    environ.setenv("CIFAR100_ONNX_PRECISION", "fp32")
    settings.get.cache_clear()
    assert load_backend("onnx", entry).precision == "fp32"
    environ.setenv("CIFAR100_ONNX_PRECISION", "int8")
    settings.get.cache_clear()
    assert load_backend("onnx", with_int8(passed(faster=False))).precision == "int8"   # asked for: served
    with pytest.raises(BackendError, match=r"no model.int8.onnx in .* for CIFAR100_ONNX_PRECISION=int8: export it"):
        load_backend("onnx", model_dir)


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


def test_onnx_runtime_cuda_provider_options():
    """The GPU named, and cuDNN's heuristic rather than its exhaustive search on every new batch size."""
    assert cuda_provider("cuda") == ("CUDAExecutionProvider", {"device_id": 0, "cudnn_conv_algo_search": "HEURISTIC"})
    assert cuda_provider("cuda:3")[1]["device_id"] == 3


def cuda_provider_starts(model_dir):
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=[cuda_provider("cuda")])
    return session.get_providers()[0] == "CUDAExecutionProvider"


def test_onnx_does_not_run_on_the_cpu_when_a_gpu_was_named(model_dir, tmp_path, monkeypatch):
    """onnxruntime-gpu lists its CUDA provider whenever it is installed, also where the CUDA libraries do not load
    (this machine): the session would quietly run on the CPU, with the fp16 graph."""
    if cuda_provider_starts(model_dir):
        pytest.skip("ONNX Runtime's CUDA provider works here: test_gpu.py covers it")
    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / "model.onnx").symlink_to(model_dir / "model.onnx")
    (entry / "model.fp16.onnx").symlink_to(model_dir / "model.onnx")   # stands in for the fp16 file
    for device in ("cuda", "cuda:1"):   # named, as `auto` names it: refused, so auto leaves ONNX Runtime out
        with pytest.raises(BackendError, match="CUDA provider did not start|no CUDAExecutionProvider"):
            load_backend("onnx", entry, device)
    # On a GPU machine without a device named, the same failure serves model.onnx on the CPU.
    monkeypatch.setattr(serving.backends, "cuda_available", lambda: True)
    backend = OnnxBackend(entry)
    assert (backend.device, backend.precision) == ("cpu", "fp32")
    assert backend.session.get_providers() == ["CPUExecutionProvider"]
    options = backend.session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (cpu_threads(), 1)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_tensorrt_needs_a_gpu(model_dir):
    assert engine_mismatch(model_dir, "cuda:1") == "no TensorRT engine in the model"


def test_every_model_thread_gets_cuda_graph_trees_of_its_own():
    """torch before 2.13 keeps CUDA graph trees' state in the thread that imported them; a compiled call from another
    thread (a second backend's model thread) failed and that backend served eager."""
    from torch._inductor import cudagraph_trees as trees

    def containers():
        own_cudagraph_trees(torch)
        return id(trees.get_obj(trees.local, "tree_manager_containers"))
    mine = containers()
    with concurrent.futures.ThreadPoolExecutor(1) as a, concurrent.futures.ThreadPoolExecutor(1) as b:
        theirs = {a.submit(containers).result(), b.submit(containers).result()}
        assert a.submit(containers).result() in theirs   # a thread that has them keeps them
    assert len(theirs) == 2 and mine not in theirs and containers() == mine
