"""python -m training part1|part2|part3|robust --data-dir DIR --out runs/ [--epochs N --lr X ...]"""
import argparse
import logging
import sys

from .checkpoint import CheckpointError
from .data import DataError
from .models import WeightsUnavailable
from .recipes import RECIPES, options
from .train import train

RUN_OPTIONS = ("data_dir", "out", "download", "device", "resume", "wandb", "workers", "pause_after")


def parse_args(argv=None, prog="python -m training"):
    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("--data-dir", required=True, help="folder holding cifar-100-python/ (or to download it into)")
    run.add_argument("--out", default="runs", help="writes OUT/PART/{best.pt,last.pt,metrics.json,curves.png}")
    run.add_argument("--download", action="store_true", help="download CIFAR-100 if it is not in --data-dir")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    run.add_argument("--resume", action="store_true", help="continue from OUT/PART/last.pt")
    run.add_argument("--wandb", choices=["offline", "online", "disabled"], default=None,
                     help="wandb mode (default: $WANDB_MODE, else offline)")
    run.add_argument("--workers", type=int, default=None,
                     help="data-loader worker processes per training process (default: its share of the cores, "
                          "less one for the training step; 1 to 16)")
    run.add_argument("--pause-after", type=int, default=None, metavar="N",
                     help="stop after N epochs of this run; continue later with --resume")

    p = argparse.ArgumentParser(prog=prog, description="Train a CIFAR-100 recipe.",
                                epilog=f"`{prog} PART --help` lists every recipe option with that part's default.")
    parts = p.add_subparsers(dest="part", required=True, metavar="PART")
    for part, recipe_cls in RECIPES.items():
        cmd = parts.add_parser(part, parents=[run], help=recipe_cls.__doc__, description=recipe_cls.__doc__)
        group = cmd.add_argument_group(f"recipe (defaults: {part})")
        for name, parse, default, meaning in options(recipe_cls):
            # SUPPRESS: only the options given reach the recipe (a resumed run keeps its saved values).
            group.add_argument("--" + name.replace("_", "-"), type=parse, default=argparse.SUPPRESS,
                               metavar=parse.__name__.upper(), help=f"{meaning} (default: {'none' if default is None else default})")
    args = vars(p.parse_args(argv))
    part = args.pop("part")
    run = {k: args.pop(k) for k in RUN_OPTIONS}
    return part, run, args


def main(argv=None, prog="python -m training"):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    part, run, overrides = parse_args(argv, prog)
    try:
        train(part, run["data_dir"], run["out"], overrides, device=run["device"], resume=run["resume"],
              wandb_mode=run["wandb"], workers=run["workers"], download=run["download"],
              pause_after=run["pause_after"])
    except (DataError, CheckpointError, WeightsUnavailable) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
