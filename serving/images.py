"""Request payloads -> uint8 arrays, with an InputError (HTTP status + message) for everything malformed.

Image files of any common format, size and mode become RGB 32×32 (Pillow); .npy uploads are checked
from their header (dtype, shape, count) before the data is read, and never unpickled.
"""
import io
import math
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from training.contract import IMAGE_SIZE, BatchError, check_batch

HEADER_BYTES = 16 + 10_000   # magic, length, and numpy's own limit on a header's size
# Decompression bombs: Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; we refuse both.
Image.MAX_IMAGE_PIXELS = int(os.environ.get("CIFAR100_MAX_PIXELS", 40_000_000))
warnings.simplefilter("error", Image.DecompressionBombWarning)
# Uploads within all three limits decode on the event loop (quick_to_decode); others in a thread.
INLINE_IMAGES, INLINE_BYTES, INLINE_PIXELS = 16, 64 << 10, 128 * 128


class InputError(Exception):
    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


def to_rgb(image):
    """RGB for every mode: 16-bit scaled down (not clipped), transparency composited onto white."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.asarray(image).clip(0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info or image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# An image file is a path (a multipart upload BentoML saved) or bytes (a raw request body).
def _file(source):
    return io.BytesIO(source) if isinstance(source, bytes) else source


def _size(source):
    return len(source) if isinstance(source, bytes) else os.path.getsize(source)


def decode_image(source, name):
    """(uint8 32×32×3 array, note or None) from an image file (a path, or the bytes of one); InputError when it is
    not a readable image."""
    if _size(source) == 0:
        raise InputError(f"{name}: empty file (0 bytes)")
    try:
        with Image.open(_file(source)) as image:
            frames = getattr(image, "n_frames", 1)
            image.draft("RGB", (IMAGE_SIZE * 2, IMAGE_SIZE * 2))  # JPEG: decode at a reduced scale, much faster
            image = to_rgb(ImageOps.exif_transpose(image))
            array = np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC), dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{name}: image too large ({e})", 413) from None
    except Image.UnidentifiedImageError:
        raise InputError(f"{name}: not an image Pillow can read (PNG, JPEG, GIF, TIFF, WebP, BMP, ...)") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data
        raise InputError(f"{name}: corrupt or truncated image ({e})") from None
    note = f"{frames} frames (animated or multipage); classified the first" if frames > 1 else None
    return array, note


def decode_images(sources):
    """decode_image for each of SOURCES, named images[i] in errors."""
    return [decode_image(source, f"images[{i}]") for i, source in enumerate(sources)]


def quick_to_decode(sources):
    """Whether SOURCES decode in less CPU than handing them to a thread costs (~0.25 ms on two cores): a few files,
    small in bytes and in pixels (a 32×32 PNG decodes in ~0.1 ms). Reads headers only."""
    if len(sources) > INLINE_IMAGES or sum(map(_size, sources)) > INLINE_BYTES:
        return False
    try:
        for source in sources:
            with Image.open(_file(source)) as image:
                if image.width * image.height > INLINE_PIXELS:
                    return False
    except Exception:   # not a readable image: decode_image says why, wherever it runs
        return False
    return True


def read_npy(data, max_images):
    """An image batch from the bytes of an .npy file, checked against the contract from its header before the data
    is looked at, and never unpickled. The array is a read-only view of DATA (no copy)."""
    head = io.BytesIO(bytes(memoryview(data)[:HEADER_BYTES]))
    try:
        version = np.lib.format.read_magic(head)
    except (ValueError, EOFError):
        raise InputError("images: not an .npy file (save the array with numpy.save)") from None
    try:
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(head)
    except (ValueError, EOFError) as e:
        raise InputError(f"images: unreadable .npy header ({e})") from None
    if dtype.hasobject:
        raise InputError("images: .npy holds Python objects; send a plain uint8 array (pickles are refused)")
    try:
        check_batch(dtype, shape, max_images, limit_name="CIFAR100_MAX_IMAGES")
    except BatchError as e:
        raise InputError(f"images: {e}", e.status) from None
    count, offset = math.prod(shape), head.tell()
    if len(data) - offset < count * dtype.itemsize:
        raise InputError(f"images: truncated .npy data ({len(data) - offset} bytes for {count * dtype.itemsize})")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return np.ascontiguousarray(flat.reshape(shape[::-1]).T) if fortran_order else flat.reshape(shape)
