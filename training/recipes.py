"""The recipes, as data: the report's three parts, faithful, and `robust`, a fine-tune for the corrupted test set
the course grades. One training loop (train.py) serves them all.

Every field of `Recipe` is a command-line option (`python -m training robust --help` shows each one's meaning
and that recipe's default); the recipes change only defaults.
"""
import dataclasses
import typing
from dataclasses import dataclass

# The weight average's decay after t updates is min(decay, (1 + t) / (EMA_WARMUP + t)): it follows the weights
# closely early on and reaches the recipe's decay only once the run is long enough. timm's warm-up uses 10; on
# 300 steps that average still lagged the trained weights by ~2 points, 30 kept it level (docs/training.md).
EMA_WARMUP = 30


def knob(default, help):
    """A recipe field with the one line `--help` shows for it."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class Recipe:
    name: str = ""
    arch: str = knob("simple_cnn", "network: simple_cnn | resnet18 | resnet50")
    weights: str = knob("none", "initial weights: none | IMAGENET1K_V1 | IMAGENET1K_V2 (torchvision's ResNet-50 "
                               "weights, from $TORCH_HOME or downloaded)")
    resolution: int = knob(32, "the network's input size in px; the model resizes the 32 px images itself")
    epochs: int = knob(5, "epochs to train (at most, with early stopping)")
    batch_size: int | None = knob(None, "images per step; none: the largest power of two that fits (finder)")
    batch_size_cap: int = knob(256, "the batch-size finder's upper bound")
    optimizer: str = knob("sgd", "sgd | adamw")
    lr: float = knob(0.01, "learning rate (the peak, after any warm-up)")
    head_lr_mult: float = knob(1.0, "the new head's learning rate is lr times this")
    momentum: float = knob(0.9, "SGD momentum")
    weight_decay: float = knob(0.0, "weight decay")
    schedule: str = knob("step", "learning-rate schedule: step | cosine | warmup_restarts (stepped once per epoch) | "
                                 "warmup_cosine (linear warm-up, then one cosine decay; stepped every batch)")
    step_gamma: float = knob(0.9, "step: learning rate multiplied by this every epoch")
    warmup_epochs: float = knob(5, "warmup_restarts, warmup_cosine: epochs of linear warm-up")
    restart_period: int = knob(10, "warmup_restarts: epochs of the first cosine cycle")
    restart_mult: int = knob(2, "warmup_restarts: each cycle this many times longer than the last")
    min_lr: float = knob(1e-6, "cosine schedules: the lowest learning rate")
    label_smoothing: float = knob(0.0, "label smoothing of the cross-entropy loss")
    grad_clip: float | None = knob(None, "clip the gradient norm to this; none: no clipping")
    mixup_alpha: float = knob(0.0, "MixUp on the batch, Beta(alpha, alpha); 0: none")
    cutmix_alpha: float = knob(0.0, "CutMix on the batch, Beta(alpha, alpha); 0: none (with MixUp: one or the other "
                                    "per batch)")
    augment: str = knob("none", "training augmentation: none | standard | staged | robust (AugMix, and now and "
                                "then noise, JPEG, blur)")
    corrupt_p: float = knob(0.1, "robust: the chance of each of Gaussian noise, JPEG and Gaussian blur per image")
    strong_augment_from: int = knob(30, "staged: the epoch from which the strong augmentation applies")
    dropout: float = knob(0.0, "dropout before the final layer (ResNets)")
    trainable_tail: int | None = knob(None, "train only the last N parameter tensors; none: all")
    ema_decay: float | None = knob(None, "keep an exponential moving average of the weights (per step) and validate, "
                                         "checkpoint and export it; its decay warms up, min(decay, (1+t)/"
                                         f"({EMA_WARMUP}+t)) after t steps, so that a short run is not held back "
                                         "by its first weights; none: off")
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
    weights: str = "IMAGENET1K_V1"      # the report's `pretrained=True`
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


@dataclass
class Robust(Recipe):
    """ImageNet ResNet-50 (V2 weights), every layer fine-tuned at 224 px for corrupted images: AugMix, noise, JPEG,
    blur, CutMix/MixUp, label smoothing, one warm-up + cosine cycle stepped per batch, EMA of the weights.
    CutMix/MixUp pay on long runs only: for a few hundred steps pass --mixup-alpha 0 --cutmix-alpha 0."""
    name: str = "robust"
    arch: str = "resnet50"
    weights: str = "IMAGENET1K_V2"
    resolution: int = 224
    epochs: int = 30
    batch_size: int | None = 256
    optimizer: str = "adamw"
    lr: float = 4e-4
    head_lr_mult: float = 10.0
    weight_decay: float = 0.05
    schedule: str = "warmup_cosine"
    warmup_epochs: float = 1
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    augment: str = "robust"
    dropout: float = 0.2
    ema_decay: float | None = 0.999


RECIPES = {"part1": Part1, "part2": Part2, "part3": Part3, "robust": Robust}


def recipe_from_dict(d):
    """Rebuild a recipe saved in a checkpoint (as a plain dict). Checkpoints written before the ImageNet weights
    were named say `imagenet`: those were torchvision's IMAGENET1K_V2."""
    d = {**d, "weights": "IMAGENET1K_V2" if d.get("weights") == "imagenet" else d.get("weights", "none")}
    return RECIPES[d["name"]](**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(Recipe)}})


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
