"""Part 1 against the robust recipe (and variants of it), trained alike on generated data: clean and corrupted
accuracy side by side.

    python -m bench.robustness [--variants part1,robust | all] [--steps 300] [--seeds 0,1,2] [--json FILE]

Every variant gets the same small network (Part 1's CNN at 32 px, random initial weights), steps and batch size,
on the generated CIFAR-100 look-alike (training/synthetic.py); each best checkpoint is then scored by serving.score
on the generated CIFAR-100-C-format folder. What differs is the training: the robust recipe adds AugMix with
noise, JPEG and blur, CutMix/MixUp, label smoothing, one warm-up + cosine cycle and the EMA of the weights; its
variants turn the EMA and/or CutMix/MixUp off. With several seeds each figure is the mean (and the range). Generated
data: the figures say how the recipe behaves, not what it scores on the real CIFAR-100-C.
"""
import argparse
import json
import math
import os
import statistics
from pathlib import Path

from serving import score
from training.data import split_train_val
from training.files import write_json
from training.recipes import Recipe
from training.synthetic import write_corrupted, write_dataset
from training.train import train

SMALL = {"arch": "simple_cnn", "weights": "none", "resolution": 32}
NO_EMA, NO_MIX = {"ema_decay": None}, {"mixup_alpha": 0.0, "cutmix_alpha": 0.0}
# name: (recipe, what it changes beyond SMALL)
VARIANTS = {"part1": ("part1", {}), "robust": ("robust", {"warmup_epochs": 1}),
            "robust-no-ema": ("robust", {"warmup_epochs": 1, **NO_EMA}),
            "robust-no-mix": ("robust", {"warmup_epochs": 1, **NO_MIX}),
            "robust-no-ema-no-mix": ("robust", {"warmup_epochs": 1, **NO_EMA, **NO_MIX})}
FIGURES = ("clean", "corrupted_19", "corrupted_15", "train_img_per_s")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.robustness", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__[__doc__.index("\n"):])
    p.add_argument("--variants", default="part1,robust", help=f"comma-separated, or all: {', '.join(VARIANTS)}")
    p.add_argument("--per-class", type=int, default=100, help="generated training images per class")
    p.add_argument("--per-severity", type=int, default=200, help="generated corrupted test images per severity")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=10)
    length.add_argument("--steps", type=int, help="the run's length in optimiser steps (rounded to whole epochs)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seeds", default="0", help="comma-separated training seeds (default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="data-loader workers")
    p.add_argument("--out", default="build/robustness", help="data, runs and reports (default %(default)s)")
    p.add_argument("--json", help="write the figures here (default OUT/robustness.json)")
    a = p.parse_args(argv)
    a.variants = list(VARIANTS) if a.variants == "all" else a.variants.split(",")
    if unknown := set(a.variants) - set(VARIANTS):
        p.error(f"unknown variant(s) {', '.join(sorted(unknown))}; one of {', '.join(VARIANTS)}")
    a.seeds = [int(s) for s in a.seeds.split(",")]
    return a


def run_one(variant, seed, epochs, a, data, out):
    part, changes = VARIANTS[variant]
    overrides = {**SMALL, **changes, "epochs": epochs, "batch_size": a.batch_size, "seed": seed}
    runs = out / "runs" / variant / f"seed{seed}"
    metrics = train(part, data, runs, overrides, device="cpu", workers=a.workers)
    report_dir = out / "reports" / variant / f"seed{seed}"
    score.main(["--direct", str(runs / part / "best.pt"), "--ood-dir", str(data), "--out",
                str(report_dir / "scores.csv"), "--report", str(report_dir), "--clean", str(data)])
    report = json.loads((report_dir / "report.json").read_text())
    return {"clean": report["clean"], "corrupted_19": report["mean"], "corrupted_15": report["mean_15"],
            "per_corruption": {n: row["mean"] for n, row in report["corruptions"].items()},
            "train_img_per_s": metrics["images_per_s"]}


def main(argv=None):
    a = parse_args(argv)
    out = Path(a.out)
    data = out / "data"
    if not (data / "CIFAR-100-C").is_dir():
        write_dataset(data, per_class=a.per_class)
        write_corrupted(data, per_severity=a.per_severity)
    os.environ.setdefault("WANDB_MODE", "disabled")
    n_train = len(split_train_val(a.per_class * 100, Recipe.val_fraction)[0])
    steps_per_epoch = math.ceil(n_train / a.batch_size)
    epochs = max(1, round(a.steps / steps_per_epoch)) if a.steps else a.epochs
    results = {}
    for variant in a.variants:
        runs = [run_one(variant, seed, epochs, a, data, out) for seed in a.seeds]
        results[variant] = {k: statistics.mean(r[k] for r in runs) for k in FIGURES}
        results[variant].update(seeds=a.seeds, runs=runs, epochs=epochs, steps=epochs * steps_per_epoch,
                                **{f"{k}_range": [min(r[k] for r in runs), max(r[k] for r in runs)]
                                   for k in FIGURES[:3]})
    print(f"\ngenerated data: {a.per_class} training images per class, {epochs} epochs = {epochs * steps_per_epoch} "
          f"steps of {a.batch_size}, Part 1's CNN for every variant, seeds {a.seeds} (mean; range over the seeds)")
    print(f"{'variant':<21} {'clean':>15} {'corrupted (19)':>15} {'corrupted (15)':>15} {'train img/s':>12}")
    for variant, r in results.items():
        cells = [f"{r[k]:.3f}" + (f" ({r[k + '_range'][1] - r[k + '_range'][0]:.3f})" if len(a.seeds) > 1 else "")
                 for k in FIGURES[:3]]
        print(f"{variant:<21} " + " ".join(f"{c:>15}" for c in cells) + f" {r['train_img_per_s']:>12.0f}")
    write_json(a.json or out / "robustness.json", {"config": vars(a), "results": results})


if __name__ == "__main__":
    main()
