"""Save a checkpoint and its exported artifacts as one BentoML model (`cifar100-classifier`).

Store layout (the serving contract): checkpoint.pt, model.onnx, and when exported model.fp16.onnx,
model.engine + model.engine.json. Every artifact must come from this very checkpoint (its sha256 is
in the ONNX metadata and the engine JSON), so a stale file from an earlier export is refused.
"""
import json
import logging
import shutil
from pathlib import Path

from training.checkpoint import load_checkpoint, sha256

from .onnx import ExportError, read_metadata

log = logging.getLogger(__name__)
MODEL_NAME = "cifar100-classifier"


def artifact_files(artifacts_dir, part, checkpoint_sha256):
    """{store file name: exported file} for the artifacts of `part` in ARTIFACTS_DIR, all checked to be
    exports of the checkpoint with this sha256. model.onnx is required."""
    artifacts_dir = Path(artifacts_dir)
    found = {}
    for store_name, source in (("model.onnx", f"{part}.onnx"), ("model.fp16.onnx", f"{part}.fp16.onnx")):
        path = artifacts_dir / source
        if path.is_file():
            made_from = read_metadata(path).get("checkpoint_sha256")
            if made_from != checkpoint_sha256:
                raise ExportError(f"{path} was exported from another checkpoint (sha256 {str(made_from)[:12]}…, "
                                  f"this one is {checkpoint_sha256[:12]}…): export it again or delete it")
            found[store_name] = path
    if "model.onnx" not in found:
        raise ExportError(f"no {part}.onnx in {artifacts_dir}: run `python -m export onnx` first")
    engine, engine_json = artifacts_dir / f"{part}.engine", artifacts_dir / f"{part}.engine.json"
    if engine.is_file() and engine_json.is_file():
        made_from = json.loads(engine_json.read_text()).get("checkpoint_sha256")
        if made_from != checkpoint_sha256:
            raise ExportError(f"{engine} was built from another checkpoint: build it again or delete it")
        found["model.engine"], found["model.engine.json"] = engine, engine_json
    return found


def store_metadata(ckpt, checkpoint_sha256, artifacts):
    recipe, metrics = ckpt["recipe"], ckpt.get("metrics") or {}
    meta = {"part": recipe["name"], "arch": recipe["arch"], "resolution": recipe["resolution"],
            "classes": list(ckpt["classes"]), "input": "uint8 N×32×32×3 (NHWC, RGB)",
            "output": "float32 logits N×100", "artifacts": sorted(artifacts), "checkpoint_sha256": checkpoint_sha256}
    # BentoML metadata cannot hold None: accuracies appear only when the checkpoint has them.
    for key in ("test_acc", "val_acc"):
        if metrics.get(key) is not None:
            meta[key] = float(metrics[key])
    return meta


def save_to_store(checkpoint_path, artifacts_dir, name=MODEL_NAME):
    """Copy the checkpoint and its artifacts into a new version of NAME in the BentoML model store."""
    import bentoml

    ckpt = load_checkpoint(checkpoint_path)
    digest = sha256(checkpoint_path)
    files = artifact_files(artifacts_dir, ckpt["recipe"]["name"], digest)
    meta = store_metadata(ckpt, digest, ["checkpoint.pt", *files])
    labels = {"part": meta["part"], "arch": meta["arch"]}
    # create() writes into a temporary directory and adds it to the store only if this block succeeds.
    with bentoml.models.create(name, labels=labels, metadata=meta) as model:
        shutil.copyfile(checkpoint_path, model.path_of("checkpoint.pt"))
        for store_name, source in files.items():
            shutil.copyfile(source, model.path_of(store_name))
    stored = bentoml.models.get(model.tag)
    log.info("saved %s to the BentoML model store (%s): %s", stored.tag, stored.path, ", ".join(meta["artifacts"]))
    return stored
