"""python -m training part1|part2|part3 --data-dir DIR --out runs/ [--epochs N --lr X ...]"""
import argparse
import logging
import sys

from .checkpoint import CheckpointError
from .data import DataError
from .models import WeightsUnavailable
from .recipes import RECIPES, Recipe, field_types
from .train import train


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m training", description="Train a CIFAR-100 recipe.")
    p.add_argument("part", choices=sorted(RECIPES))
    p.add_argument("--data-dir", required=True, help="folder holding cifar-100-python/ (or to download it into)")
    p.add_argument("--out", default="runs", help="writes OUT/PART/{best.pt,last.pt,metrics.json,curves.png}")
    p.add_argument("--download", action="store_true", help="download CIFAR-100 if it is not in --data-dir")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--resume", action="store_true", help="continue from OUT/PART/last.pt")
    p.add_argument("--wandb", choices=["offline", "online", "disabled"], default=None,
                   help="wandb mode (default: $WANDB_MODE, else offline)")
    p.add_argument("--workers", type=int, default=2, help="data-loader worker processes")
    recipe = p.add_argument_group("recipe (defaults depend on the part)")
    for name, parse in field_types(Recipe):
        recipe.add_argument("--" + name.replace("_", "-"), type=parse, default=argparse.SUPPRESS)
    args = vars(p.parse_args(argv))
    run = {k: args.pop(k) for k in ("part", "data_dir", "out", "download", "device", "resume", "wandb", "workers")}
    return run, args


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run, overrides = parse_args(argv)
    try:
        train(run["part"], run["data_dir"], run["out"], overrides, device=run["device"], resume=run["resume"],
              wandb_mode=run["wandb"], workers=run["workers"], download=run["download"])
    except (DataError, CheckpointError, WeightsUnavailable) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
