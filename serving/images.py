"""Request payloads -> uint8 arrays, with an InputError (HTTP status + message) for everything malformed.

Image files of any common format, size and mode become RGB 32×32 (Pillow). An upload is opened first (its header
only: format, size, mode, whether it has several frames), so that what decoding it will hold in memory (`decoded_bytes`) and how much work
it is (`cost`) are known, and admitted by the service, before any pixel is decoded. Decoding then holds one
full-size copy at most: JPEG decodes at a reduced scale; other formats are decoded whole, then converted and
box-reduced one tile at a time. Whatever Pillow raises on a broken file is a 400 naming the file.

.npy uploads are checked from their header (version, dtype, shape, count, length) before the data is looked at, and
never unpickled.
"""
import contextlib
import ctypes
import io
import logging
import math
import os
import struct
import warnings

import numpy as np
from PIL import Image, ImageMode

from serving import settings
from training.contract import IMAGE_SIZE, BatchError, check_batch

HEADER_BYTES = 16 + 10_000   # magic, length, and numpy's own limit on a header's size
# Decompression bombs: Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; we refuse both.
Image.MAX_IMAGE_PIXELS = settings.get().max_pixels   # CIFAR100_MAX_PIXELS
warnings.simplefilter("error", Image.DecompressionBombWarning)
# Pillow warns about what it skips in a broken file (a tag, EXIF data), and logs some as errors: the client's
# problem, not the log's.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
logging.getLogger("PIL").setLevel(logging.CRITICAL)
warnings.filterwarnings("ignore", message="Reading `.npy`", category=UserWarning)
Image.init()
# Every format Pillow opens but EPS, which it renders by running Ghostscript on the file.
FORMATS = [f for f in Image.ID if f != "EPS"]
# Beyond the image, the buffers of the decoding library (measured peaks on 3000×3000 images: WebP 4.2×, AVIF 2.4×,
# JPEG 2000 6.2× the image) and decoders slower than PNG's (JPEG 2000 ~8×; the ones Pillow writes in Python, such as
# QOI's, uncompressed DDS's, RLE BMP's, 20-80×, and they hold the GIL): what an upload's decoding holds and costs.
DECODER_MEMORY, DECODER_WORK, PYTHON_DECODER_WORK = {"WEBP": 4, "AVIF": 3, "JPEG2000": 6}, {"JPEG2000": 8}, 32
ICON_PIXELS = 1024 * 1024   # Pillow decodes an icon (ICO, CUR) while opening it: before it could be admitted
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Images are box-reduced to at least REDUCED pixels a side before the resize to 32×32 (what Pillow's resize does with
# reducing_gap=3), TILE pixels a side at a time (a tile of 1 MB: below MMAP_THRESHOLD).
REDUCED, TILE = 3 * IMAGE_SIZE, 512
# Memory that decoding freed went back to the OS only by chance: glibc gives each thread that allocates an arena of
# its own, keeps what is freed there, and raises its threshold for a block of its own mapping (mmap, unmapped when
# freed) to the largest block freed so far. Pillow allocates an image in blocks of up to 16 MB, so after the first
# large image they stayed in the decoding threads' arenas: 4 concurrent 40 Mpx PNGs left the front 240 MB larger
# 10 s later (bench.decode_memory). A fixed threshold of 4 MB maps every large block on its own, returned when freed;
# smaller ones (a 3 MB request body, a tile) are reused from the heap, which keeps up to TRIM_THRESHOLD free at its
# top rather than hand it back and fault it in again for the next body (glibc raised both thresholds as it went).
MMAP_THRESHOLD, TRIM_THRESHOLD = 4 << 20, 32 << 20
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's malloc.h


def map_large_blocks():
    """Have malloc map every block of MMAP_THRESHOLD bytes or more on its own, and keep TRIM_THRESHOLD at the top of
    its heaps; False where the C library is not glibc."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    return bool(mallopt and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


map_large_blocks()
# Uploads within all these limits decode on the event loop (quick_to_decode); others in a thread.
INLINE_IMAGES, INLINE_BYTES, INLINE_PIXELS, INLINE_CHUNKS = 16, 64 << 10, 128 * 128, 16
# PNG chunks that cost nothing to read: no compressed metadata (zTXt, iTXt, iCCP), no EXIF, no animation.
CHEAP_PNG_CHUNKS = {b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"sBIT", b"pHYs", b"bKGD",
                    b"tIME", b"tEXt"}
ORIENTATION = 0x0112   # the EXIF tag
TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_90}   # as ImageOps.exif_transpose


class InputError(Exception):
    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


def to_rgb(image):
    """RGB for every mode: 16-bit scaled down (not clipped), transparency composited onto white."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.nan_to_num(np.asarray(image), posinf=255).clip(0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info or image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@contextlib.contextmanager
def readable(name):
    """Pillow's errors on an image file as InputErrors naming it. Broken files make Pillow raise far more than
    OSError, ValueError and SyntaxError (RuntimeError, IndexError, KeyError, TypeError, struct.error, its own format
    errors, ...): every one of them is the file's fault."""
    try:
        yield
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{name}: image too large ({e})", 413) from None
    except Image.UnidentifiedImageError:
        raise InputError(f"{name}: not an image Pillow can read (PNG, JPEG, GIF, TIFF, WebP, BMP, ...)") from None
    except Exception as e:
        raise InputError(f"{name}: corrupt or truncated image ({str(e)[:200] or 'unreadable'})") from None


def pixel_bytes(mode):
    """Bytes per pixel of Pillow's storage of MODE: 4 for every mode of several bands (RGB is stored as RGBX)."""
    return 4 if len(ImageMode.getmode(mode).bands) > 1 else np.dtype(ImageMode.getmode(mode).typestr).itemsize


class Upload:
    """An image file opened: its header read, its pixels not yet decoded. `decoded_bytes` is what decoding it will
    hold: its full size (JPEG: at the reduced scale it will decode at) in Pillow's storage, times DECODER_MEMORY;
    `cost` is that times how much slower than PNG its decoder is."""

    def __init__(self, data, name):
        if not data:
            raise InputError(f"{name}: empty file (0 bytes)")
        self.name = name
        with readable(name):
            if (pixels := icon_pixels(data)) and pixels > ICON_PIXELS:
                raise InputError(f"{name}: an icon of {pixels} pixels; icons (ICO, CUR) are taken up to {ICON_PIXELS}",
                                 413)
            self.image = Image.open(io.BytesIO(data), formats=FORMATS)
            # Whether there is a second frame, not how many: counting walks every frame in Python, ~60 µs each
            # (minutes for a 64 MB GIF of tiny frames)
            self.animated = getattr(self.image, "is_animated", False)
            self.image.draft("RGB", (REDUCED, REDUCED))   # JPEG: decode at a reduced scale, much faster
            kind = self.image.format
            self.decoded_bytes = self.image.width * self.image.height * pixel_bytes(self.image.mode) * \
                DECODER_MEMORY.get(kind, 1)
            in_python = any(tile.codec_name in Image.DECODERS for tile in self.image.tile)
            self.cost = self.decoded_bytes * (PYTHON_DECODER_WORK if in_python else DECODER_WORK.get(kind, 1))

    def decode(self):
        """(uint8 32×32×3 array, note or None); InputError when the file is not a readable image."""
        with readable(self.name), self.image as image:
            small = reduced_rgb(image)
            if method := TRANSPOSE.get(image.getexif().get(ORIENTATION)):
                small = small.transpose(method)
            array = np.asarray(small.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC), dtype=np.uint8)
        return array, "several frames (animated or multipage); classified the first" if self.animated else None


