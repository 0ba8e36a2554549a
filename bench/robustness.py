"""Part 1 against the robust recipe, trained alike on generated data: clean and corrupted accuracy side by side.

    python -m bench.robustness [--per-class 100] [--epochs 10] [--per-severity 200] [--json FILE]

Both recipes get the same small network (Part 1's CNN at 32 px, random initial weights), epochs and batch size, on
the generated CIFAR-100 look-alike (training/synthetic.py); each best checkpoint is then scored by serving.score on
the generated CIFAR-100-C-format folder. What differs is the robust recipe's training: AugMix with noise, JPEG and
blur, CutMix/MixUp, label smoothing, one warm-up + cosine cycle, the EMA of the weights. Generated data: the figures
say how the recipe behaves, not what it scores on the real CIFAR-100-C.
"""
import argparse
import json
import os
from pathlib import Path

from serving import score
from training.files import write_json
from training.synthetic import write_corrupted, write_dataset
from training.train import train

SMALL = {"arch": "simple_cnn", "weights": "none", "resolution": 32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.robustness", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__[__doc__.index("\n"):])
    p.add_argument("--per-class", type=int, default=100, help="generated training images per class")
    p.add_argument("--per-severity", type=int, default=200, help="generated corrupted test images per severity")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="data-loader workers")
    p.add_argument("--out", default="build/robustness", help="data, runs and reports (default %(default)s)")
    p.add_argument("--json", help="write the figures here (default OUT/robustness.json)")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    out = Path(a.out)
    data = out / "data"
    if not (data / "CIFAR-100-C").is_dir():
        write_dataset(data, per_class=a.per_class)
        write_corrupted(data, per_severity=a.per_severity)
    os.environ.setdefault("WANDB_MODE", "disabled")
    results = {}
    for part in ("part1", "robust"):
        overrides = {**SMALL, "epochs": a.epochs, "batch_size": a.batch_size}
        if part == "robust":
            overrides["warmup_epochs"] = 1
        metrics = train(part, data, out / "runs", overrides, device="cpu", workers=a.workers)
        report_dir = out / "reports" / part
        score.main(["--direct", str(out / "runs" / part / "best.pt"), "--ood-dir", str(data), "--out",
                    str(report_dir / "scores.csv"), "--report", str(report_dir), "--clean", str(data)])
        report = json.loads((report_dir / "report.json").read_text())
        results[part] = {"clean": report["clean"], "corrupted_19": report["mean"], "corrupted_15": report["mean_15"],
                         "per_corruption": {n: row["mean"] for n, row in report["corruptions"].items()},
                         "train_img_per_s": metrics["images_per_s"], "epochs": a.epochs}
    print(f"\ngenerated data: {a.per_class} training images per class, {a.epochs} epochs, Part 1's CNN for both")
    print(f"{'recipe':<8} {'clean':>7} {'corrupted (19)':>15} {'corrupted (15)':>15} {'train img/s':>12}")
    for part, r in results.items():
        print(f"{part:<8} {r['clean']:>7.3f} {r['corrupted_19']:>15.3f} {r['corrupted_15']:>15.3f} "
              f"{r['train_img_per_s']:>12.0f}")
    write_json(a.json or out / "robustness.json", {"config": vars(a), "results": results})


if __name__ == "__main__":
    main()
