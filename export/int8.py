"""FP32 ONNX -> INT8 ONNX: ONNX Runtime's static quantization in QDQ form, calibrated on a seeded sample of the
recipe's own training images and written only if it reproduces the FP32 file on training images the calibration
did not see (the recipe's validation split).

The graph keeps the contract (uint8 N×32×32×3 in, float32 logits out): the preprocessing before the first layer
(cast, layout, normalisation, resize, flip TTA) stays in float, weights are int8 per output channel. Activations are
uint8 by default, which ONNX Runtime runs fastest on x86 (measured in docs/performance.md); TensorRT takes only
signed int8 with zero point 0, so `symmetric=True` writes <part>.int8-symmetric.onnx for `export tensorrt`.
"""
import logging
import time

import numpy as np
import onnx

from training.contract import INPUT_NAME, OUTPUT_NAME
from training.data import locate
from training.files import atomic_path

from .onnx import Artifact, ExportError, decoded_metadata, ort_session

log = logging.getLogger(__name__)
CALIB_IMAGES = 512
CHECK_IMAGES = 1000
MIN_AGREEMENT = 0.99        # top-1 agreement with the FP32 file on the held-out images
MAX_ACCURACY_DROP = 0.005   # accuracy on them at most half a point below FP32's
BATCH = 64                  # images per call while calibrating, checking and timing
SPEED_ROUNDS = 3            # FP32 and INT8 timed in turn, this many times each
LAYERS = ("Conv", "Gemm", "MatMul")   # the network proper starts at the first of these


class Int8Refused(ExportError):
    """The INT8 file does not reproduce the FP32 model: nothing was written."""


def int8_name(part, symmetric=False):
    return f"{part}.int8-symmetric.onnx" if symmetric else f"{part}.int8.onnx"


def preprocessing_nodes(proto):
    """The nodes before the network's first layer: they stay in float, so the uint8 input is read as it is."""
    names = []
    for node in proto.graph.node:
        if node.op_type in LAYERS:
            break
        names.append(node.name)
    return names


def sample(data_dir, recipe, calib_images=CALIB_IMAGES, check_images=CHECK_IMAGES, seed=0, calib_dir=None):
    """(calibration images, held-out images, their labels, where the calibration images came from): a seeded sample
    of the training images the recipe trained on (or, with CALIB_DIR, of a Kaggle-style or CIFAR-100-C folder's
    images: calibration needs no labels), and one of its validation split (neither calibration nor training saw it)."""
    from training.data import DataError, load_cifar100, split_train_val

    try:
        data = load_cifar100(data_dir)
    except DataError as e:
        raise ExportError(f"INT8 needs the training images to calibrate on: {e}") from None
    train, held_out = split_train_val(len(data.train_labels), recipe.get("val_fraction", 0.1), recipe.get("seed", 0))
    rng = np.random.default_rng(seed)
    # Drawn with CALIB_DIR too: the check then samples the same held-out images either way.
    calib = rng.choice(train, min(calib_images, len(train)), replace=False)
    if not len(held_out):   # a recipe that kept no validation split: the training images calibration left
        held_out = np.setdiff1d(train, calib)
    check = np.sort(rng.choice(held_out, min(check_images, len(held_out)), replace=False))
    if not len(calib) or not len(check):
        raise ExportError(f"{data_dir}: too few training images to calibrate and check INT8 "
                          f"({len(calib)} for calibration, {len(check)} held out)")
    if calib_dir is not None:
        return folder_sample(calib_dir, calib_images, rng), data.train_images[check], data.train_labels[check], \
            str(calib_dir)
    return data.train_images[np.sort(calib)], data.train_images[check], data.train_labels[check], str(locate(data_dir))


def folder_sample(folder, count, rng):
    """COUNT images drawn (seeded) from all the files of a Kaggle-style or CIFAR-100-C folder, read as the scoring
    client reads them."""
    from serving.score import ScoreError, open_ood_dir

    try:
        sources, _, _ = open_ood_dir(folder)
    except ScoreError as e:
        raise ExportError(f"INT8 calibration images: {e}") from None
    starts = np.cumsum([0] + [len(s.images) for s in sources])
    picks = np.sort(rng.choice(starts[-1], min(count, starts[-1]), replace=False))
    files = np.searchsorted(starts, picks, side="right") - 1
    return np.stack([sources[f].images[i - starts[f]] for f, i in zip(files, picks)])


