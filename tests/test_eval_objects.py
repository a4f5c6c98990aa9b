"""Object erasure: UA / other-class accuracy logic, a tiny transformers ResNet end to end, offline errors."""

from __future__ import annotations

import socket
import urllib.request

import pytest
import torch
from PIL import Image
from transformers import (
    ConvNextImageProcessor,
    ResNetConfig,
    ResNetForImageClassification,
)

from munba_diffusion.evaluation.manifest import read_manifest
from munba_diffusion.evaluation.objects import (
    IMAGENETTE_CLASSES,
    ImageNetClassifier,
    object_erasure_scores,
    object_metrics,
)
from tests.eval_helpers import write_generation_folder

TENCH, PARACHUTE, CHURCH = 0, 701, 497


def test_unlearning_accuracy_and_other_class_accuracy_from_predictions():
    labels = ["tench"] * 4 + ["church"] * 2 + ["parachute"] * 2
    predictions = [TENCH, 3, 4, 5, CHURCH, CHURCH, PARACHUTE, TENCH]
    result = object_erasure_scores(predictions, labels, erased="Tench")
    assert result["erased_class"] == "tench"
    assert result["unlearning_accuracy"] == 0.75  # 3 of 4 tench images are not classified as tench
    assert result["other_accuracy"] == 0.75  # church 2/2, parachute 1/2
    assert result["per_class"]["parachute"]["accuracy"] == 0.5 and result["per_class"]["parachute"]["num_images"] == 2
    assert result["per_class"]["parachute"]["accuracy_n"] == 2 and result["unlearning_accuracy_n"] == 4
    assert "church" in result["per_class"] and "golf ball" not in result["per_class"]
    assert object_erasure_scores(predictions, labels, erased=None)["accuracy"] == 4 / 8


def test_bad_labels_and_missing_erased_class_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown Imagenette class 'goldfish'"):
        object_erasure_scores([0], ["goldfish"], erased=None)
    with pytest.raises(ValueError, match="erased class 'golf ball'"):
        object_erasure_scores([0], ["tench"], erased="golf ball")
    assert len(IMAGENETTE_CLASSES) == 10 and IMAGENETTE_CLASSES["English springer"] == 217


@pytest.fixture(scope="module")
def always_tench(tmp_path_factory):
    """A tiny random ImageNet-1k ResNet whose head is rigged to answer 'tench' (index 0) for any image."""
    folder = tmp_path_factory.mktemp("resnet")
    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=1000)
    model = ResNetForImageClassification(config)
    with torch.no_grad():
        head = model.classifier[-1]
        head.weight.zero_()
        head.bias.zero_()
        head.bias[TENCH] = 5.0
    model.save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": 32}).save_pretrained(folder)
    return folder


def test_generation_folder_is_scored_with_a_transformers_classifier(always_tench, tmp_path):
    labels = ["tench", "tench", "parachute", "church", "church"]
    images = [Image.new("RGB", (40, 40), (40 * i, 90, 200 - 30 * i)) for i in range(len(labels))]
    folder = write_generation_folder(
        tmp_path / "gen", images, [f"an image of a {c}" for c in labels], [{"label": c} for c in labels]
    )
    classifier = ImageNetClassifier(str(always_tench))
    assert classifier.predict(images).tolist() == [TENCH] * 5
    erased_tench = object_metrics(folder, "tench", classifier=classifier, batch_size=2)
    assert erased_tench["unlearning_accuracy"] == 0.0 and erased_tench["other_accuracy"] == 0.0
    erased_parachute = object_metrics(folder, "parachute", classifier=str(always_tench), batch_size=2)
    assert erased_parachute["unlearning_accuracy"] == 1.0 and erased_parachute["other_accuracy"] == 0.5
    assert erased_parachute["classifier"] == str(always_tench)
    verdicts = [r["judgements"]["objects"] for r in read_manifest(folder / "manifest.jsonl")]
    assert verdicts == [{"imagenet_index": TENCH, "correct": label == "tench"} for label in labels]


def test_missing_classifier_weights_offline_give_one_line_errors(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a network call was attempted")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(FileNotFoundError) as error:
        ImageNetClassifier("torchvision/resnet50")
    assert (
        "resnet50" in str(error.value)
        and str(tmp_path / "torch-home") in str(error.value)
        and "\n" not in str(error.value)
    )
    with pytest.raises(FileNotFoundError) as error:
        ImageNetClassifier(str(tmp_path / "no-such-folder"))
    assert "no-such-folder" in str(error.value) and "\n" not in str(error.value)
