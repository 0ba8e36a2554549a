"""Checkpoint -> one self-contained ONNX file (FP32, and an FP16 variant), checked against PyTorch.

Every file follows the contract (training/contract.py): input `images` uint8 N×32×32×3, output `logits`
float32 N×100, N dynamic; normalisation and resize happen inside the graph. The model's provenance (part,
classes, checkpoint sha256, accuracy) rides along in the ONNX metadata_props, and with the parity check's
figures in <file>.json next to it, which the later steps of the export read instead of the ONNX file.
"""
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from training.contract import IMAGE_SHAPE, INPUT, INPUT_NAME, OUTPUT, OUTPUT_NAME, random_images
from training.files import atomic_path, write_json
from training.models import TTA, mean_of_mirrors, with_mirrors

log = logging.getLogger(__name__)
VERIFY_SIZES = (1, 7, 64)
FP32_MAX_ABS_DIFF = 1e-3
FLIP_SHARE = 0.01   # reduced precision may flip this share of top-1 classes (at least one image) on near-ties


class ExportError(Exception):
    pass


@dataclass
class Artifact:
    """An exported file and what export knows of it (provenance, parity), kept next to it as <file>.json."""
    path: Path
    info: dict

    @staticmethod
    def sidecar(path):
        return Path(path).with_name(Path(path).name + ".json")

    def save(self):
        write_json(self.sidecar(self.path), self.info)

    @classmethod
    def load(cls, path):
        path, sidecar = Path(path), cls.sidecar(path)
        if not path.is_file():
            raise ExportError(f"no file at {path}")
        if not sidecar.is_file():
            raise ExportError(f"no {sidecar.name} next to {path}: export it again with this version")
        return cls(path, json.loads(sidecar.read_text()))


def allowed_flips(n):
    return max(1, int(FLIP_SHARE * n))


class ForExport(nn.Module):
    """The classifier as the exporter should see it (with flip test-time augmentation when asked). Two changes,
    no numerical effect:
    - the uint8 input is cast to float before anything else: TensorRT accepts a uint8 network input
      only when a cast consumes it directly (Preprocess permutes first, which is free in PyTorch);
    - the network gets a contiguous NCHW tensor: the permute yields channels_last memory, and the
      exporter turns ResNet's flatten of such a tensor into a Gather over as_strided indices."""

    def __init__(self, model, tta="none"):
        super().__init__()
        self.model, self.flip = model, tta == "flip"

    def forward(self, images):
        x = images.float()
        x = with_mirrors(x) if self.flip else x
        logits = self.model.net(self.model.preprocess(x).contiguous())
        return mean_of_mirrors(logits) if self.flip else logits


def metadata(ckpt, checkpoint_sha256, precision="fp32", tta="none"):
    """The string key/value pairs stored in the ONNX metadata_props."""
    recipe, metrics = ckpt["recipe"], ckpt.get("metrics") or {}
    props = {"part": recipe["name"], "arch": recipe["arch"], "resolution": str(recipe["resolution"]),
             "precision": precision, "tta": tta, "classes": json.dumps(list(ckpt["classes"])),
             "recipe": json.dumps(recipe), "preprocess": json.dumps(ckpt.get("preprocess", {})),
             "checkpoint_sha256": checkpoint_sha256, "input": INPUT, "output": OUTPUT}
    for key in ("test_acc", "val_acc", "epoch"):
        if metrics.get(key) is not None:
            props[key] = str(metrics[key])
    return props


def decoded_metadata(proto):
    """metadata_props of an ONNX ModelProto as a dict (classes and recipe decoded from JSON)."""
    props = {p.key: p.value for p in proto.metadata_props}
    for key in ("classes", "recipe", "preprocess"):
        if key in props:
            props[key] = json.loads(props[key])
    return props


def read_metadata(path):
    """metadata_props of an ONNX file, decoded."""
    return decoded_metadata(onnx.load(str(path), load_external_data=False))


def to_onnx(model, props):
    """The model (CPU, eval) as an FP32 ModelProto, traced by the torch.export-based exporter (props["tta"]: with
    test-time augmentation inside the graph)."""
    example = torch.zeros((2, *IMAGE_SHAPE), dtype=torch.uint8)  # 2, not 1: a batch of 1 could be specialised
    program = torch.onnx.export(ForExport(model, props["tta"]).eval(), (example,), input_names=[INPUT_NAME],
                                output_names=[OUTPUT_NAME], dynamic_shapes={"images": {0: torch.export.Dim("N", min=1)}},
                                dynamo=True, external_data=False, optimize=True, verbose=False)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, props)
    onnx.checker.check_model(proto)
    return proto


def to_fp16(proto):
    """FP16 weights and compute, uint8 in / float32 out (onnxconverter-common, keep_io_types=True).

    Cast-to-float nodes (the uint8 -> float preprocessing cast) stay as they are and get an FP16 cast
    after them: the converter would otherwise relabel their output FP16 without changing `to`. Resize
    is on the converter's default block list: it stays FP32 between two casts."""
    from onnxconverter_common import float16

    float_casts = [n.name for n in proto.graph.node if n.op_type == "Cast"
                   and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute)]
    with warnings.catch_warnings():  # one "value truncated to 1e-07" warning per tiny weight
        warnings.simplefilter("ignore", UserWarning)
        half = float16.convert_float_to_float16(proto, keep_io_types=True, node_block_list=float_casts)
    props = {p.key: p.value for p in proto.metadata_props}
    onnx.helper.set_model_props(half, {**props, "precision": "fp16"})
    onnx.checker.check_model(half)
    return half


