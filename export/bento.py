"""Save a checkpoint and its exported artifacts as one BentoML model (training/contract.py names it and its files).

Store layout: checkpoint.pt, model.onnx, and when exported model.fp16.onnx, model.int8.onnx + model.int8.onnx.json,
model.engine + model.engine.json.
Every artifact must come from this very checkpoint (its sha256 is in each artifact's sidecar), so a stale file
from an earlier export is refused.
"""
import logging
import shutil
from pathlib import Path

from training.contract import (CHECKPOINT_FILE, ENGINE_FILE, ENGINE_INFO_FILE, INPUT, MODEL_NAME, ONNX_FILE,
                               ONNX_FP16_FILE, ONNX_INT8_FILE, ONNX_INT8_INFO_FILE, OUTPUT)

from .int8 import int8_name
from .onnx import Artifact, ExportError

log = logging.getLogger(__name__)


def find_artifacts(artifacts_dir, part, checkpoint_sha256):
    """The Artifacts of `part` that `python -m export onnx/tensorrt` left in ARTIFACTS_DIR (read from their
    sidecars), all checked to be exports of the checkpoint with this sha256. The FP32 ONNX file is required."""
    artifacts_dir = Path(artifacts_dir)
    found = []
    for name in (f"{part}.onnx", f"{part}.fp16.onnx", int8_name(part), f"{part}.engine"):
        if (artifacts_dir / name).is_file():
            found.append(Artifact.load(artifacts_dir / name))
    if not any(a.path.name == f"{part}.onnx" for a in found):
        raise ExportError(f"no {part}.onnx in {artifacts_dir}: run `python -m export onnx` first")
    for artifact in found:
        made_from = artifact.info.get("checkpoint_sha256")
        if made_from != checkpoint_sha256:
            raise ExportError(f"{artifact.path} was exported from another checkpoint (sha256 {str(made_from)[:12]}…, "
                              f"this one is {checkpoint_sha256[:12]}…): export it again or delete it")
    return found


def store_files(artifacts):
    """{store file name: source file} for the checkpoint's artifacts."""
    files = {}
    for artifact in artifacts:
        if artifact.path.suffix == ".engine":
            files[ENGINE_FILE], files[ENGINE_INFO_FILE] = artifact.path, Artifact.sidecar(artifact.path)
        elif artifact.info.get("precision") == "int8":   # the backend reads the check's figures from the sidecar
            files[ONNX_INT8_FILE], files[ONNX_INT8_INFO_FILE] = artifact.path, Artifact.sidecar(artifact.path)
        else:
            files[ONNX_FP16_FILE if artifact.info.get("precision") == "fp16" else ONNX_FILE] = artifact.path
    return files


def store_metadata(ckpt, checkpoint_sha256, files, tta):
    recipe, metrics = ckpt["recipe"], ckpt.get("metrics") or {}
    meta = {"part": recipe["name"], "arch": recipe["arch"], "resolution": recipe["resolution"],
            "classes": list(ckpt["classes"]), "input": INPUT, "output": OUTPUT, "artifacts": sorted(files),
            "checkpoint_sha256": checkpoint_sha256, "tta": tta}
    # BentoML metadata cannot hold None: accuracies appear only when the checkpoint has them.
    for key in ("test_acc", "val_acc"):
        if metrics.get(key) is not None:
            meta[key] = float(metrics[key])
    return meta


def save_to_store(checkpoint_path, ckpt, checkpoint_sha256, artifacts, name=MODEL_NAME):
    """Copy the checkpoint and its Artifacts into a new version of NAME in the BentoML model store."""
    import bentoml

    files = {CHECKPOINT_FILE: Path(checkpoint_path), **store_files(artifacts)}
    tta = {a.info.get("tta", "none") for a in artifacts}   # the exported graphs' test-time augmentation
    if len(tta) != 1:
        raise ExportError(f"the artifacts were exported with different --tta ({', '.join(sorted(tta))}): export again")
    # The PyTorch backend applies the same test-time augmentation to the checkpoint (the store's metadata says it).
    meta = store_metadata(ckpt, checkpoint_sha256, files, tta.pop())
    labels = {"part": meta["part"], "arch": meta["arch"]}
    # create() writes into a temporary directory and adds it to the store only if this block succeeds.
    with bentoml.models.create(name, labels=labels, metadata=meta) as model:
        for store_name, source in files.items():
            shutil.copyfile(source, model.path_of(store_name))
    stored = bentoml.models.get(model.tag)
    log.info("saved %s to the BentoML model store (%s): %s", stored.tag, stored.path, ", ".join(meta["artifacts"]))
    return stored
