"""The one preprocessing step shared by training, export and serving.

Every model artifact takes uint8 images N×H×W×3 (NHWC, RGB, normally 32×32) and does the rest on
its own device: scale to [0, 1], normalise with the CIFAR-100 training-set statistics and, when
the recipe trains at another resolution, resize bilinearly. Clients never normalise.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .contract import INPUT

# Published CIFAR-100 training-set channel statistics (RGB, on [0, 1] pixels); we use these
# fixed values rather than recomputing them so every artifact agrees bit for bit.
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


class Preprocess(nn.Module):
    def __init__(self, resolution=32, mean=CIFAR100_MEAN, std=CIFAR100_STD):
        super().__init__()
        self.resolution = resolution
        self.mean, self.std = tuple(mean), tuple(std)
        std_t = torch.tensor(std).view(1, 3, 1, 1)
        # (x / 255 - mean) / std folded into one multiply-add.
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("shift", -torch.tensor(mean).view(1, 3, 1, 1) / std_t, persistent=False)

    def forward(self, images):
        # NHWC -> NCHW is a view whose memory is already channels_last: no copy.
        x = images.permute(0, 3, 1, 2).to(self.scale.dtype)
        x = x * self.scale + self.shift
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        return x

    def constants(self):
        """What a checkpoint or an exported artifact records about this step."""
        return {"resolution": self.resolution, "mean": list(self.mean), "std": list(self.std),
                "input": INPUT}
