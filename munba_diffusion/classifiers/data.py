"""Image classification data for unlearning experiments and the forget/retain split.

``digits`` is scikit-learn's bundled handwritten digits (1,797 8x8 grey images, 10 classes; works offline),
upsampled to ``image_size``. Any other name is loaded with ``datasets.load_dataset`` (a Hub id such as
``cifar10`` or a local folder), with the image and label columns detected from the features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Image, load_dataset
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

DIGITS = "digits"
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label", "class", "target")
IMAGE_COLUMN_NAMES = ("img", "image", "images", "picture")


@dataclass
class ClassificationData:
    """Normalised images ``(N, C, H, W)`` float32 and integer labels of a train and a test split."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int

    @property
    def in_channels(self) -> int:
        return self.train_images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_images.shape[-1]


@dataclass(frozen=True)
class ForgetSpec:
    """What to forget: a random ``fraction`` of the training set, or every training image of class ``value``."""

    kind: Literal["random", "class"]
    value: float | int

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


def parse_forget_spec(text: str) -> ForgetSpec:
    """Parse ``"random:0.1"`` (fraction in (0, 1)) or ``"class:3"`` (a class id, checked by :func:`split_forget`)."""
    kind, _, value = text.partition(":")
    if kind not in ("random", "class"):
        raise ValueError(
            f"unknown forget spec {text!r}; use random:FRACTION (e.g. random:0.1) or class:ID (e.g. class:3)"
        )
    try:
        number = float(value) if kind == "random" else int(value)
    except ValueError:
        raise ValueError(f"cannot read the number in forget spec {text!r}; use random:FRACTION or class:ID") from None
    if kind == "random" and not 0.0 < number < 1.0:
        raise ValueError(f"forget fraction must be in (0, 1), got {value} in {text!r}; use e.g. random:0.1")
    return ForgetSpec(kind, number)


