"""The three recipes of the report, as data. One training loop (train.py) serves them all.

Every field of `Recipe` is a command-line option (`python -m training part3 --help` shows each one's meaning
and that part's default); the parts change only defaults.
"""
import dataclasses
import typing
from dataclasses import dataclass


def knob(default, help):
    """A recipe field with the one line `--help` shows for it."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class Recipe:
    name: str = ""
    arch: str = knob("simple_cnn", "network: simple_cnn | resnet18 | resnet50")
    weights: str = knob("none", "initial weights: none | imagenet (torchvision's, from $TORCH_HOME or downloaded)")
    resolution: int = knob(32, "the network's input size in px; the model resizes the 32 px images itself")
    epochs: int = knob(5, "epochs to train (at most, with early stopping)")
    batch_size: int | None = knob(None, "images per step; none: the largest power of two that fits (finder)")
    batch_size_cap: int = knob(256, "the batch-size finder's upper bound")
    optimizer: str = knob("sgd", "sgd | adamw")
    lr: float = knob(0.01, "learning rate (the peak, after any warm-up)")
    momentum: float = knob(0.9, "SGD momentum")
    weight_decay: float = knob(0.0, "weight decay")
    schedule: str = knob("step", "learning-rate schedule, stepped once per epoch: step | cosine | warmup_restarts")
    step_gamma: float = knob(0.9, "step: learning rate multiplied by this every epoch")
    warmup_epochs: int = knob(5, "warmup_restarts: epochs of linear warm-up")
    restart_period: int = knob(10, "warmup_restarts: epochs of the first cosine cycle")
    restart_mult: int = knob(2, "warmup_restarts: each cycle this many times longer than the last")
    min_lr: float = knob(1e-6, "cosine schedules: the lowest learning rate")
    label_smoothing: float = knob(0.0, "label smoothing of the cross-entropy loss")
    grad_clip: float | None = knob(None, "clip the gradient norm to this; none: no clipping")
    mixup_alpha: float = knob(0.0, "mixup Beta(alpha, alpha); 0: no mixup")
    augment: str = knob("none", "training augmentation: none | standard | staged")
    strong_augment_from: int = knob(30, "staged: the epoch from which the strong augmentation applies")
    dropout: float = knob(0.0, "dropout before the final layer (ResNets)")
    trainable_tail: int | None = knob(None, "train only the last N parameter tensors; none: all")
    early_stop_patience: int | None = knob(None, "stop after N epochs without a lower validation loss; none: never")
    val_fraction: float = knob(0.1, "share of the training set held out for validation (seeded)")
    seed: int = knob(0, "seed of the split, the initial weights and every epoch's randomness")


@dataclass
class Part1(Recipe):
    """Simple CNN, plain SGD, no regularisation (5 epochs)."""
    name: str = "part1"


@dataclass
class Part2(Recipe):
    """ResNet-18 from scratch at 224 px (AdamW, cosine, 5 epochs)."""
    name: str = "part2"
    arch: str = "resnet18"
    resolution: int = 224
    batch_size: int | None = 128
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    augment: str = "standard"
    dropout: float = 0.5


@dataclass
class Part3(Recipe):
    """ImageNet-pretrained ResNet-50 fine-tune at 224 px (last 50 tensors, mixup, warm restarts, early stop)."""
    name: str = "part3"
    arch: str = "resnet50"
    weights: str = "imagenet"
    resolution: int = 224
    epochs: int = 200
    batch_size: int | None = 32
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "warmup_restarts"
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0
    mixup_alpha: float = 0.2
    augment: str = "staged"
    dropout: float = 0.5
    trainable_tail: int | None = 50
    early_stop_patience: int | None = 40


RECIPES = {"part1": Part1, "part2": Part2, "part3": Part3}


def recipe_from_dict(d):
    """Rebuild a recipe saved in a checkpoint (as a plain dict)."""
    return RECIPES[d["name"]](**d)


def options(recipe_cls):
    """(field name, parser, default, help) for each recipe field, for the command line: `--lr 0.1`,
    `--grad-clip none`. The help line is the base Recipe's; the default is RECIPE_CLS's."""
    hints = typing.get_type_hints(recipe_cls)
    helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(Recipe)}
    out = []
    for f in dataclasses.fields(recipe_cls):
        if f.name == "name":
            continue
        kinds = [t for t in typing.get_args(hints[f.name]) if t is not type(None)] or [hints[f.name]]
        optional = len(typing.get_args(hints[f.name])) > 1
        out.append((f.name, _parser(kinds[0], optional), f.default, helps[f.name]))
    return out


def _parser(kind, optional):
    def parse(text):
        if optional and text.lower() == "none":
            return None
        return kind(text)
    parse.__name__ = kind.__name__
    return parse
