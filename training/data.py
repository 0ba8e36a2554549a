"""CIFAR-100 in its official python format, the validation split and the recipes' augmentation (CIFAR-100-C's facts:
cifar100c.py)."""
import logging
import pickle
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from .contract import NUM_CLASSES
from .download import DownloadError, download_and_extract

# torchvision 0.29 warns on every JPEG encode that its image codecs will move to TorchCodec: once per image, in
# every data-loader worker. The codec is what v2.JPEG needs here (torchvision is pinned).
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated")

log = logging.getLogger(__name__)

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"  # published with the archive
FOLDER = "cifar-100-python"


class DataError(Exception):
    pass


@dataclass
class Cifar100:
    train_images: np.ndarray  # uint8 N×32×32×3
    train_labels: np.ndarray  # int64 N (fine labels)
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list


class _ArrayUnpickler(pickle.Unpickler):
    """The CIFAR pickles hold only dicts, lists, strings and numpy arrays; refuse anything else."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _read_pickle(path):
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"missing {path}") from None
    except Exception as e:
        raise DataError(f"{path} is not a CIFAR-100 python pickle: {e}") from None
    # Python 2 pickles give str keys under latin1, Python 3 ones may carry bytes keys.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_split(path):
    d = _read_pickle(path)
    try:
        data = np.asarray(d["data"], dtype=np.uint8)
        labels = np.asarray(d["fine_labels"], dtype=np.int64)
    except KeyError as e:
        raise DataError(f"{path} lacks the key {e}") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"{path}: expected data N×3072 and N labels, got {data.shape} and {len(labels)}")
    # Rows are 1024 red, 1024 green, 1024 blue values (row-major 32×32 planes).
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def locate(data_dir):
    """The folder holding train/test/meta: DATA_DIR/cifar-100-python or DATA_DIR itself."""
    data_dir = Path(data_dir)
    return data_dir / FOLDER if (data_dir / FOLDER).is_dir() else data_dir


def load_cifar100(data_dir, download=False):
    root = locate(data_dir)
    if download and not (root / "train").exists():
        log.info("downloading CIFAR-100 to %s", data_dir)
        try:
            download_and_extract(URL, data_dir, MD5, FOLDER)
        except (DownloadError, OSError, tarfile.TarError) as e:
            raise DataError(f"could not download CIFAR-100 from {URL}: {e}") from None
        root = locate(data_dir)
    if not (root / "train").exists():
        raise DataError(f"no CIFAR-100 at {data_dir} (expected {FOLDER}/train, test, meta); "
                        "pass --download, or make a synthetic set with `python -m training.synthetic DIR`")
    train_images, train_labels = _read_split(root / "train")
    test_images, test_labels = _read_split(root / "test")
    classes = list(_read_pickle(root / "meta").get("fine_label_names", []))
    if len(classes) != 100:
        raise DataError(f"{root / 'meta'}: expected 100 fine_label_names, got {len(classes)}")
    for labels in (train_labels, test_labels):
        if len(labels) and (labels.min() < 0 or labels.max() > 99):
            raise DataError(f"{root}: fine labels outside 0..99")
    log.info("CIFAR-100 from %s: %d train, %d test images", root, len(train_labels), len(test_labels))
    return Cifar100(train_images, train_labels, test_images, test_labels, classes)


def split_train_val(n, fraction=0.1, seed=0):
    """Seeded split of range(n) into (train indices, validation indices)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    n_val = int(round(n * fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def build_transform(recipe, epoch):
    """The training augmentation for this recipe at this epoch (on uint8 3×32×32 tensors)."""
    basic = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]
    if recipe.augment == "none":
        return None
    if recipe.augment == "standard":
        return v2.Compose([v2.RandomHorizontalFlip(), v2.RandomCrop(32, padding=4),
                           v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1)])
    if recipe.augment == "staged":
        if epoch < recipe.strong_augment_from:
            return v2.Compose(basic)
        return v2.Compose(basic + [v2.RandomRotation(15),
                                   v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1),
                                   v2.RandomErasing(p=0.25)])
    if recipe.augment == "robust":   # the kinds of damage the corrupted test set holds, now and then
        noise = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.GaussianNoise(sigma=0.06),
                            v2.ToDtype(torch.uint8, scale=True)])   # GaussianNoise works on [0, 1] floats
        p = recipe.corrupt_p
        return v2.Compose([v2.RandomCrop(32, padding=4, padding_mode="reflect"), v2.RandomHorizontalFlip(),
                           v2.AugMix(), v2.RandomApply([v2.JPEG((20, 90))], p=p),
                           v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 1.5))], p=p), v2.RandomApply([noise], p=p)])
    raise ValueError(f"unknown augment {recipe.augment!r}")


def batch_mixer(recipe):
    """CutMix and/or MixUp on a training batch (one or the other per batch when both are on), or None.
    (uint8 images N×H×W×C, labels N) -> (float images on the 0..255 scale, soft targets N×classes)."""
    mixers = [v2.MixUp(alpha=recipe.mixup_alpha, num_classes=NUM_CLASSES)] if recipe.mixup_alpha > 0 else []
    mixers += [v2.CutMix(alpha=recipe.cutmix_alpha, num_classes=NUM_CLASSES)] if recipe.cutmix_alpha > 0 else []
    if not mixers:
        return None
    mix = mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)

    def mixed(images, labels):
        chw, targets = mix(images.permute(0, 3, 1, 2).float(), labels)   # torchvision cuts boxes in C×H×W
        return chw.permute(0, 2, 3, 1), targets
    return mixed


class ImageDataset(torch.utils.data.Dataset):
    """uint8 N×32×32×3 images and labels; yields (uint8 32×32×3 tensor, label)."""

    def __init__(self, images, labels, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = torch.from_numpy(self.images[i])
        if self.transform is not None:
            image = self.transform(image.permute(2, 0, 1)).permute(1, 2, 0).contiguous()
        return image, int(self.labels[i])


def epoch_seed(seed, epoch):
    """The seed of an epoch's randomness (the training loop's, and each image's augmentation derives from it): a
    function of the recipe's seed and the epoch, so a resumed run repeats an uninterrupted one."""
    return seed * 100_003 + epoch


class TrainingImages(ImageDataset):
    """The training set with the recipe's augmentation for the epoch in each key (EpochSampler's (epoch, index)),
    so that persistent loader workers follow the epochs. Each image's randomness is seeded from (seed, epoch,
    index): the same images come out whatever the worker count, and a resumed run repeats an uninterrupted one."""

    def __init__(self, images, labels, recipe):
        super().__init__(images, labels)
        self.recipe, self.epoch = recipe, None

    def __getitem__(self, key):
        epoch, i = key
        if epoch != self.epoch:
            self.epoch, self.transform = epoch, build_transform(self.recipe, epoch)
        if self.transform is None:
            return super().__getitem__(i)
        with torch.random.fork_rng(devices=[]):   # the training loop's own random stream is left alone
            torch.manual_seed(epoch_seed(self.recipe.seed, epoch) * len(self) + i)
            return super().__getitem__(i)


class EpochSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (one process: num_replicas=1) whose keys carry the epoch: (epoch, index)."""

    def __iter__(self):
        return ((self.epoch, i) for i in super().__iter__())
