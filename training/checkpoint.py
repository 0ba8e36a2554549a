"""Checkpoints: plain dicts of tensors and primitives, written atomically, read with weights_only=True."""
import dataclasses
import hashlib
from pathlib import Path

import torch

from .files import atomic_path
from .models import build_classifier
from .recipes import RECIPES, recipe_from_dict


class CheckpointError(Exception):
    pass


def save_checkpoint(path, state):
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path, map_location="cpu"):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        reason = str(e)
        if "GLOBAL" in reason:  # torch's advice to drop weights_only is not ours to give
            reason = "it holds objects other than tensors and plain containers (refused by weights_only=True)"
        elif "Weights only load failed" in reason:
            reason = "not a torch.save file"
        else:
            reason = reason.splitlines()[0].split(". ")[0]
        raise CheckpointError(f"{path} is not a readable checkpoint: {reason}") from None
    if not isinstance(ckpt, dict) or not {"model", "recipe", "classes"} <= ckpt.keys():
        raise CheckpointError(f"{path} is not a checkpoint of this project (needs model, recipe, classes)")
    return ckpt


def checkpoint_state(model, recipe, classes, **extra):
    """The fields every checkpoint carries; training adds optimizer, scheduler and history."""
    return {"model": model.state_dict(), "recipe": dataclasses.asdict(recipe), "classes": list(classes),
            "preprocess": model.preprocess.constants(), **extra}


def load_classifier(path, device="cpu"):
    """(model in eval mode, checkpoint dict) from a checkpoint of any part."""
    ckpt = load_checkpoint(path)
    model = build_classifier(recipe_from_dict(ckpt["recipe"]), pretrained=False)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the recipe's model: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), ckpt


def save_random_checkpoint(path, part="part1", seed=0, metrics=None, **overrides):
    """A checkpoint of PART's model with random weights (nothing downloaded, nothing trained), for tests and
    benchmarks, where the plumbing and the speed matter. It records no accuracy unless METRICS says one."""
    from .synthetic import CLASSES

    recipe = RECIPES[part](**{**overrides, "weights": "none"})
    torch.manual_seed(seed)
    model = build_classifier(recipe)
    save_checkpoint(path, checkpoint_state(model, recipe, CLASSES, metrics={"epoch": 0, **(metrics or {})}))
    return Path(path)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