def ort_session(path, device=None, tf32=False):
    """An ONNX Runtime session on CUDA when torch sees a GPU and ORT has the CUDA provider, else CPU."""
    import onnxruntime as ort

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        # TF32 off: its 10-bit mantissa alone can move FP32 logits by more than the 1e-3 parity bound.
        providers.insert(0, ("CUDAExecutionProvider", {"use_tf32": int(tf32)}))
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no per-node placement chatter
    return ort.InferenceSession(str(path), options, providers=providers)


def random_batches(sizes=VERIFY_SIZES, seed=0):
    return [random_images(n, seed=seed * 1000 + i) for i, n in enumerate(sizes)]


def compare(reference, candidate):
    """How far candidate logits are from reference logits: max |Δ|, top-1 agreement and flips."""
    flips = int((reference.argmax(1) != candidate.argmax(1)).sum())
    return {"images": len(reference), "max_abs_diff": float(np.abs(reference - candidate).max()),
            "top1_agreement": 1 - flips / len(reference), "top1_flips": flips}


def verify(path, model, precision, sizes=VERIFY_SIZES, device=None, name=None):
    """Run the ONNX file in ONNX Runtime on random uint8 batches and compare with the PyTorch model (FP32, CPU).
    FP32 must match within FP32_MAX_ABS_DIFF with no top-1 flip; FP16 may flip allowed_flips(images) top-1
    classes. Returns the figures; raises ExportError when they miss the bounds."""
    name = name or path.name
    session = ort_session(path, device)
    provider = session.get_providers()[0]
    results = []
    for images in random_batches(sizes):
        with torch.inference_mode():
            expected = model(torch.from_numpy(images)).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
        if got.dtype != np.float32 or got.shape != expected.shape:
            raise ExportError(f"{name}: ONNX Runtime returned {got.dtype} {got.shape}, "
                              f"expected float32 {expected.shape}")
        results.append(compare(expected, got))
    worst_diff = max(r["max_abs_diff"] for r in results)
    images, flips = sum(r["images"] for r in results), sum(r["top1_flips"] for r in results)
    log.info("%s (%s, %s) vs PyTorch on batches %s: max |Δlogit| %.2e, top-1 differs on %d of %d images",
             name, precision, provider, "/".join(map(str, sizes)), worst_diff, flips, images)
    if precision == "fp32" and worst_diff > FP32_MAX_ABS_DIFF:
        raise ExportError(f"{name}: max |Δlogit| {worst_diff:.2e} vs PyTorch exceeds {FP32_MAX_ABS_DIFF:g} "
                          f"({provider})")
    allowed = 0 if precision == "fp32" else allowed_flips(images)
    if flips > allowed:
        raise ExportError(f"{name}: the top-1 class differs from PyTorch's on {flips} of {images} images "
                          f"(at most {allowed} allowed; {provider})")
    return {"provider": provider, "sizes": list(sizes), "max_abs_diff": worst_diff,
            "top1_agreement": 1 - flips / images, "top1_flips": flips, "per_size": results}


def save_verified(proto, path, model, precision, sizes=VERIFY_SIZES):
    """Write the file only if ONNX Runtime reproduces the model (a failed check leaves nothing behind), then its
    sidecar. Returns the Artifact."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(proto.SerializeToString())  # weights inline: one self-contained file
        report = verify(tmp, model, precision, sizes, name=path.name)
    artifact = Artifact(path, {**decoded_metadata(proto), "parity": report})
    artifact.save()
    log.info("wrote %s (%.1f MB) and %s", path, path.stat().st_size / 1e6, Artifact.sidecar(path).name)
    return artifact


def export_checkpoint(model, ckpt, checkpoint_sha256, out_dir, fp16=False, sizes=VERIFY_SIZES, tta="none"):
    """Write OUT/<part>.onnx (and OUT/<part>.fp16.onnx), each with its sidecar; returns {precision: Artifact}.
    tta="flip" puts flip test-time augmentation inside the graph (and checks it against the same in PyTorch)."""
    model = model.cpu().eval()
    part = ckpt["recipe"]["name"]
    log.info("exporting %s (%s at %d px%s) to ONNX with torch.onnx.export(dynamo=True)", part,
             ckpt["recipe"]["arch"], ckpt["recipe"]["resolution"], ", flip test-time augmentation" if tta != "none" else "")
    proto = to_onnx(model, metadata(ckpt, checkpoint_sha256, tta=tta))
    reference = TTA[tta](model)
    written = {"fp32": save_verified(proto, Path(out_dir) / f"{part}.onnx", reference, "fp32", sizes)}
    if fp16:
        log.info("converting to FP16 (uint8 in, float32 out)")
        written["fp16"] = save_verified(to_fp16(proto), Path(out_dir) / f"{part}.fp16.onnx", reference, "fp16", sizes)
    return written
