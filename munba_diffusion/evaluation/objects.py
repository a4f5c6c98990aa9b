"""Object erasure (Imagenette classes): an ImageNet ResNet-50 judges images made from "an image of a {class}".

Unlearning accuracy UA = share of the erased class's images NOT classified as that class (higher = more erased);
the other classes' accuracy = share of their images classified as their own class (higher = better kept).
Rates are fractions in [0, 1], each with its 95% Wilson interval and image count (``K_ci95``, ``K_n``; see
:mod:`.intervals`); reports print them as percentages. :func:`object_metrics` writes each image's predicted ImageNet
class into its manifest line (``judgements.objects``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torchvision.models import ResNet50_Weights, resnet50
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoModelForImageClassification

from ..io import is_offline
from .intervals import rate_fields
from .manifest import collect_images, load_rgb, record_judgements, require_field

IMAGENETTE_CLASSES: dict[str, int] = {
    "tench": 0,
    "English springer": 217,
    "cassette player": 482,
    "chain saw": 491,
    "church": 497,
    "French horn": 566,
    "garbage truck": 569,
    "gas pump": 571,
    "golf ball": 574,
    "parachute": 701,
}
TORCHVISION_RESNET50 = "torchvision/resnet50"
_BY_LOWER = {name.lower(): name for name in IMAGENETTE_CLASSES}


def imagenette_class(name: str) -> str:
    """The canonical Imagenette class name of ``name`` (case-insensitive)."""
    canonical = _BY_LOWER.get(name.strip().lower())
    if canonical is None:
        raise ValueError(f"unknown Imagenette class {name!r}; choose from {', '.join(IMAGENETTE_CLASSES)}")
    return canonical


def object_erasure_scores(predictions: Sequence[int], labels: Sequence[str], erased: str | None) -> dict:
    """UA and per-class accuracy from ImageNet predictions (indices) and the Imagenette class each image asked for."""
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"need one prediction per label, got {len(predictions)} predictions and {len(labels)} labels")
    labels = [imagenette_class(label) for label in labels]
    correct = [int(p) == IMAGENETTE_CLASSES[label] for p, label in zip(predictions, labels)]
    per_class = {}
    for name in IMAGENETTE_CLASSES:
        hits = [c for c, label in zip(correct, labels) if label == name]
        if hits:
            per_class[name] = {**rate_fields("accuracy", hits), "num_images": len(hits)}
    result: dict = {"num_images": len(labels), "per_class": per_class}
    if erased is None:
        result.update(rate_fields("accuracy", correct))
        return result
    erased = imagenette_class(erased)
    if erased not in per_class:
        raise ValueError(f"no images of the erased class {erased!r}; the prompt set needs rows labelled with it")
    result["erased_class"] = erased
    result.update(rate_fields("unlearning_accuracy", [not c for c, label in zip(correct, labels) if label == erased]))
    result.update(rate_fields("other_accuracy", [c for c, label in zip(correct, labels) if label != erased]))
    return result


def _torchvision_resnet50(device: str | torch.device) -> tuple[torch.nn.Module, Callable]:
    weights = ResNet50_Weights.IMAGENET1K_V2
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.is_file() and is_offline():
        raise FileNotFoundError(
            f"ResNet-50 weights missing: download {weights.url} to {path}, or pass a transformers ResNet-50 folder"
        )
    model = resnet50(weights=weights)
    return model.to(device).eval(), weights.transforms()


def _transformers_classifier(name_or_path: str, device: str | torch.device) -> tuple[torch.nn.Module, Callable]:
    try:
        model = AutoModelForImageClassification.from_pretrained(name_or_path)
        processor = AutoImageProcessor.from_pretrained(name_or_path)
    except OSError as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise FileNotFoundError(
            f"cannot load classifier {name_or_path!r} ({reason}); "
            "pass a local folder (e.g. a saved microsoft/resnet-50) or go online once"
        ) from None
    if model.config.num_labels != 1000:
        raise ValueError(
            f"{name_or_path} has {model.config.num_labels} labels; the Imagenette map needs an ImageNet-1k classifier"
        )

    def preprocess(image: Image.Image) -> torch.Tensor:
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    model = model.to(device).eval()
    return (lambda pixels: model(pixel_values=pixels).logits), preprocess


class ImageNetClassifier:
    """ImageNet-1k classifier: torchvision's ResNet-50 (IMAGENET1K_V2) or a transformers image-classification model."""

    def __init__(self, name_or_path: str = TORCHVISION_RESNET50, device: str | torch.device = "cpu"):
        self.name = str(name_or_path)
        self.device = torch.device(device)
        if self.name == TORCHVISION_RESNET50:
            self.model, self.preprocess = _torchvision_resnet50(self.device)
        else:
            self.model, self.preprocess = _transformers_classifier(self.name, self.device)

    @torch.no_grad()
    def predict(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """ImageNet class indices (B,)."""
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        return self.model(pixels).argmax(-1).cpu()


def object_metrics(
    source: str | Path,
    erased_class: str | None,
    *,
    classifier: str | ImageNetClassifier = TORCHVISION_RESNET50,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
) -> dict:
    """UA / other-class accuracy of a generation folder whose prompt set has a ``label`` column (Imagenette class)."""
    entries = collect_images(source)
    labels = require_field(entries, "label", "object erasure")
    if isinstance(classifier, str):
        classifier = ImageNetClassifier(classifier, device)
    predictions = []
    for start in tqdm(range(0, len(entries), batch_size), desc="classifier", disable=len(entries) <= batch_size):
        predictions.extend(classifier.predict([load_rgb(e.path) for e in entries[start : start + batch_size]]).tolist())
    result = object_erasure_scores(predictions, labels, erased_class)
    verdicts = {
        e.record["file"]: {"imagenet_index": int(p), "correct": int(p) == IMAGENETTE_CLASSES[imagenette_class(label)]}
        for e, p, label in zip(entries, predictions, labels)
    }
    record_judgements(source, "objects", verdicts)
    result["classifier"] = classifier.name
    return result