def reduced_rgb(image):
    """IMAGE in RGB, box-reduced (if it is large) to no less than REDUCED pixels a side. Only the decoded image is
    full size: the conversion to RGB and the reduction go one tile at a time, whatever the mode."""
    fx, fy = max(1, image.width // REDUCED), max(1, image.height // REDUCED)
    if fx == fy == 1:
        return to_rgb(image)
    if image.mode in ("RGB", "L"):   # reduce takes them as they are, into a new small image
        return to_rgb(image.reduce((fx, fy)))
    reduced = Image.new("RGB", (-(-image.width // fx), -(-image.height // fy)))
    cols, rows = fx * max(1, TILE // fx), fy * max(1, TILE // fy)   # whole boxes of the reduction per tile
    for top in range(0, image.height, rows):
        for left in range(0, image.width, cols):
            tile = image.crop((left, top, min(left + cols, image.width), min(top + rows, image.height)))
            reduced.paste(to_rgb(tile).reduce((fx, fy)), (left // fx, top // fy))
    return reduced


def decode_image(data, name):
    """(uint8 32×32×3 array, note or None) from the bytes of an image file; InputError when it is not a readable
    image. The service's own path, in one call (the service opens first, admits, then decodes)."""
    return Upload(data, name).decode()


def decode_images(sources):
    """decode_image for each of SOURCES (bytes), named images[i] in errors."""
    return [decode_image(data, f"images[{i}]") for i, data in enumerate(sources)]


def open_images(sources):
    """An Upload for each of SOURCES (the bytes of a file, or a path to one), named images[i]."""
    return [Upload(s if isinstance(s, bytes) else read_file(s), f"images[{i}]") for i, s in enumerate(sources)]


def decode_uploads(uploads):
    return [upload.decode() for upload in uploads]


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def small_files(sources):
    """The bytes of SOURCES (bytes, or paths) when they are few and small enough to be decoded on the event loop
    (quick_to_decode judges them), else None."""
    if len(sources) > INLINE_IMAGES or \
            sum(len(s) if isinstance(s, bytes) else os.path.getsize(s) for s in sources) > INLINE_BYTES:
        return None
    return [s if isinstance(s, bytes) else read_file(s) for s in sources]


def quick_to_decode(sources):
    """Whether SOURCES (bytes) decode in less CPU than handing them to a thread costs (~0.25 ms on two cores): a few
    small files, each a PNG or a baseline JPEG of at most INLINE_PIXELS whose structure, walked without Pillow, holds
    few chunks (segments) and nothing that must be inflated or parsed at length (compressed text, an ICC profile,
    EXIF, animation). A 32×32 PNG decodes in ~0.1 ms; a 59 KB PNG of compressed text chunks took 314 ms."""
    if len(sources) > INLINE_IMAGES or sum(map(len, sources)) > INLINE_BYTES:
        return False
    return all((png_pixels(data) or jpeg_pixels(data) or INLINE_PIXELS + 1) <= INLINE_PIXELS for data in sources)


def icon_pixels(data):
    """The most pixels of the images in a Windows icon or cursor (from their own headers, PNG or DIB, not the
    directory's one-byte sizes); None for other files."""
    if data[:4] not in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00"):
        return None
    most = 0
    for entry in range(6, 6 + 16 * int.from_bytes(data[4:6], "little"), 16):
        if entry + 16 > len(data):
            break
        offset = int.from_bytes(data[entry + 12:entry + 16], "little")
        if offset + 24 > len(data):   # Pillow finds nothing there either
            continue
        if data[offset:offset + 8] == PNG_SIGNATURE:
            width, height = struct.unpack_from(">II", data, offset + 16)
        else:   # a DIB: its height counts the image and its mask
            width, height = struct.unpack_from("<ii", data, offset + 4)
            height //= 2
        most = max(most, abs(width) * abs(height))
    return most


def png_pixels(data):
    """Width × height of a PNG of at most INLINE_CHUNKS chunks, all of CHEAP_PNG_CHUNKS; else None."""
    if not data.startswith(PNG_SIGNATURE):
        return None
    pixels, position = None, 8
    for _ in range(INLINE_CHUNKS):
        if position + 12 > len(data):
            return None
        length, kind = struct.unpack_from(">I4s", data, position)
        if kind not in CHEAP_PNG_CHUNKS:
            return None
        if kind == b"IHDR" and position + 16 <= len(data):
            pixels = math.prod(struct.unpack_from(">II", data, position + 8))
        if kind == b"IEND":
            return pixels
        position += 12 + length
    return None


def jpeg_pixels(data):
    """Width × height of a baseline JPEG of at most INLINE_CHUNKS segments before its first scan, without EXIF
    (APP1); else None."""
    if not data.startswith(b"\xff\xd8"):
        return None
    pixels, position = None, 2
    for _ in range(INLINE_CHUNKS):
        if position + 9 > len(data) or data[position] != 0xFF:
            return None
        marker, length = data[position + 1], int.from_bytes(data[position + 2:position + 4])
        if marker in (0xC0, 0xC1):   # baseline or extended sequential, Huffman-coded
            height, width = struct.unpack_from(">HH", data, position + 5)
            pixels = width * height
        elif 0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or marker == 0xE1:
            return None   # progressive, lossless or arithmetic-coded; EXIF
        elif marker == 0xDA:
            return pixels
        position += 2 + length
    return None


def read_npy(data, max_images):
    """An image batch from the bytes of an .npy file, checked against the contract from its header before the data
    is looked at, and never unpickled: InputError for any other version, dtype, shape (negative, too large, not
    N×32×32×3) or a body that is not exactly that many images. The array is a read-only view of DATA (no copy)."""
    head = io.BytesIO(bytes(memoryview(data)[:HEADER_BYTES]))
    try:
        version = np.lib.format.read_magic(head)
    except (ValueError, EOFError):
        raise InputError("images: not an .npy file (save the array with numpy.save)") from None
    # 3.0 differs from 2.0 only in the header's encoding (UTF-8), which no uint8 array's header needs.
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0,
               (3, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise InputError(f"images: .npy format version {version[0]}.{version[1]} is not one numpy writes (1.0, 2.0, "
                         "3.0)")
    try:
        shape, fortran_order, dtype = readers[version](head)
    except Exception as e:   # ValueError, EOFError; RecursionError or MemoryError from a crafted literal
        raise InputError(f"images: unreadable .npy header ({str(e)[:200]})") from None
    if dtype.hasobject:
        raise InputError("images: .npy holds Python objects; send a plain uint8 array (pickles are refused)")
    if any(n < 0 for n in shape):
        raise InputError(f"images: .npy header gives a negative size in its shape {shape}")
    try:
        check_batch(dtype, shape, max_images, limit_name="CIFAR100_MAX_IMAGES")
    except BatchError as e:
        raise InputError(f"images: {e}", e.status) from None
    count, offset = math.prod(shape), head.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise InputError(f"images: {'truncated' if len(data) - offset < count * dtype.itemsize else 'oversized'} .npy "
                         f"data ({len(data) - offset} bytes after the header for the {count * dtype.itemsize} of "
                         f"shape {shape})")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return np.ascontiguousarray(flat.reshape(shape[::-1]).T) if fortran_order else flat.reshape(shape)
