"""Datasets for MDEQ: CIFAR-10 pickles (zoo.common.cifar), ImageNet class folders, scikit-learn digits.

Nothing is downloaded. CIFAR-10 is read from the real `cifar-10-batches-py/` pickles
under `data.root` (the format torchvision writes, read here with `pickle`, so fixture
files work without torchvision's MD5 check); ImageNet from the standard `train/` and
`val/` class folders; the offline set is scikit-learn's 1797 real 8x8 digits with a
fixed stratified 80/20 split by seed. A missing dataset is a `MissingDataError` (zoo.common) that
names the files and layout expected.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from zoo.common.cifar import read_cifar10
from zoo.common.data import MissingDataError, require_files

# Recipe normalisation (TorchDEQ zoo MDEQ run.sh / the original MDEQ).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

OFFLINE_HINT = "Set data.root=/path/to/dir or run the offline experiment: +experiment=digits"
IMAGENET_LAYOUT = (
    "ImageNet in class folders under data.root:\n"
    "  <root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG\n"
    "(1000 class folders each; the val images sorted into class folders). "
    "Set data.root=/path/to/dir or run the offline experiment: +experiment=digits")


@dataclass
class DataSplits:
    """Train/test datasets and what the model needs to know about them."""

    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int


class CIFAR10Pickles(Dataset):
    """CIFAR-10 from `root/cifar-10-batches-py/`; items are (transform(PIL image), label)."""

    def __init__(self, root: str, train: bool, transform: Optional[Callable] = None):
        self.images, self.labels = read_cifar10(root, train, hint=OFFLINE_HINT)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def cifar_transforms(train: bool, augment: bool):
    """Recipe transforms: random crop (pad 4) + horizontal flip when augmenting, then
    ToTensor and the CIFAR normalisation."""
    from torchvision import transforms as T

    steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if (train and augment) else []
    return T.Compose(steps + [T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])


def imagenet_transforms(train: bool, image_size: int = 224):
    """RandomResizedCrop (area 0.1-1, aspect 0.8-1.25) + flip for training; resize 256 and
    center crop 224 for validation; ImageNet normalisation."""
    from torchvision import transforms as T

    if train:
        steps = [T.RandomResizedCrop(image_size, scale=(0.1, 1.0), ratio=(0.8, 1.25)),
                 T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(int(round(image_size * 256 / 224))), T.CenterCrop(image_size)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def imagenet_folder(root: str, train: bool, image_size: int = 224) -> Dataset:
    """ImageNet `root/train` or `root/val` read with torchvision's ImageFolder."""
    from torchvision.datasets import ImageFolder

    split = "train" if train else "val"
    folder = require_files(root, ["train", "val"], layout=IMAGENET_LAYOUT) / split
    if not any(entry.is_dir() for entry in os.scandir(folder)):
        raise MissingDataError(f"{folder} holds no class folders. Expected layout: {IMAGENET_LAYOUT}")
    return ImageFolder(str(folder), transform=imagenet_transforms(train, image_size))


class RandomShift:
    """Translates an image by up to `max_shift` pixels in each direction, filling with
    `fill` (the background): the digits' stand-in for CIFAR's padded random crop."""

    def __init__(self, max_shift: int = 1, fill: float = 0.0):
        self.max_shift, self.fill = max_shift, fill

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        s = self.max_shift
        padded = torch.nn.functional.pad(image, (s, s, s, s), value=self.fill)
        dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
        return padded[..., dy:dy + image.shape[-2], dx:dx + image.shape[-1]]


class TensorImages(Dataset):
    """(image, label) pairs held in memory, with an optional per-sample transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 transform: Optional[Callable] = None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


def digits_split(seed: int, test_fraction: float = 0.2,
                 max_shift: int = 0) -> tuple[TensorImages, TensorImages]:
    """scikit-learn's digits (1797 real 8x8 images, values 0..16) as (1, 8, 8) floats
    standardised with the training mean/std, split train/test stratified by class with
    `seed`; `max_shift` > 0 adds random translations to the training images."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None] / 16.0
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=seed)
    mean, std = float(x_train.mean()), float(x_train.std())
    shift = RandomShift(max_shift, fill=(0.0 - mean) / std) if max_shift > 0 else None
    return (TensorImages(torch.from_numpy((x_train - mean) / std), torch.from_numpy(y_train), shift),
            TensorImages(torch.from_numpy((x_test - mean) / std), torch.from_numpy(y_test)))


def build_datasets(data: Any) -> DataSplits:
    """The datasets named by a `data` config (`name`: cifar10 | imagenet | digits)."""
    name = data["name"] if isinstance(data, dict) else data.name
    get = (lambda k, d=None: data.get(k, d))
    if name == "cifar10":
        root = get("root")
        return DataSplits(CIFAR10Pickles(root, True, cifar_transforms(True, get("augment", True))),
                          CIFAR10Pickles(root, False, cifar_transforms(False, False)),
                          num_classes=10, in_channels=3, image_size=32)
    if name == "imagenet":
        root, size = get("root"), get("image_size", 224)
        return DataSplits(imagenet_folder(root, True, size), imagenet_folder(root, False, size),
                          num_classes=1000, in_channels=3, image_size=size)
    if name == "digits":
        train, test = digits_split(get("split_seed", 0), get("test_fraction", 0.2),
                                   get("max_shift", 0) if get("augment", False) else 0)
        return DataSplits(train, test, num_classes=10, in_channels=1, image_size=8)
    raise ValueError(f"unknown data.name {name!r}; choose cifar10, imagenet or digits")