def split_forget(
    labels: torch.Tensor, spec: ForgetSpec, num_classes: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(forget, retain)`` into the training set, each sorted; random forgetting draws from ``generator``."""
    n = len(labels)
    if spec.kind == "class":
        if not 0 <= int(spec.value) < num_classes:
            raise ValueError(f"forget class {spec.value} is out of range; the dataset has classes 0..{num_classes - 1}")
        forget_mask = labels == int(spec.value)
    else:
        forget_count = max(1, round(float(spec.value) * n))
        forget_mask = torch.zeros(n, dtype=torch.bool)
        forget_mask[torch.randperm(n, generator=generator)[:forget_count]] = True
    return torch.nonzero(forget_mask).flatten(), torch.nonzero(~forget_mask).flatten()


def _normalise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardise each channel with the training split's mean and standard deviation."""
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def _resize(images: torch.Tensor, image_size: int | None) -> torch.Tensor:
    if image_size is None or images.shape[-1] == image_size:
        return images
    return F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    indices = np.arange(len(labels))
    train, test = train_test_split(indices, test_size=test_fraction, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(test)


def load_digits_data(image_size: int = 16, test_fraction: float = 0.2, split_seed: int = 0) -> ClassificationData:
    """scikit-learn's digits: a fixed stratified train/test split, images upsampled to ``image_size``."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    train, test = _stratified_split(digits.target, test_fraction, split_seed)
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_images, test_images = _normalise(_resize(images[train], image_size), _resize(images[test], image_size))
    return ClassificationData(DIGITS, train_images, labels[train], test_images, labels[test], 10)


def _find_columns(features) -> tuple[str, str]:
    """The image column (an ``Image`` feature, else a usual name) and label column (a ``ClassLabel``, else a name)."""
    image = next((name for name, f in features.items() if isinstance(f, Image)), None)
    image = image or next((name for name in IMAGE_COLUMN_NAMES if name in features), None)
    label = next((name for name, f in features.items() if isinstance(f, ClassLabel)), None)
    label = label or next((name for name in LABEL_COLUMN_NAMES if name in features), None)
    if image is None or label is None:
        raise ValueError(
            f"cannot find image and label columns among {list(features)}; expected an Image and a ClassLabel feature"
        )
    return image, label


def _images_to_tensor(pil_images, channels: int) -> torch.Tensor:
    mode = "L" if channels == 1 else "RGB"
    arrays = [np.asarray(image.convert(mode), dtype=np.uint8) for image in pil_images]
    stacked = torch.from_numpy(np.stack(arrays)).float() / 255.0
    return stacked[:, None] if channels == 1 else stacked.permute(0, 3, 1, 2)


def _first(split, count: int | None):
    return split if count is None or count >= len(split) else split.select(range(count))


def load_hf_classification_data(
    name: str,
    image_size: int | None = None,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
) -> ClassificationData:
    """``datasets.load_dataset(name)`` (a Hub id or a local folder) as :class:`ClassificationData`."""
    try:
        splits = load_dataset(name)
    except Exception as error:  # datasets raises ConnectionError, FileNotFoundError, ValueError or its own errors
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ValueError(
            f"cannot load dataset {name!r} ({reason}); pass {DIGITS!r} (offline), a local dataset folder, or a Hub "
            "dataset (online once, then cached)"
        ) from None
    return classification_data_from_splits(
        splits, name, image_size, test_fraction, split_seed, max_train_samples, max_test_samples
    )


def classification_data_from_splits(
    splits,
    name: str,
    image_size: int | None = None,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
) -> ClassificationData:
    """Convert a ``datasets.DatasetDict`` of images and class labels.

    Uses the ``train`` and ``test`` splits (else ``validation``; else a stratified ``test_fraction`` of train).
    Grey images stay one channel when the first training image is grey, otherwise everything is RGB; images are
    resized to ``image_size`` when given (they must share a size otherwise).
    """
    if "train" not in splits:
        raise ValueError(f"dataset {name!r} has no 'train' split (it has {', '.join(splits)})")
    train = splits["train"]
    image_column, label_column = _find_columns(train.features)
    test = splits["test"] if "test" in splits else splits.get("validation")
    if test is None:
        train_idx, test_idx = _stratified_split(np.asarray(train[label_column]), test_fraction, split_seed)
        train, test = train.select(train_idx), train.select(test_idx)
    train, test = _first(train, max_train_samples), _first(test, max_test_samples)
    channels = 1 if train[0][image_column].mode in ("L", "1", "I", "I;16") else 3
    label_feature = train.features[label_column]
    labels = np.asarray(train[label_column])
    num_classes = label_feature.num_classes if hasattr(label_feature, "num_classes") else int(labels.max()) + 1
    train_images = _resize(_images_to_tensor(train[image_column], channels), image_size)
    test_images = _resize(_images_to_tensor(test[image_column], channels), image_size)
    train_images, test_images = _normalise(train_images, test_images)
    return ClassificationData(
        name,
        train_images,
        torch.tensor(labels, dtype=torch.long),
        test_images,
        torch.tensor(np.asarray(test[label_column]), dtype=torch.long),
        num_classes,
    )


def limit_samples(
    data: ClassificationData, max_train_samples: int | None = None, max_test_samples: int | None = None
) -> ClassificationData:
    """The first ``max_train_samples`` / ``max_test_samples`` images of each split (``None``: all)."""
    return ClassificationData(
        data.name,
        data.train_images[:max_train_samples],
        data.train_labels[:max_train_samples],
        data.test_images[:max_test_samples],
        data.test_labels[:max_test_samples],
        data.num_classes,
    )


def load_classification_data(
    name: str,
    image_size: int | None = None,
    *,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
) -> ClassificationData:
    """``digits`` (bundled with scikit-learn; ``image_size`` defaults to 16) or any ``datasets`` name/folder."""
    if name == DIGITS:
        data = load_digits_data(16 if image_size is None else image_size, test_fraction, split_seed)
        return limit_samples(data, max_train_samples, max_test_samples)
    return load_hf_classification_data(
        name,
        image_size,
        test_fraction,
        split_seed,
        max_train_samples=max_train_samples,
        max_test_samples=max_test_samples,
    )
