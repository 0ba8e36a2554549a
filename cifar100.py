"""The `cifar100` command, and the functions a notebook calls.

    cifar100 train part1 --data-dir data --out runs          # python -m training
    cifar100 export all --checkpoint runs/part1/best.pt       # python -m export
    cifar100 serve                                            # python -m serving.up
    cifar100 score --ood-dir data/ood --out submission.csv    # python -m serving.score
    cifar100 loadtest --host http://127.0.0.1:3000            # python -m loadtest

    from cifar100 import train, export_all, score
    metrics = train("part1", "data", epochs=2)
    model = export_all("runs/part1/best.pt")
    figures = score("http://127.0.0.1:3000", "data/ood", "submission.csv")
"""
import argparse
import importlib
import sys

__version__ = "0.1.0"

# command: (the module whose main(argv, prog) runs it, what it does)
COMMANDS = {
    "train": ("training.__main__", "train a recipe (part1, part2, part3, robust) on CIFAR-100"),
    "export": ("export.__main__", "a checkpoint to ONNX, FP16 ONNX, TensorRT and the BentoML model store"),
    "serve": ("serving.up", "the main job: a model in the store (trained and exported if there is none), then "
                            "the service with its web page at /ui"),
    "score": ("serving.score", "the Kaggle test set through the service (or a model) -> submission.csv"),
    "loadtest": ("loadtest.__main__", "Locust against a running service: latency and throughput reports"),
}
# Imported when first used, so that `cifar100 --help` stays quick.
FUNCTIONS = {"export_all": "export", "score": "serving.score"}


def train(recipe, data_dir, out="runs", *, device="auto", resume=False, wandb_mode=None, workers=None, download=False,
          pause_after=None, **options):
    """Train RECIPE (part1, part2, part3 or robust) on the CIFAR-100 in DATA_DIR, writing OUT/RECIPE/best.pt,
    last.pt, metrics.json and curves.png. OPTIONS change the recipe (epochs=2, lr=0.01, batch_size=64, ...:
    `cifar100 train RECIPE --help` lists them). Returns the metrics, or None when paused after PAUSE_AFTER epochs."""
    from training.recipes import RECIPES
    from training.train import train as run

    if recipe not in RECIPES:
        raise ValueError(f"no recipe {recipe!r}; one of {', '.join(RECIPES)}")
    return run(recipe, data_dir, out, options, device=device, resume=resume, wandb_mode=wandb_mode, workers=workers,
               download=download, pause_after=pause_after)


def __getattr__(name):
    if name in FUNCTIONS:
        return getattr(importlib.import_module(FUNCTIONS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():   # a notebook's completion lists the functions imported on first use too
    return sorted([*globals(), *FUNCTIONS])


def parser():
    p = argparse.ArgumentParser(prog="cifar100", description="Train CIFAR-100 classifiers, export them to ONNX and "
                                "TensorRT, serve them with BentoML, score the Kaggle test set.",
                                epilog="`cifar100 COMMAND --help` lists the command's options.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = p.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)
    for name, (module, meaning) in COMMANDS.items():
        commands.add_parser(name, add_help=False, help=f"{meaning} (python -m {module.removesuffix('.__main__')})")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        argv = [parser().parse_args(argv).command]   # --help, --version and usage errors exit here
    name, *rest = argv
    return importlib.import_module(COMMANDS[name][0]).main(rest, prog=f"cifar100 {name}")


if __name__ == "__main__":
    sys.exit(main())
