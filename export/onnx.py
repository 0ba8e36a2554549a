"""Checkpoint -> one self-contained ONNX file (FP32, and an FP16 variant), checked against PyTorch.

Every file follows the project contract: input `images` uint8 [N,32,32,3] (NHWC, RGB), output
`logits` float32 [N,100], N dynamic; normalisation and resize happen inside the graph. The model's
provenance (part, classes, checkpoint sha256, accuracy) rides along in the ONNX metadata_props.
"""
import json
import logging
import warnings

import numpy as np
import onnx
import torch
from torch import nn

from training.files import atomic_path

log = logging.getLogger(__name__)
INPUT, OUTPUT = "images", "logits"
VERIFY_SIZES = (1, 7, 64)
FP32_MAX_ABS_DIFF = 1e-3
MIN_TOP1_AGREEMENT = {"fp32": 1.0, "fp16": 0.99}


class ExportError(Exception):
    pass


class ForExport(nn.Module):
    """The classifier as the exporter should see it. Two changes, no numerical effect:
    - the uint8 input is cast to float before anything else: TensorRT accepts a uint8 network input
      only when a cast consumes it directly (Preprocess permutes first, which is free in PyTorch);
    - the network gets a contiguous NCHW tensor: the permute yields channels_last memory, and the
      exporter turns ResNet's flatten of such a tensor into a Gather over as_strided indices."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model.net(self.model.preprocess(images.float()).contiguous())


def metadata(ckpt, checkpoint_sha256, precision="fp32"):
    """The string key/value pairs stored in the ONNX metadata_props."""
    recipe, metrics = ckpt["recipe"], ckpt.get("metrics") or {}
    props = {"part": recipe["name"], "arch": recipe["arch"], "resolution": str(recipe["resolution"]),
             "precision": precision, "classes": json.dumps(list(ckpt["classes"])),
             "recipe": json.dumps(recipe), "preprocess": json.dumps(ckpt.get("preprocess", {})),
             "checkpoint_sha256": checkpoint_sha256,
             "input": "uint8 N×32×32×3 (NHWC, RGB)", "output": "float32 logits N×100"}
    for key in ("test_acc", "val_acc", "epoch"):
        if metrics.get(key) is not None:
            props[key] = str(metrics[key])
    return props


def read_metadata(path):
    """metadata_props of an ONNX file as a dict (classes and recipe decoded from JSON)."""
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    for key in ("classes", "recipe", "preprocess"):
        if key in props:
            props[key] = json.loads(props[key])
    return props


def to_onnx(model, props):
    """The model (CPU, eval) as an FP32 ModelProto, traced by the torch.export-based exporter."""
    example = torch.zeros((2, 32, 32, 3), dtype=torch.uint8)  # 2, not 1: a batch of 1 could be specialised
    program = torch.onnx.export(ForExport(model).eval(), (example,), input_names=[INPUT], output_names=[OUTPUT],
                                dynamic_shapes={"images": {0: torch.export.Dim("N", min=1)}},
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
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in sizes]


def compare(reference, candidate):
    """How far candidate logits are from reference logits: max |Δ| and top-1 agreement."""
    return {"images": len(reference), "max_abs_diff": float(np.abs(reference - candidate).max()),
            "top1_agreement": float((reference.argmax(1) == candidate.argmax(1)).mean())}


def verify(path, model, precision, sizes=VERIFY_SIZES, device=None, name=None):
    """Run the ONNX file in ONNX Runtime on random uint8 batches and compare with the PyTorch model
    (FP32, CPU). Returns per-size results; raises ExportError when they miss the bounds."""
    name = name or path.name
    session = ort_session(path, device)
    provider = session.get_providers()[0]
    results = []
    for images in random_batches(sizes):
        with torch.inference_mode():
            expected = model(torch.from_numpy(images)).numpy()
        got = session.run([OUTPUT], {INPUT: images})[0]
        if got.dtype != np.float32 or got.shape != expected.shape:
            raise ExportError(f"{name}: ONNX Runtime returned {got.dtype} {got.shape}, "
                              f"expected float32 {expected.shape}")
        results.append(compare(expected, got))
    worst_diff = max(r["max_abs_diff"] for r in results)
    agreement = sum(r["top1_agreement"] * r["images"] for r in results) / sum(r["images"] for r in results)
    log.info("%s (%s, %s) vs PyTorch on batches %s: max |Δlogit| %.2e, top-1 agreement %.2f%%",
             name, precision, provider, "/".join(map(str, sizes)), worst_diff, 100 * agreement)
    if precision == "fp32" and worst_diff > FP32_MAX_ABS_DIFF:
        raise ExportError(f"{name}: max |Δlogit| {worst_diff:.2e} vs PyTorch exceeds {FP32_MAX_ABS_DIFF:g} "
                          f"({provider})")
    if agreement < MIN_TOP1_AGREEMENT[precision]:
        raise ExportError(f"{name}: top-1 agreement with PyTorch {100 * agreement:.2f}% is below "
                          f"{100 * MIN_TOP1_AGREEMENT[precision]:g}% ({provider})")
    return {"provider": provider, "sizes": list(sizes), "max_abs_diff": worst_diff, "top1_agreement": agreement,
            "per_size": results}


def save_verified(proto, path, model, precision, sizes=VERIFY_SIZES):
    """Write the file only if ONNX Runtime reproduces the model: a failed check leaves nothing behind."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(proto.SerializeToString())  # weights inline: one self-contained file
        report = verify(tmp, model, precision, sizes, name=path.name)
    log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return report


def export_checkpoint(model, ckpt, checkpoint_sha256, out_dir, fp16=False, sizes=VERIFY_SIZES):
    """Write OUT/<part>.onnx (and OUT/<part>.fp16.onnx); returns {precision: (path, parity report)}."""
    model = model.cpu().eval()
    part = ckpt["recipe"]["name"]
    log.info("exporting %s (%s at %d px) to ONNX with torch.onnx.export(dynamo=True)", part,
             ckpt["recipe"]["arch"], ckpt["recipe"]["resolution"])
    proto = to_onnx(model, metadata(ckpt, checkpoint_sha256))
    path = out_dir / f"{part}.onnx"
    written = {"fp32": (path, save_verified(proto, path, model, "fp32", sizes))}
    if fp16:
        log.info("converting to FP16 (uint8 in, float32 out)")
        path = out_dir / f"{part}.fp16.onnx"
        written["fp16"] = (path, save_verified(to_fp16(proto), path, model, "fp16", sizes))
    return written
