"""Classification unlearning metrics in the SalUn convention (Fan et al. 2024; Jia et al. 2023).

All in percent:

- UA (unlearning accuracy) = 100 - accuracy on the forget set,
- RA (remaining accuracy) = accuracy on the retain set,
- TA (testing accuracy) = accuracy on the test set,
- MIA-efficacy = share of forget samples that a membership-inference attack calls non-members. The attack is an
  SVC (RBF kernel, ``C=3``, ``gamma="auto"``) on a single feature, the model's softmax confidence in the true
  class, trained on retain samples (members, as many as there are test samples) against test samples
  (non-members),
- Avg. Gap = mean over UA, RA, TA, MIA of ``|metric - metric(Retrain)|``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from sklearn.svm import SVC
from torch import nn

METRIC_NAMES: tuple[str, ...] = ("UA", "RA", "TA", "MIA")


@dataclass(frozen=True)
class UnlearningMetrics:
    """UA, RA, TA and MIA-efficacy in percent."""

    UA: float
    RA: float
    TA: float
    MIA: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.no_grad()
def predict_probabilities(
    model: nn.Module, images: torch.Tensor, batch_size: int = 512, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Softmax outputs ``(N, num_classes)`` of ``model`` in eval mode, on the CPU."""
    model.eval()
    outputs = [
        torch.softmax(model(images[i : i + batch_size].to(device)).float(), dim=1).cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(outputs)


def accuracy(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    """Percentage of rows whose arg-max equals the label."""
    return 100.0 * float((probabilities.argmax(dim=1) == labels).float().mean())


def true_class_confidence(probabilities: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """The probability each sample's true class gets, the membership attack's feature."""
    return probabilities.gather(1, labels[:, None]).squeeze(1).numpy().astype(np.float64)


def mia_efficacy(members: np.ndarray, non_members: np.ndarray, targets: np.ndarray) -> float:
    """Percentage of ``targets`` that an SVC trained on ``members`` (1) vs ``non_members`` (0) calls non-members."""
    features = np.concatenate([members, non_members]).reshape(-1, 1)
    is_member = np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])
    attack = SVC(C=3, gamma="auto", kernel="rbf").fit(features, is_member)
    return 100.0 * float(1.0 - attack.predict(targets.reshape(-1, 1)).mean())


def evaluate_unlearning(
    model: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    forget_indices: torch.Tensor,
    retain_indices: torch.Tensor,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> UnlearningMetrics:
    """UA/RA/TA/MIA of ``model``; the attack's member samples are a random retain subset drawn from ``generator``."""
    train_probabilities = predict_probabilities(model, train_images, device=device)
    test_probabilities = predict_probabilities(model, test_images, device=device)
    forget_probs, forget_labels = train_probabilities[forget_indices], train_labels[forget_indices]
    retain_probs, retain_labels = train_probabilities[retain_indices], train_labels[retain_indices]
    shadow = torch.randperm(len(retain_indices), generator=generator)[: len(test_labels)]
    return UnlearningMetrics(
        UA=100.0 - accuracy(forget_probs, forget_labels),
        RA=accuracy(retain_probs, retain_labels),
        TA=accuracy(test_probabilities, test_labels),
        MIA=mia_efficacy(
            true_class_confidence(retain_probs[shadow], retain_labels[shadow]),
            true_class_confidence(test_probabilities, test_labels),
            true_class_confidence(forget_probs, forget_labels),
        ),
    )


def average_gap(metrics: UnlearningMetrics, reference: UnlearningMetrics) -> float:
    """Mean absolute difference to the reference (Retrain) over UA, RA, TA and MIA."""
    return float(np.mean([abs(getattr(metrics, name) - getattr(reference, name)) for name in METRIC_NAMES]))
