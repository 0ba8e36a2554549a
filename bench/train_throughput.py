"""Training images/s per recipe on this device: the training step (random data; the recipe's batch mixing,
optimiser and weight averaging) and, beside it, the data loader alone (the recipe's augmentation in its worker
processes). When the loader's img/s is the lower, the CPU holds the training back: add workers or cores.

    python bench/train_throughput.py [--parts part1,part2,part3,robust] [--steps 20] [--workers N] [--json out.json]
"""
import argparse
import platform
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from training.contract import NUM_CLASSES, random_images
from training.data import EpochSampler, TrainingImages, batch_mixer
from training.files import write_json
from training.models import build_classifier
from training.recipes import RECIPES
from training.train import build_ema, build_optimizer, default_workers, train_one_epoch


def step_speed(recipe, device, steps, batch_size):
    """img/s of the training step alone, on one batch of random images seen again and again."""
    model = build_classifier(recipe).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(recipe, model)
    batch = (torch.from_numpy(random_images(batch_size)), torch.randint(0, NUM_CLASSES, (batch_size,)))
    no_bar = lambda it: it
    ema = build_ema(recipe, model)
    step = dict(mixer=batch_mixer(recipe), after_step=(lambda: ema.update_parameters(model)) if ema else lambda: None)
    train_one_epoch(model, [batch] * 3, optimizer, recipe, device, no_bar, **step)  # warm-up (cuDNN, allocator)
    return train_one_epoch(model, [batch] * steps, optimizer, recipe, device, no_bar, **step)["images_per_s"]


def loader_speed(recipe, batch_size, workers, batches):
    """img/s of the training data loader alone: the recipe's augmentation in WORKERS processes (their start-up and
    the first batch are not timed)."""
    n = batch_size * (batches + 1)
    images = TrainingImages(random_images(n, seed=1), np.zeros(n, dtype=np.int64), recipe)
    loader = DataLoader(images, sampler=EpochSampler(images, num_replicas=1, rank=0), batch_size=batch_size,
                        num_workers=workers)
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    count = sum(len(labels) for _, labels in batches)
    return count / (time.perf_counter() - start)


def measure(part, device, steps, batch_size=None, resolution=None, workers=None, loader_batches=8):
    overrides = {"weights": "none"}   # random weights: the speed is the same, nothing to download
    if resolution:
        overrides["resolution"] = resolution
    recipe = RECIPES[part](**overrides)
    batch_size = batch_size or recipe.batch_size or recipe.batch_size_cap
    workers = default_workers() if workers is None else workers
    return {"part": part, "arch": recipe.arch, "resolution": recipe.resolution, "batch_size": batch_size,
            "steps": steps, "images_per_s": step_speed(recipe, device, steps, batch_size),
            "loader_images_per_s": loader_speed(recipe, batch_size, workers, loader_batches),
            "loader_workers": workers}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="part1,part2,part3,robust")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    p.add_argument("--resolution", type=int, default=None, help="default: the recipe's (224 for parts 2, 3, robust)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: what training would use)")
    p.add_argument("--loader-batches", type=int, default=8, help="timed batches of the loader")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    device = torch.device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'} x{torch.get_num_threads()} threads"
    rows = [measure(part, device, a.steps, a.batch_size, a.resolution, a.workers, a.loader_batches)
            for part in a.parts.split(",")]
    print(f"training throughput on {name} (torch {torch.__version__})")
    print(f"{'part':6} {'arch':11} {'px':>4} {'batch':>6} {'step img/s':>11} {'loader img/s':>13} {'workers':>8}  bound")
    for r in rows:
        bound = "loader (CPU)" if r["loader_images_per_s"] < r["images_per_s"] else "step"
        print(f"{r['part']:6} {r['arch']:11} {r['resolution']:>4} {r['batch_size']:>6} {r['images_per_s']:>11.0f} "
              f"{r['loader_images_per_s']:>13.0f} {r['loader_workers']:>8}  {bound}")
    if a.json:
        write_json(a.json, {"device": name, "torch": torch.__version__, "results": rows})


if __name__ == "__main__":
    main()
