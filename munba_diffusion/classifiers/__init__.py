"""Image classifier unlearning (random data or whole classes) with MUNBa and baselines, SalUn-style metrics.

The benchmarks that compare the methods (``munba-unlearn-classifier``, ``munba-unlearn-clip``) live in
``benchmarks/classifier.py`` and ``benchmarks/clip.py`` (installed as ``munba_diffusion.benchmarks``).
"""

from .data import ClassificationData, ForgetSpec, load_classification_data, parse_forget_spec, split_forget
from .metrics import UnlearningMetrics, average_gap, evaluate_unlearning, mia_efficacy
from .models import MODELS, SmallResNet, build_model
from .unlearn import METHODS, TrainConfig, UnlearnConfig, train_classifier, unlearn

__all__ = [
    "METHODS",
    "MODELS",
    "ClassificationData",
    "ForgetSpec",
    "SmallResNet",
    "TrainConfig",
    "UnlearnConfig",
    "UnlearningMetrics",
    "average_gap",
    "build_model",
    "evaluate_unlearning",
    "load_classification_data",
    "mia_efficacy",
    "parse_forget_spec",
    "split_forget",
    "train_classifier",
    "unlearn",
]
