"""The three recipes of the report, as data. One training loop (train.py) serves them all."""
import dataclasses
import typing
from dataclasses import dataclass


@dataclass
class Recipe:
    name: str = ""
    arch: str = "simple_cnn"            # simple_cnn | resnet18 | resnet50
    weights: str = "none"               # none | imagenet (torchvision weights)
    resolution: int = 32                # the network's input size; resize happens in Preprocess
    epochs: int = 5
    batch_size: int | None = None       # None: the batch-size finder picks one
    batch_size_cap: int = 256
    optimizer: str = "sgd"              # sgd | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "step"              # step | cosine | warmup_restarts (stepped once per epoch)
    step_gamma: float = 0.9
    warmup_epochs: int = 5
    restart_period: int = 10            # CosineAnnealingWarmRestarts T_0, in epochs
    restart_mult: int = 2
    min_lr: float = 1e-6
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    mixup_alpha: float = 0.0            # 0 turns mixup off
    augment: str = "none"               # none | standard | staged
    strong_augment_from: int = 30       # staged: basic before this epoch, strong from it on
    dropout: float = 0.0
    trainable_tail: int | None = None   # train only the last N parameter tensors
    early_stop_patience: int | None = None  # epochs without a lower validation loss
    val_fraction: float = 0.1
    seed: int = 0


@dataclass
class Part1(Recipe):
    """Simple CNN, plain SGD, no regularisation."""
    name: str = "part1"


@dataclass
class Part2(Recipe):
    """ResNet-18 from scratch at 224 px."""
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
    """ImageNet-pretrained ResNet-50 fine-tune at 224 px."""
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


def field_types(recipe_cls):
    """(field name, parser) for each recipe field, for the command line: `--lr 0.1`, `--grad-clip none`."""
    hints = typing.get_type_hints(recipe_cls)
    out = []
    for f in dataclasses.fields(recipe_cls):
        if f.name == "name":
            continue
        kinds = [t for t in typing.get_args(hints[f.name]) if t is not type(None)] or [hints[f.name]]
        out.append((f.name, _parser(kinds[0], optional=len(typing.get_args(hints[f.name])) > 1)))
    return out


def _parser(kind, optional):
    def parse(text):
        if optional and text.lower() == "none":
            return None
        return kind(text)
    parse.__name__ = kind.__name__
    return parse
