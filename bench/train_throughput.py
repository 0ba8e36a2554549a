"""Training images/s per recipe on this device (random data, the real training step: the recipe's batch mixing,
optimiser and weight averaging; not the data loader's augmentation, which runs in its worker processes).

    python bench/train_throughput.py [--parts part1,part2,part3,robust] [--steps 20] [--json out.json]
"""
import argparse
import platform

import torch

from training.contract import NUM_CLASSES, random_images
from training.files import write_json
from training.models import build_classifier
from training.recipes import RECIPES
from training.data import batch_mixer
from training.train import build_optimizer, train_one_epoch


def measure(part, device, steps, batch_size=None, resolution=None):
    overrides = {"weights": "none"}   # random weights: the speed is the same, nothing to download
    if resolution:
        overrides["resolution"] = resolution
    recipe = RECIPES[part](**overrides)
    batch_size = batch_size or recipe.batch_size or recipe.batch_size_cap
    model = build_classifier(recipe).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(recipe, model)
    batch = (torch.from_numpy(random_images(batch_size)), torch.randint(0, NUM_CLASSES, (batch_size,)))
    no_bar = lambda it: it
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(recipe.ema_decay)) if recipe.ema_decay else None
    step = dict(mixer=batch_mixer(recipe), after_step=(lambda: ema.update_parameters(model)) if ema else lambda: None)
    train_one_epoch(model, [batch] * 3, optimizer, recipe, device, no_bar, **step)  # warm-up (cuDNN, allocator)
    stats = train_one_epoch(model, [batch] * steps, optimizer, recipe, device, no_bar, **step)
    return {"part": part, "arch": recipe.arch, "resolution": recipe.resolution, "batch_size": batch_size,
            "steps": steps, "images_per_s": stats["images_per_s"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="part1,part2,part3,robust")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    p.add_argument("--resolution", type=int, default=None, help="default: the recipe's (224 for parts 2, 3, robust)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    device = torch.device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'} x{torch.get_num_threads()} threads"
    rows = [measure(part, device, a.steps, a.batch_size, a.resolution) for part in a.parts.split(",")]
    print(f"training throughput on {name} (torch {torch.__version__})")
    print(f"{'part':6} {'arch':11} {'px':>4} {'batch':>6} {'img/s':>10}")
    for r in rows:
        print(f"{r['part']:6} {r['arch']:11} {r['resolution']:>4} {r['batch_size']:>6} {r['images_per_s']:>10.0f}")
    if a.json:
        write_json(a.json, {"device": name, "torch": torch.__version__, "results": rows})


if __name__ == "__main__":
    main()
