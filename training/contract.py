"""The contract that ties training, export, serving and every client together; nothing else spells it out.

A model artifact takes uint8 images N×32×32×3 (NHWC, RGB) and returns float32 logits N×100. Normalisation and
resize happen inside the model (training/preprocess.py). The service serves an entry of the BentoML model store
named MODEL_NAME, holding the files named below.
"""
import io

import numpy as np

IMAGE_SIZE = 32
IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)     # one image: height, width, RGB
IMAGE_DTYPE = np.uint8
NUM_CLASSES = 100
INPUT = "uint8 N×32×32×3 (NHWC, RGB)"
OUTPUT = "float32 logits N×100"
INPUT_NAME, OUTPUT_NAME = "images", "logits"  # the ONNX graph's input and output (and the engine's)
TTA = ("none", "flip")   # test-time augmentation an artifact may hold inside (training/models.py builds it)

# The model store entry and its files.
MODEL_NAME = "cifar100-classifier"
CHECKPOINT_FILE = "checkpoint.pt"
ONNX_FILE = "model.onnx"
ONNX_FP16_FILE = "model.fp16.onnx"
ONNX_INT8_FILE = "model.int8.onnx"            # calibrated static quantization (QDQ), for ONNX Runtime on the CPU
ONNX_INT8_INFO_FILE = "model.int8.onnx.json"  # its calibration, its check against FP32 and the speed of both
ENGINE_FILE = "model.engine"
ENGINE_INFO_FILE = "model.engine.json"
MODEL_INFO_FILE = "model.yaml"   # BentoML's own: the entry's metadata


class BatchError(ValueError):
    """A batch that breaks the contract; `status` is the HTTP status the service answers it with."""

    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


def check_batch(dtype, shape, max_images=None, limit_name=None):
    """Raise BatchError unless (dtype, shape) is a batch of 1..max_images uint8 N×32×32×3 images. Takes the
    dtype and shape, not the array, so that an .npy upload is checked from its header before it is read."""
    if dtype != IMAGE_DTYPE or len(shape) != 4 or tuple(shape[1:]) != IMAGE_SHAPE:
        raise BatchError(f"expected an array of {INPUT}, got {dtype} {tuple(shape)}", 422)
    if shape[0] == 0:
        raise BatchError("empty batch (0 images)", 400)
    if max_images is not None and shape[0] > max_images:
        raise BatchError(f"{shape[0]} images exceed the limit of {max_images} per request"
                         + (f" ({limit_name})" if limit_name else "") + "; split the batch", 413)


def chunks(n, size):
    """Consecutive slices of at most `size` rows covering range(n)."""
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def npy_bytes(images):
    """A batch as the bytes of an .npy file: what /classify_batch takes, and the Kaggle files hold (no pickles)."""
    buffer = io.BytesIO()
    np.save(buffer, images, allow_pickle=False)
    return buffer.getvalue()


def blank_images(n):
    return np.zeros((n, *IMAGE_SHAPE), IMAGE_DTYPE)


def random_images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *IMAGE_SHAPE), dtype=IMAGE_DTYPE)
