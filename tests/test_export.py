"""Export layer: ONNX (FP32 + FP16 + INT8) with preprocessing inside, TensorRT, BentoML model store, CLI.

Models are random-weight: the Part 1 CNN at 32 px, and ResNet-50 (Part 3, weights none) at 64 px so
the graph keeps its Resize node but runs quickly on a CPU (its parity check uses batches 1 and 7).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.bento import find_artifacts
from export.onnx import (Artifact, ExportError, allowed_flips, compare, export_checkpoint, ort_session, random_batches,
                         read_metadata, verify)
from serving.tensorrt import unavailable_reason
from training.checkpoint import load_checkpoint, load_classifier, save_random_checkpoint, sha256
from training.models import build_classifier
from training.recipes import Part1
from training.synthetic import CLASSES, write_corrupted, write_dataset

REPO = Path(__file__).resolve().parents[1]
TRT_SKIP = unavailable_reason()
METRICS = {"epoch": 3, "val_acc": 0.41, "val_loss": 2.5, "test_acc": 0.4}   # made up: does provenance flow?


def make_checkpoint(path, part, seed=0, **overrides):
    return save_random_checkpoint(path, part, seed, metrics=METRICS, **overrides)


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "export", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


class Exported:
    def __init__(self, root, part, sizes, **overrides):
        self.checkpoint = make_checkpoint(root / f"{part}.pt", part, **overrides)
        self.model, self.ckpt = load_classifier(self.checkpoint)
        self.out = root / "artifacts"
        self.written = export_checkpoint(self.model, self.ckpt, sha256(self.checkpoint), self.out, fp16=True, sizes=sizes)
        self.fp32, self.fp16 = self.written["fp32"].path, self.written["fp16"].path
        self.fp32_report, self.fp16_report = (self.written[p].info["parity"] for p in ("fp32", "fp16"))


@pytest.fixture(scope="session")
def part1(tmp_path_factory):
    return Exported(tmp_path_factory.mktemp("part1"), "part1", sizes=(1, 7, 64))


@pytest.fixture(scope="session")
def resnet50(tmp_path_factory):
    return Exported(tmp_path_factory.mktemp("part3"), "part3", sizes=(1, 7), resolution=64)


def logits(model, images):
    with torch.inference_mode():
        return model(torch.from_numpy(images)).numpy()


# --- ONNX graph ------------------------------------------------------------------------------------

def io_signature(path):
    graph = onnx.load(str(path)).graph

    def describe(value):
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        return value.name, value.type.tensor_type.elem_type, dims

    return [describe(v) for v in graph.input], [describe(v) for v in graph.output]


@pytest.mark.parametrize("which", ["part1", "resnet50"])
def test_onnx_files_follow_the_contract(which, request):
    exported = request.getfixturevalue(which)
    assert exported.fp32.name == f"{exported.ckpt['recipe']['name']}.onnx"
    assert exported.fp16.name == f"{exported.ckpt['recipe']['name']}.fp16.onnx"
    for path in (exported.fp32, exported.fp16):
        inputs, outputs = io_signature(path)
        assert len(inputs) == 1 and len(outputs) == 1
        (in_name, in_type, in_dims), (out_name, out_type, out_dims) = inputs[0], outputs[0]
        assert (in_name, in_type, in_dims[1:]) == ("images", onnx.TensorProto.UINT8, [32, 32, 3])
        assert (out_name, out_type, out_dims[1:]) == ("logits", onnx.TensorProto.FLOAT, [100])
        assert isinstance(in_dims[0], str) and in_dims[0] == out_dims[0]  # one symbolic batch dimension
        files = [exported.fp32.name, exported.fp16.name]   # and their sidecars, nothing else
        assert sorted(os.listdir(path.parent)) == sorted(files + [f + ".json" for f in files])
    model = onnx.load(str(exported.fp32))
    weights = sum(p.numel() for p in exported.model.parameters())
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert exported.fp32.stat().st_size > 4 * weights  # FP32 weights are inside the file
    half = onnx.load(str(exported.fp16))
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    types = {t.data_type for t in half.graph.initializer if t.data_type in floats and len(t.dims) > 1}
    assert types == {onnx.TensorProto.FLOAT16}  # conv / linear weights
    assert exported.fp16.stat().st_size < 0.6 * exported.fp32.stat().st_size
    # Preprocessing is in the graph: a cast straight off the uint8 input (what TensorRT needs) and,
    # when the recipe runs at another resolution, the resize.
    ops = [n.op_type for n in model.graph.node]
    first = next(n for n in model.graph.node if "images" in n.input)
    assert first.op_type == "Cast"
    assert ("Resize" in ops) == (exported.ckpt["recipe"]["resolution"] != 32)


def test_onnx_batch_dimension_is_dynamic(part1):
    session = ort_session(part1.fp32, "cpu")
    for n in (2, 3, 130):
        images = random_batches((n,), seed=n)[0]
        out = session.run(None, {"images": images})[0]
        assert out.shape == (n, 100) and out.dtype == np.float32
        np.testing.assert_allclose(out, logits(part1.model, images), atol=1e-3)


# --- parity ---------------------------------------------------------------------------------------

def test_part1_fp32_parity_at_batches_1_7_64(part1):
    session = ort_session(part1.fp32, "cpu")
    worst = 0.0
    for images in random_batches((1, 7, 64)):
        expected, got = logits(part1.model, images), session.run(None, {"images": images})[0]
        worst = max(worst, float(np.abs(expected - got).max()))
        assert (expected.argmax(1) == got.argmax(1)).all()
    assert worst <= 1e-3
    print(f"Part 1 FP32 ONNX vs PyTorch: max |Δlogit| {worst:.2e}")
    # The export's own check saw the same numbers.
    assert part1.fp32_report["sizes"] == [1, 7, 64]
    assert part1.fp32_report["max_abs_diff"] == pytest.approx(worst, abs=1e-6)
    assert part1.fp32_report["top1_agreement"] == 1.0


def test_resnet50_fp32_parity(resnet50):
    # ResNet-50 parity on batches 1 and 7 only (CPU time); Part 1 covers 1/7/64.
    report = resnet50.fp32_report
    assert report["sizes"] == [1, 7] and report["top1_agreement"] == 1.0
    assert report["max_abs_diff"] <= 1e-3
    images = random_batches((7,), seed=5)[0]
    got = ort_session(resnet50.fp32, "cpu").run(None, {"images": images})[0]
    assert np.abs(got - logits(resnet50.model, images)).max() <= 1e-3


@pytest.mark.parametrize("which", ["part1", "resnet50"])
def test_fp16_agrees_with_pytorch(which, request):
    exported = request.getfixturevalue(which)
    sizes = exported.fp16_report["sizes"]
    assert exported.fp16_report["top1_agreement"] >= 0.99
    fp16, fp32 = ort_session(exported.fp16, "cpu"), ort_session(exported.fp32, "cpu")
    images = np.concatenate(random_batches(sizes, seed=9))
    expected = logits(exported.model, images)
    half, full = fp16.run(None, {"images": images})[0], fp32.run(None, {"images": images})[0]
    assert half.dtype == np.float32
    assert (half.argmax(1) == expected.argmax(1)).mean() >= 0.99
    # It really computes in half precision: further from PyTorch than FP32, though not by much.
    assert np.abs(half - expected).max() > 10 * np.abs(full - expected).max()
    assert np.abs(half - expected).max() < 0.05 * np.abs(expected).max()


def test_reduced_precision_may_flip_one_percent_of_near_ties_and_at_least_one():
    assert [allowed_flips(n) for n in (7, 72, 99, 100, 512)] == [1, 1, 1, 1, 5]
    reference = np.eye(4, dtype=np.float32)
    assert compare(reference, reference[[0, 1, 3, 2]]) == {
        "images": 4, "max_abs_diff": 1.0, "top1_agreement": 0.5, "top1_flips": 2}


def test_verification_fails_for_a_different_model(part1):
    torch.manual_seed(1)
    other = build_classifier(Part1(), pretrained=False).eval()
    with pytest.raises(ExportError, match=r"max \|Δlogit\|"):
        verify(part1.fp32, other, "fp32")


# --- metadata ------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["part1", "resnet50"])
def test_metadata_round_trip(which, request):
    exported = request.getfixturevalue(which)
    for path, precision in ((exported.fp32, "fp32"), (exported.fp16, "fp16")):
        meta = read_metadata(path)
        sidecar = Artifact.load(path).info
        assert sidecar == {**meta, "parity": sidecar["parity"]} and sidecar["parity"]["provider"] == "CPUExecutionProvider"
        assert meta["classes"] == CLASSES
        assert meta["part"] == exported.ckpt["recipe"]["name"] and meta["arch"] == exported.ckpt["recipe"]["arch"]
        assert meta["recipe"] == exported.ckpt["recipe"]
        assert meta["resolution"] == str(exported.ckpt["recipe"]["resolution"])
        assert meta["checkpoint_sha256"] == sha256(exported.checkpoint)
        assert float(meta["test_acc"]) == 0.4 and float(meta["val_acc"]) == 0.41
        assert meta["precision"] == precision


# --- flip test-time augmentation ----------------------------------------------------------------------------

def test_flip_tta_inside_the_exported_model_and_the_torch_backend(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "best.pt", "part1", seed=5)
    env = {"BENTOML_HOME": str(tmp_path / "bentoml")}
    result = run_cli("all", "--checkpoint", checkpoint, "--out", tmp_path / "artifacts", "--tta", "flip", env=env)
    assert result.returncode == 0, result.stderr
    model, _ = load_classifier(checkpoint)
    images = random_batches((13,), seed=7)[0]
    expected = (logits(model, images) + logits(model, images[:, :, ::-1].copy())) / 2   # image and mirror
    assert not np.allclose(expected, logits(model, images), atol=1e-3)
    for name, tolerance in (("part1.onnx", 1e-4), ("part1.fp16.onnx", 0.05)):
        got = ort_session(tmp_path / "artifacts" / name, "cpu").run(None, {"images": images})[0]
        np.testing.assert_allclose(got, expected, atol=tolerance, rtol=tolerance)
        assert Artifact.load(tmp_path / "artifacts" / name).info["tta"] == "flip"
    (entry,) = (tmp_path / "bentoml" / "models" / "cifar100-classifier").glob("*/model.yaml")
    from serving.backends import load_backend, stored_metadata
    assert stored_metadata(entry.parent)["tta"] == "flip"
    torch_backend = load_backend("torch", entry.parent)   # the checkpoint, wrapped as the graphs are
    assert torch_backend.describe()["tta"] == "flip"
    np.testing.assert_allclose(torch_backend(images), expected, atol=1e-5, rtol=1e-5)


# --- command line ------------------------------------------------------------------------------

def test_cli_refuses_missing_and_corrupt_checkpoints(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02 definitely not a checkpoint")
    for checkpoint, message in ((tmp_path / "missing.pt", "no checkpoint at"), (corrupt, "not a readable checkpoint")):
        result = run_cli("onnx", "--checkpoint", checkpoint, "--out", tmp_path / "out")
        assert result.returncode == 1
        assert result.stderr.startswith("error: ") and message in result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


@pytest.mark.skipif(TRT_SKIP is None, reason="TensorRT and a GPU are present: the refusal path does not apply")
def test_cli_tensorrt_says_why_it_cannot_build(part1):
    result = run_cli("tensorrt", "--onnx", part1.fp16, "--out", part1.out)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: cannot build a TensorRT engine: {TRT_SKIP}"


def test_cli_all_exports_and_saves_to_the_bentoml_store(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "best.pt", "part1", seed=3)
    env = {"BENTOML_HOME": str(tmp_path / "bentoml")}  # the store lives in the tmp dir, not ~/bentoml
    write_dataset(tmp_path / "data", per_class=10)
    result = run_cli("all", "--checkpoint", checkpoint, "--out", tmp_path / "artifacts", "--opt-batch", "16",
                     "--max-batch", "64", "--int8", "--data-dir", tmp_path / "data", "--calib-images", "32", env=env)
    assert result.returncode == 0, result.stderr
    assert "part1.onnx (fp32" in result.stderr and "part1.fp16.onnx (fp16" in result.stderr
    assert "calibrated on 32 training images" in result.stderr and "wrote " in result.stderr
    if TRT_SKIP:
        assert f"skipping TensorRT: {TRT_SKIP}" in result.stderr
    read_back = subprocess.run([sys.executable, "-c", (
        "import bentoml, json, os\n"
        "m = bentoml.models.get('cifar100-classifier:latest')\n"
        "print(json.dumps({'path': m.path, 'labels': m.info.labels, 'metadata': m.info.metadata,"
        " 'files': sorted(os.listdir(m.path))}))")], capture_output=True, text=True, timeout=120,
        env={**os.environ, **env})
    assert read_back.returncode == 0, read_back.stderr
    stored = json.loads(read_back.stdout.strip().splitlines()[-1])
    meta = stored["metadata"]
    expected_files = ["checkpoint.pt", "model.fp16.onnx", "model.int8.onnx", "model.int8.onnx.json", "model.onnx"]
    expected_files += [] if TRT_SKIP else ["model.engine", "model.engine.json"]
    assert meta["artifacts"] == sorted(expected_files)
    assert stored["files"] == sorted(expected_files + ["model.yaml"])
    assert stored["path"].startswith(str(tmp_path / "bentoml"))
    assert (meta["part"], meta["arch"], meta["resolution"]) == ("part1", "simple_cnn", 32)
    assert meta["classes"] == CLASSES and meta["test_acc"] == 0.4
    assert meta["input"] == "uint8 N×32×32×3 (NHWC, RGB)" and meta["output"] == "float32 logits N×100"
    assert meta["checkpoint_sha256"] == sha256(checkpoint) == sha256(Path(stored["path"]) / "checkpoint.pt")
    assert sha256(Path(stored["path"]) / "model.onnx") == sha256(tmp_path / "artifacts" / "part1.onnx")
    assert stored["labels"] == {"part": "part1", "arch": "simple_cnn"}


def test_bento_refuses_artifacts_of_another_checkpoint(part1, tmp_path):
    found = find_artifacts(part1.out, "part1", sha256(part1.checkpoint))
    assert [a.path for a in found] == [part1.fp32, part1.fp16] and found[1].info == part1.written["fp16"].info
    with pytest.raises(ExportError, match="exported from another checkpoint"):
        find_artifacts(part1.out, "part1", "0" * 64)
    with pytest.raises(ExportError, match="run `python -m export onnx` first"):
        find_artifacts(tmp_path, "part1", sha256(part1.checkpoint))
    (tmp_path / "part1.onnx").write_bytes(part1.fp32.read_bytes())   # exported by an older version: no sidecar
    with pytest.raises(ExportError, match="no part1.onnx.json next to .*export it again"):
        find_artifacts(tmp_path, "part1", sha256(part1.checkpoint))


def test_the_store_step_reads_sidecars_not_onnx_files(part1, tmp_path, monkeypatch):
    from export.__main__ import parse_args, run

    def no_parsing(*args, **kwargs):
        raise AssertionError("an ONNX file was parsed again")
    monkeypatch.setattr(onnx, "load", no_parsing)
    monkeypatch.setattr(onnx, "load_model", no_parsing)
    calls = []
    monkeypatch.setattr("export.bento.save_to_store", lambda *args: calls.append(args))
    run(parse_args(["bento", "--checkpoint", str(part1.checkpoint), "--artifacts", str(part1.out)]))
    (checkpoint, ckpt, digest, artifacts, name), = calls
    assert digest == sha256(part1.checkpoint) and [a.path for a in artifacts] == [part1.fp32, part1.fp16]


def test_random_checkpoint_records_no_accuracy(tmp_path):
    result = run_cli("random", "--part", "part3", "--resolution", "64", "--out", tmp_path / "r.pt")
    assert result.returncode == 0, result.stderr
    ckpt = load_checkpoint(tmp_path / "r.pt")
    assert ckpt["recipe"]["name"] == "part3" and ckpt["recipe"]["weights"] == "none"
    assert ckpt["recipe"]["resolution"] == 64 and ckpt["metrics"] == {"epoch": 0}


def test_tensorrt_profile_is_tuned_for_the_chunks_the_service_sends():
    """The service calls an engine with chunks of GPU_CHUNK images and `auto` times it there: its optimisation
    profile is tuned for that size (it was 64)."""
    from export.__main__ import parse_args
    from export.tensorrt import profile_shapes
    from serving.backends import AUTO_BATCH, GPU_CHUNK, TorchBackend

    assert GPU_CHUNK == 256 == AUTO_BATCH[True] == TorchBackend.BUCKETS[-1]
    assert profile_shapes() == ((1, 32, 32, 3), (256, 32, 32, 3), (256, 32, 32, 3))
    for command in ("tensorrt --onnx x.onnx", "all"):
        args = parse_args(command.split())
        assert (args.min_batch, args.opt_batch, args.max_batch) == (1, 256, 256)
    import inspect

    import export
    for name in ("export_tensorrt", "export_all"):   # the package's functions, where they exist (issue 31)
        if hasattr(export, name):
            defaults = inspect.signature(getattr(export, name)).parameters
            assert (defaults["opt_batch"].default, defaults["max_batch"].default) == (256, 256), name
    assert profile_shapes(1, 16, 64)[1] == (16, 32, 32, 3)
    with pytest.raises(ExportError, match="need 1 <= min-batch <= opt-batch <= max-batch, got 1, 512, 256"):
        profile_shapes(1, 512, 256)


# --- INT8 ------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def int8(tmp_path_factory):
    """A random-weight Part 1 model's FP32 file, generated training data (10 images per class: the recipe's
    validation split holds 100) and the INT8 file calibrated on 64 of its training images."""
    from export.int8 import export_int8

    root = tmp_path_factory.mktemp("int8")
    write_dataset(root / "data", per_class=10)
    checkpoint = make_checkpoint(root / "part1.pt", "part1")
    model, ckpt = load_classifier(checkpoint)
    fp32 = export_checkpoint(model, ckpt, sha256(checkpoint), root / "artifacts", sizes=(1,))["fp32"]
    return fp32, export_int8(fp32, root / "data", calib_images=64), root / "data"


def test_int8_keeps_the_contract_and_quantizes_the_network_only(int8):
    fp32, quantized, _ = int8
    assert quantized.path.name == "part1.int8.onnx" and Artifact.sidecar(quantized.path).is_file()
    assert io_signature(quantized.path) == io_signature(fp32.path)   # uint8 N×32×32×3 in, float32 logits out
    graph = onnx.load(str(quantized.path)).graph
    made_by = {out: n for n in graph.node for out in n.output}
    # the preprocessing stays in float: cast, layout, normalisation, none of them fed by a DequantizeLinear
    preprocessing = [n for n in graph.node if n.name in quantized.info["quantization"]["float_nodes"]]
    assert [n.op_type for n in preprocessing] == ["Cast", "Transpose", "Mul", "Add"]
    assert preprocessing[0].input == ["images"]
    assert not [i for n in preprocessing for i in n.input if i in made_by and made_by[i].op_type == "DequantizeLinear"]
    # ... and the network's first layer reads its output through a Q/DQ pair
    conv = next(n for n in graph.node if n.op_type == "Conv")
    dq = made_by[conv.input[0]]
    assert dq.op_type == "DequantizeLinear" and made_by[dq.input[0]].input[0] == preprocessing[-1].output[0]
    init = {t.name: t for t in graph.initializer}
    weights = [init[n.input[0]] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in init
               and init[n.input[0]].data_type == onnx.TensorProto.INT8]
    assert len(weights) >= 5 and all(len(w.dims) in (1, 2, 4) for w in weights)   # 3 conv + 2 FC weights (+ biases)
    per_channel = [n for n in graph.node if n.op_type == "DequantizeLinear" and init.get(n.input[1]) is not None
                   and len(init[n.input[1]].dims) == 1 and init[n.input[1]].dims[0] > 1]
    assert per_channel, "per-channel weight scales"
    activations = {init[n.input[2]].data_type for n in graph.node if n.op_type == "QuantizeLinear"}
    assert activations == {onnx.TensorProto.UINT8}
    assert read_metadata(quantized.path)["precision"] == "int8"
    assert read_metadata(quantized.path)["checkpoint_sha256"] == fp32.info["checkpoint_sha256"]


def test_int8_sidecar_records_the_calibration_and_the_check(int8):
    fp32, quantized, data = int8
    info = json.loads(Artifact.sidecar(quantized.path).read_text())
    assert info["precision"] == "int8" and info["fp32"] == "part1.onnx"
    assert info["calibration"] == {"images": 64, "seed": 0, "source": str(data / "cifar-100-python"),
                                   "split": "training images of the recipe's training split"}
    check = info["check"]
    assert check["passed"] and check["images"] == 100 and check["top1_agreement"] >= 0.99
    assert abs(check["int8_accuracy"] - check["fp32_accuracy"]) <= 0.005
    assert check["speed"]["fp32_img_per_s"] > 0 and check["speed"]["int8_img_per_s"] > 0
    assert info["quantization"]["activations"] == "uint8" and info["quantization"]["format"] == "QDQ"
    # and ONNX Runtime reproduces FP32's classes on images it was not calibrated on
    images = random_batches((64,), seed=5)[0]
    expected = ort_session(fp32.path, "cpu").run(None, {"images": images})[0]
    got = ort_session(quantized.path, "cpu").run(None, {"images": images})[0]
    assert got.dtype == np.float32 and got.shape == (64, 100)
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.98


def test_int8_calibrates_and_checks_on_different_images(int8):
    from export.int8 import sample
    from training.data import load_cifar100, split_train_val

    fp32, _, data = int8
    calib, held_out, labels, _ = sample(data, fp32.info["recipe"], calib_images=64, check_images=1000)
    rows = lambda images: {image.tobytes() for image in images}   # noqa: E731 (generated images are all distinct)
    assert len(calib) == 64 and len(held_out) == 100 and not rows(calib) & rows(held_out)
    cifar = load_cifar100(data)
    _, val = split_train_val(len(cifar.train_labels), fp32.info["recipe"]["val_fraction"], fp32.info["recipe"]["seed"])
    assert rows(held_out) == rows(cifar.train_images[val]) and labels.tolist() == cifar.train_labels[val].tolist()
    again = sample(data, fp32.info["recipe"], calib_images=64, seed=0)[0]
    assert (again == calib).all() and not (sample(data, fp32.info["recipe"], 64, seed=1)[0] == calib).all()
    # Calibration on a Kaggle-style folder's images (here CIFAR-100-C's layout): the check stays on the held-out split.
    write_corrupted(data.parent / "ood", per_severity=2)
    from_folder, folder_held_out, _, source = sample(data, fp32.info["recipe"], 64, calib_dir=data.parent / "ood")
    folder_images = np.concatenate([np.load(f) for f in sorted((data.parent / "ood" / "CIFAR-100-C").glob("*.npy"))
                                    if f.name != "labels.npy"])
    assert len(from_folder) == 64 and rows(from_folder) <= rows(folder_images) and source == str(data.parent / "ood")
    assert (folder_held_out == held_out).all()
    with pytest.raises(ExportError, match=r"^INT8 calibration images: no OOD folder at .*nowhere$"):
        sample(data, fp32.info["recipe"], 64, calib_dir=data.parent / "nowhere")


def test_int8_that_does_not_reproduce_fp32_is_not_written(int8, tmp_path, monkeypatch):
    import export.int8
    from export.int8 import export_int8

    fp32, _, data = int8
    copy = Artifact(tmp_path / fp32.path.name, fp32.info)
    copy.path.write_bytes(fp32.path.read_bytes())
    monkeypatch.setattr(export.int8, "MIN_AGREEMENT", 1.01)   # a bound no file can meet
    with pytest.raises(ExportError, match=r"part1.int8.onnx does not reproduce the FP32 model and is not written: "
                                          r"its top-1 class agrees with FP32's on 100.00% of 100 held-out images "
                                          r"\(at least 101% needed\)"):
        export_int8(copy, data, calib_images=32)
    assert sorted(os.listdir(tmp_path)) == ["part1.onnx"]   # nothing, not even a temporary file


def test_cli_int8_without_training_data_says_so(int8, tmp_path):
    """A refused INT8 file is a warning of `all` (the other artifacts stand); missing training data is an error."""
    checkpoint = make_checkpoint(tmp_path / "best.pt", "part1")
    for args in (["int8", "--onnx", int8[0].path], ["all", "--checkpoint", checkpoint, "--out", tmp_path, "--int8"]):
        result = run_cli(*args, "--data-dir", tmp_path / "nothing", env={"BENTOML_HOME": str(tmp_path / "store")})
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("error: INT8 needs the training images to calibrate "
                                                                 "on: no CIFAR-100 at")
    assert not (tmp_path / "store").exists()   # nothing went into the model store


def test_tensorrt_refuses_uint8_activations(int8):
    """TensorRT takes signed int8 with zero point 0 only: the ONNX Runtime file is refused before any build."""
    from export.tensorrt import build_engine

    with pytest.raises(ExportError, match="part1.int8.onnx has uint8 activations .* export int8 --symmetric"):
        build_engine(int8[1], int8[1].path.with_suffix(".engine"))


# --- TensorRT (needs the tensorrt package and a CUDA GPU) ----------------------------------------

@pytest.mark.skipif(TRT_SKIP is not None, reason=f"TensorRT engine tests need TensorRT and a GPU: {TRT_SKIP}")
def test_tensorrt_int8_engine_from_the_symmetric_qdq_file(int8, tmp_path):
    from export.int8 import export_int8
    from export.tensorrt import build_engine

    fp32, _, data = int8
    symmetric = export_int8(fp32, data, calib_images=64, symmetric=True)
    assert symmetric.path.name == "part1.int8-symmetric.onnx"
    assert symmetric.info["quantization"]["activations"] == "int8, symmetric"
    engine = build_engine(symmetric, tmp_path / "part1.engine", min_batch=1, opt_batch=16, max_batch=64)
    assert engine.info["precision"] == "int8" and engine.info["parity"]["top1_agreement"] >= 0.99


@pytest.mark.skipif(TRT_SKIP is not None, reason=f"TensorRT engine tests need TensorRT and a GPU: {TRT_SKIP}")
def test_tensorrt_engine_build_and_parity(part1, tmp_path):
    from export.tensorrt import build_engine, tensorrt_major
    from serving.tensorrt import TensorRTRunner

    source = part1.written["fp16" if tensorrt_major() >= 11 else "fp32"]
    engine = tmp_path / "part1.engine"
    info = build_engine(source, engine, min_batch=1, opt_batch=16, max_batch=64).info
    stored = json.loads((tmp_path / "part1.engine.json").read_text())
    assert stored == json.loads(json.dumps(info)) and stored["precision"] == source.info["precision"]
    assert {"tensorrt_version", "gpu_name", "compute_capability", "min_batch", "opt_batch", "max_batch"} <= stored.keys()
    assert (stored["min_batch"], stored["opt_batch"], stored["max_batch"]) == (1, 16, 64)
    assert stored["checkpoint_sha256"] == sha256(part1.checkpoint) and stored["parity"]["top1_agreement"] >= 0.99
    runner = TensorRTRunner(engine)
    session = ort_session(source.path)
    for images in random_batches((1, 7, 64, 150)):  # 150 > max batch: split into engine-sized chunks
        got, expected = runner(images), session.run(None, {"images": images})[0]
        assert got.shape == (len(images), 100) and got.dtype == np.float32
        assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.99
        assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()
