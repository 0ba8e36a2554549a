"""Write a small CIFAR-100 look-alike in the exact official python format, with a learnable signal.

    python -m training.synthetic OUT_DIR --per-class 50 [--corrupted --per-severity 100]

Each class has its own colour and stripe pattern (orientation and frequency); every image adds a
random phase, brightness and noise. Writes OUT_DIR/cifar-100-python/{train,test,meta}; with --corrupted also
OUT_DIR/CIFAR-100-C/ in CIFAR-100-C's layout (19 <corruption>.npy files, 5 severity blocks each, one labels.npy),
its corruptions imitated with torchvision operations at growing strength: the format is exact, the damage only
alike.
"""
import argparse
import pickle
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from .cifar100c import CORRUPTIONS, FOLDER, SEVERITIES
from .files import atomic_path

CLASSES = [f"class_{i:02d}" for i in range(100)]


def make_images(labels, rng, class_seed=0):
    """uint8 N×32×32×3 images for the given labels."""
    crng = np.random.default_rng(class_seed)
    colours = crng.uniform(40, 215, size=(100, 3))
    angles = crng.uniform(0, np.pi, size=100)
    freqs = crng.uniform(0.15, 0.9, size=100)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    n = len(labels)
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1))
    a, f = angles[labels][:, None, None], freqs[labels][:, None, None]
    stripes = np.sin(f * (xx * np.cos(a) + yy * np.sin(a)) + phase)               # N×32×32
    images = colours[labels][:, None, None, :] + 45 * stripes[..., None]
    images *= rng.uniform(0.8, 1.2, size=(n, 1, 1, 1))
    images += rng.normal(0, 20, size=images.shape)
    return np.clip(images, 0, 255).astype(np.uint8)


def _split(images, labels, name):
    return {"filenames": [f"synthetic_{name}_{i}.png" for i in range(len(labels))],
            "batch_label": f"{name} batch 1 of 1",
            "fine_labels": [int(x) for x in labels],
            "coarse_labels": [int(x) // 5 for x in labels],
            # Official layout: N×3072 uint8, the red plane, then green, then blue.
            "data": images.transpose(0, 3, 1, 2).reshape(len(labels), 3072)}


def write_dataset(out_dir, per_class=50, test_per_class=None, seed=0):
    test_per_class = test_per_class if test_per_class is not None else max(1, per_class // 5)
    rng = np.random.default_rng(seed + 1)
    root = Path(out_dir) / "cifar-100-python"
    for name, count in (("train", per_class), ("test", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(100), count))
        with atomic_path(root / name) as tmp, open(tmp, "wb") as f:
            pickle.dump(_split(make_images(labels, rng, seed), labels, name), f, protocol=2)
    meta = {"fine_label_names": CLASSES, "coarse_label_names": [f"superclass_{i:02d}" for i in range(20)]}
    with atomic_path(root / "meta") as tmp, open(tmp, "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return root


def corrupt(name, images, severity):
    """uint8 N×3×H×W images damaged the way NAME names, at strength 1..5 (an imitation of CIFAR-100-C's)."""
    f, s = v2.functional, severity
    x = images.float() / 255
    if name.endswith("noise") and name != "impulse_noise":
        x = x + torch.randn_like(x) * 0.03 * s * (x if name == "speckle_noise" else 1)
    elif name == "impulse_noise":
        hit = torch.rand_like(x) < 0.01 * s
        x = torch.where(hit, torch.randint_like(x, 0, 2), x)
    elif name.endswith("blur"):
        x = f.gaussian_blur(x, [5, 5], [0.3 + 0.3 * s])
    elif name == "pixelate":
        x = f.resize(f.resize(x, [32 - 4 * s], antialias=True), [32], antialias=False)
    elif name == "jpeg_compression":
        return f.jpeg(images, quality=max(5, 90 - 17 * s))
    elif name in ("brightness", "contrast", "saturate"):
        adjust = {"brightness": f.adjust_brightness, "contrast": f.adjust_contrast, "saturate": f.adjust_saturation}
        x = adjust[name](x, {"contrast": 1 - 0.15 * s}.get(name, 1 + 0.15 * s))
    elif name == "elastic_transform":
        x = v2.ElasticTransform(alpha=8.0 * s)(x)
    else:   # snow, frost, fog, spatter: a smooth random layer over the image
        layer = f.gaussian_blur(torch.rand_like(x[:, :1]).expand_as(x), [9, 9], [3.0])
        x = x * (1 - 0.1 * s) + layer * 0.1 * s
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def write_corrupted(out_dir, per_severity=100, seed=0):
    """OUT_DIR/CIFAR-100-C: generated test images under every corruption at 5 severities, and labels.npy."""
    rng = np.random.default_rng(seed + 2)
    labels = rng.permutation(np.resize(np.arange(100), per_severity))
    clean = torch.from_numpy(make_images(labels, rng, seed)).permute(0, 3, 1, 2)
    root = Path(out_dir) / FOLDER
    torch.manual_seed(seed)
    for name in CORRUPTIONS:
        blocks = [corrupt(name, clean, s).permute(0, 2, 3, 1).numpy() for s in range(1, SEVERITIES + 1)]
        with atomic_path(root / f"{name}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, np.concatenate(blocks), allow_pickle=False)
    with atomic_path(root / "labels.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, np.tile(labels, SEVERITIES).astype(np.uint8), allow_pickle=False)
    return root


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--per-class", type=int, default=50, help="training images per class")
    p.add_argument("--test-per-class", type=int, default=None, help="test images per class (default per-class/5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corrupted", action="store_true", help="also write OUT_DIR/CIFAR-100-C in CIFAR-100-C's layout")
    p.add_argument("--per-severity", type=int, default=100, help="--corrupted: images per severity (default 100)")
    a = p.parse_args(argv)
    if a.per_class < 1 or a.per_severity < 1:
        p.error("--per-class and --per-severity must be at least 1")
    print(write_dataset(a.out_dir, a.per_class, a.test_per_class, a.seed))
    if a.corrupted:
        print(write_corrupted(a.out_dir, a.per_severity, a.seed))


if __name__ == "__main__":
    main()
