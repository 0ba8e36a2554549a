"""The networks, each behind the shared Preprocess: uint8 N×32×32×3 in, logits N×100 out; and flip test-time
augmentation, a wrapper that keeps that contract."""

import torch
from torch import nn
from torchvision import models

from .contract import NUM_CLASSES
from .preprocess import Preprocess


class SimpleCNN(nn.Module):
    """Part 1: three 3×3 conv blocks (32, 64, 128 channels, each ReLU + 2×2 max-pool), FC 256, FC 100."""

    def __init__(self, resolution=32, num_classes=NUM_CLASSES):
        super().__init__()
        blocks, channels = [], 3
        for width in (32, 64, 128):
            blocks += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(128 * (resolution // 8) ** 2, 256),
                                        nn.ReLU(inplace=True), nn.Linear(256, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class Classifier(nn.Module):
    """What every checkpoint and artifact holds: the preprocessing followed by the network."""

    def __init__(self, net, preprocess):
        super().__init__()
        self.preprocess, self.net = preprocess, net

    def forward(self, images):
        return self.net(self.preprocess(images))


def with_mirrors(images):
    """The batch followed by its mirror images (NHWC: dimension 2 is the width): 2N images."""
    return torch.cat([images, images.flip(2)])


def mean_of_mirrors(logits):
    """Logits of with_mirrors(images) -> the mean over each image and its mirror: N rows."""
    n = logits.shape[0] // 2
    return (logits[:n] + logits[n:]) / 2


class FlipAveraged(nn.Module):
    """Flip test-time augmentation: the mean of the logits of each image and its mirror, in one call of 2N images.
    Same contract as the model it wraps."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return mean_of_mirrors(self.model(with_mirrors(images)))


TTA = {"none": lambda model: model, "flip": FlipAveraged}   # contract.TTA's names: the wrapper of each


class WeightsUnavailable(Exception):
    pass


def _imagenet_resnet50(name):
    weights = getattr(models.ResNet50_Weights, name)
    try:  # from TORCH_HOME's cache, else downloaded
        return models.resnet50(weights=weights)
    except Exception as e:
        raise WeightsUnavailable(
            f"ImageNet ResNet-50 weights ({weights.url}) are neither cached in TORCH_HOME nor downloadable: "
            f"{e}. Put the file in $TORCH_HOME/hub/checkpoints/ or pass --weights none.") from None


def build_network(recipe):
    if recipe.arch == "simple_cnn":
        return SimpleCNN(recipe.resolution)
    if recipe.arch == "resnet18":
        net = models.resnet18(weights=None)
        net.fc = nn.Sequential(nn.Dropout(recipe.dropout), nn.Linear(512, NUM_CLASSES))
        return net
    if recipe.arch == "resnet50":
        if recipe.weights in ("IMAGENET1K_V1", "IMAGENET1K_V2"):
            net = _imagenet_resnet50(recipe.weights)
        elif recipe.weights == "none":
            net = models.resnet50(weights=None)
        else:
            raise ValueError(f"unknown weights {recipe.weights!r} (IMAGENET1K_V1 | IMAGENET1K_V2 | none)")
        net.fc = nn.Sequential(nn.Dropout(recipe.dropout), nn.BatchNorm1d(2048), nn.Linear(2048, NUM_CLASSES))
        return net
    raise ValueError(f"unknown arch {recipe.arch!r}")


def head(net):
    """The network's last layer, new for CIFAR-100 in every recipe (its learning rate may differ: head_lr_mult)."""
    return net.fc if hasattr(net, "fc") else net.classifier[-1]


def freeze_all_but_last(module, n):
    """Only the last n parameter tensors (in definition order) keep requires_grad."""
    params = list(module.parameters())
    for i, p in enumerate(params):
        p.requires_grad_(i >= len(params) - n)


def build_classifier(recipe, pretrained=True):
    """The recipe's model. pretrained=False skips downloading weights (a checkpoint will overwrite them)."""
    if not pretrained and recipe.weights != "none":
        recipe = type(recipe)(**{**vars(recipe), "weights": "none"})
    net = build_network(recipe)
    if recipe.trainable_tail is not None:
        freeze_all_but_last(net, recipe.trainable_tail)
    return Classifier(net, Preprocess(recipe.resolution))