def quantize(fp32_path, out_path, images, symmetric=False):
    """Write the QDQ model of FP32_PATH calibrated on IMAGES (ONNX Runtime's quantize_static, min-max ranges)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(np.array_split(images, max(1, len(images) // BATCH)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    excluded = preprocessing_nodes(onnx.load(str(fp32_path), load_external_data=False))
    # ONNX Runtime advises its shape-inference pre-pass (quant_pre_process) on the root logger at every call; with
    # it, the quantized ResNet-50 at 32 px ran no faster here (1,121-1,170 img/s, without 1,137-1,195).
    advice = PreProcessAdvice()
    logging.getLogger().addFilter(advice)
    try:
        quantize_static(str(fp32_path), str(out_path), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
                        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True})
    finally:
        logging.getLogger().removeFilter(advice)
    return excluded


class PreProcessAdvice(logging.Filter):
    def filter(self, record):
        return "pre-processing before quantization" not in record.getMessage() \
            and "run pre-processing before quantization" not in record.getMessage()


def logits_of(session, images):
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: images[i:i + BATCH]})[0]
                           for i in range(0, len(images), BATCH)])


def speeds(sessions, batch, min_seconds=0.3):
    """Median img/s of each session on BATCH, timed in alternating rounds (each at least 2 calls and MIN_SECONDS):
    one pass over the check images is too short and too exposed to other load to say which is faster."""
    rounds = {name: [] for name in sessions}
    for session in sessions.values():
        session.run([OUTPUT_NAME], {INPUT_NAME: batch})   # warm-up
    for _ in range(SPEED_ROUNDS):
        for name, session in sessions.items():
            calls, start = 0, time.perf_counter()
            while calls < 2 or time.perf_counter() - start < min_seconds:
                session.run([OUTPUT_NAME], {INPUT_NAME: batch})
                calls += 1
            rounds[name].append(calls * len(batch) / (time.perf_counter() - start))
    return {name: float(np.median(values)) for name, values in rounds.items()}


def check(fp32_path, int8_path, images, labels, name):
    """The INT8 file against the FP32 file on the held-out images, both in ONNX Runtime on the CPU: top-1 agreement
    and accuracies, then (when they pass) both files' img/s, what `auto` compares. Raises Int8Refused when it misses
    MIN_AGREEMENT or MAX_ACCURACY_DROP."""
    sessions = {"fp32": ort_session(fp32_path, "cpu"), "int8": ort_session(int8_path, "cpu")}
    fp32, int8 = logits_of(sessions["fp32"], images), logits_of(sessions["int8"], images)
    agreement = float((fp32.argmax(1) == int8.argmax(1)).mean())
    accuracy = {p: float((logits.argmax(1) == labels).mean()) for p, logits in (("fp32", fp32), ("int8", int8))}
    log.info("INT8 vs FP32 on %d held-out images: top-1 agrees on %.2f%%, accuracy %.4f vs %.4f", len(images),
             100 * agreement, accuracy["int8"], accuracy["fp32"])
    problems = []
    if agreement < MIN_AGREEMENT:
        problems.append(f"its top-1 class agrees with FP32's on {100 * agreement:.2f}% of {len(images)} held-out "
                        f"images (at least {100 * MIN_AGREEMENT:g}% needed)")
    if accuracy["int8"] < accuracy["fp32"] - MAX_ACCURACY_DROP:
        problems.append(f"its accuracy on them is {accuracy['int8']:.4f} against FP32's {accuracy['fp32']:.4f} "
                        f"(at most {MAX_ACCURACY_DROP:g} lower allowed)")
    if problems:
        raise Int8Refused(f"{name} does not reproduce the FP32 model and is not written: " + "; ".join(problems))
    speed = speeds(sessions, images[:BATCH])
    log.info("INT8 vs FP32 on the CPU, batch %d: %.0f vs %.0f img/s", min(BATCH, len(images)), speed["int8"],
             speed["fp32"])
    return {"images": len(images), "top1_agreement": agreement, "fp32_accuracy": accuracy["fp32"],
            "int8_accuracy": accuracy["int8"], "max_abs_diff": float(np.abs(fp32 - int8).max()),
            "min_agreement": MIN_AGREEMENT, "max_accuracy_drop": MAX_ACCURACY_DROP,
            "speed": {"device": "cpu", "batch": min(BATCH, len(images)), "rounds": SPEED_ROUNDS,
                      "fp32_img_per_s": round(speed["fp32"]), "int8_img_per_s": round(speed["int8"]),
                      "faster": bool(speed["int8"] > speed["fp32"])}}


def export_int8(fp32, data_dir, calib_images=CALIB_IMAGES, check_images=CHECK_IMAGES, seed=0, symmetric=False,
                calib_dir=None):
    """OUT/<part>.int8.onnx (symmetric: <part>.int8-symmetric.onnx) next to the FP32 Artifact FP32, with its sidecar
    recording the calibration and the check: the INT8 Artifact. Nothing is written when the check fails."""
    recipe = fp32.info["recipe"]
    path = fp32.path.with_name(int8_name(recipe["name"], symmetric))
    calib, held_out, labels, source = sample(data_dir, recipe, calib_images, check_images, seed, calib_dir)
    log.info("quantizing %s to INT8 (QDQ, %s activations), calibrated on %d %s images of %s", fp32.path.name,
             "symmetric int8" if symmetric else "uint8", len(calib), "training" if calib_dir is None else "folder",
             source)
    start = time.perf_counter()
    with atomic_path(path) as tmp:
        excluded = quantize(fp32.path, tmp, calib, symmetric)
        proto = onnx.load(str(tmp))
        props = {p.key: p.value for p in proto.metadata_props}
        onnx.helper.set_model_props(proto, {**props, "precision": "int8"})
        tmp.write_bytes(proto.SerializeToString())
        report = check(fp32.path, tmp, held_out, labels, path.name)
    info = {**decoded_metadata(proto),
            "quantization": {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
                             "weights": "int8, per output channel, symmetric",
                             "activations": "int8, symmetric" if symmetric else "uint8", "ranges": "min-max",
                             "float_nodes": excluded, "seconds": round(time.perf_counter() - start, 1)},
            "calibration": {"images": len(calib), "seed": seed, "source": source,
                            "split": "training images of the recipe's training split" if calib_dir is None
                            else "the folder's images, every file"},
            "check": {**report, "source": str(locate(data_dir)), "split": "the recipe's validation split (held out from training "
                      "and calibration)", "passed": True},
            "fp32": fp32.path.name}
    artifact = Artifact(path, info)
    artifact.save()
    log.info("wrote %s (%.1f MB) and %s", path, path.stat().st_size / 1e6, Artifact.sidecar(path).name)
    return artifact
