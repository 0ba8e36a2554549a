"""Fuzzing the image decoder: mutated valid files of every format Pillow both writes and reads here, decoded by the
service's own function (serving.images.decode_image). Each case must decode or be refused with an InputError (400,
413); any other exception would be a 500.

    python -m bench.fuzz_images [--cases 20000] [--seed 0] [--json FILE]

Prints the outcomes (decoded, refused by status, escaped by exception class, with a sample message each) and the
slowest cases; exit status 1 when anything escaped. tests/test_hostile.py runs a few thousand of the same cases.
"""
import argparse
import collections
import io
import json
import sys
import time

import numpy as np
from PIL import Image

from serving.images import InputError, decode_image
from training.files import write_json

MODES = ("RGB", "RGBA", "P", "L", "1", "I;16", "CMYK", "LA", "F")
ANIMATED = ("GIF", "PNG", "TIFF", "WEBP")   # formats whose files may hold several frames
SIDE = (23, 17)   # small, and odd: no format's block size divides it
EXTREMES = (b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00")   # for 4-byte fields


def seed_files(rng=None):
    """{name: bytes}: one small valid file per format and mode that Pillow writes and reads back here (a format
    writes some modes by converting them), plus a two-frame file of each animated format."""
    rng = rng or np.random.default_rng(0)
    Image.init()   # every plugin, not only the common formats' (Image.OPEN and Image.SAVE fill as they load)
    rgb = Image.fromarray(rng.integers(0, 256, (SIDE[1], SIDE[0], 3), dtype=np.uint8))
    images = {"I;16": Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257), "F": rgb.convert("F"),
              **{mode: rgb.convert(mode) for mode in MODES if mode not in ("I;16", "F")}}
    seeds = {}
    for fmt in sorted(set(Image.OPEN) & set(Image.SAVE)):
        for mode, image in images.items():
            extra = {"sizes": [SIDE]} if fmt in ("ICO", "ICNS") else {}
            data = saved(image, fmt, **extra)
            if data is not None and data not in seeds.values():
                seeds[f"{fmt}-{mode}"] = data
        if fmt in ANIMATED:
            data = saved(images["RGB"], fmt, save_all=True, append_images=[images["RGB"].transpose(0)])
            if data is not None:
                seeds[f"{fmt}-animated"] = data
    return seeds


def saved(image, fmt, **options):
    """The bytes of IMAGE saved as FMT, if Pillow writes it and reads it back; else None."""
    buffer = io.BytesIO()
    try:
        image.save(buffer, fmt, **options)
        Image.open(io.BytesIO(buffer.getvalue())).load()
    except Exception:
        return None
    return buffer.getvalue()


def mutate(data, rng):
    """DATA with one kind of damage: bytes overwritten, truncated, a stretch repeated, an integer field set to an
    extreme, a bit flipped."""
    data = bytearray(data)
    kind = rng.integers(5)
    if kind == 0:
        for _ in range(rng.integers(1, 10)):
            data[rng.integers(len(data))] = rng.integers(256)
    elif kind == 1:
        data = data[:rng.integers(1, len(data))]
    elif kind == 2:
        at, start = rng.integers(len(data)), rng.integers(len(data))
        data[at:at] = data[start:start + rng.integers(1, 64)]
    elif kind == 3:
        at = rng.integers(max(1, len(data) - 4))
        data[at:at + 4] = EXTREMES[rng.integers(len(EXTREMES))]
    else:
        data[rng.integers(len(data))] ^= 1 << rng.integers(8)
    return bytes(data)


def fuzz_cases(n, seed=0):
    """N (name, bytes) cases: the seed files in turn, each mutated, from a generator seeded with SEED."""
    rng = np.random.default_rng(seed)
    seeds = list(seed_files().items())
    return [(f"{name}#{i}", mutate(data, rng)) for i, (name, data) in
            ((i, seeds[i % len(seeds)]) for i in range(n))]


def outcome(data):
    """'decoded', the status of an InputError, or the class of anything else that escaped; and the message."""
    try:
        decode_image(data, "images[0]")
        return "decoded", ""
    except InputError as e:
        return e.status, str(e)
    except Exception as e:
        return type(e).__name__, str(e)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.fuzz_images", description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the figures here")
    a = p.parse_args(argv)
    cases = fuzz_cases(a.cases, a.seed)
    counts, samples, times = collections.Counter(), {}, []
    for name, data in cases:
        start = time.perf_counter()
        result, message = outcome(data)
        times.append((time.perf_counter() - start, name))
        counts[str(result)] += 1
        samples.setdefault(str(result), f"{name}: {message[:150]}")
    escaped = {k: v for k, v in counts.items() if k not in ("decoded", "400", "413")}
    times.sort(reverse=True)
    result = {"cases": a.cases, "seed": a.seed, "seed_files": len(seed_files()), "outcomes": dict(counts),
              "escaped": escaped, "samples": samples, "total_s": round(sum(t for t, _ in times), 1),
              "slowest": [(round(t, 3), name) for t, name in times[:10]]}
    print(json.dumps(result, indent=1))
    if a.json:
        write_json(a.json, result)
    sys.exit(1 if escaped else 0)


if __name__ == "__main__":
    main()
