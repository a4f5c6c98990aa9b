"""Training and unlearning of image classifiers.

Methods (all start from the original model except ``retrain``):

- ``retrain``: train from scratch on the retain set only (the reference every other method is compared to),
- ``ft``: fine-tune on the retain set with cross-entropy,
- ``ga``: gradient ascent on the forget set, i.e. minimise ``-CE(forget)``,
- ``rl``: random labels; minimise ``CE(retain) + CE(forget, random wrong labels)``,
- ``munba``: the same two losses as ``rl`` as two players, ``preserve = CE(retain)`` and
  ``forget = CE(forget, random wrong labels)``, combined by :func:`munba_diffusion.step.bargained_step` with a
  combiner (Nash bargaining by default; ``munba`` with ``sum`` is exactly ``rl``).

``ft``, ``rl`` and ``munba`` iterate over shuffled retain batches each epoch; ``rl`` and ``munba`` pair every
retain batch with the next forget batch, cycling through freshly shuffled forget batches, and draw each forget
sample's random label (uniform over the other classes) per batch. ``ga`` iterates over forget batches. All use SGD
with momentum and weight decay at a constant learning rate; training from scratch uses a cosine schedule.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..bargaining import get_combiner
from ..step import bargained_step, clip_gradients_

METHODS: tuple[str, ...] = ("retrain", "ft", "ga", "rl", "munba")


@dataclass(frozen=True)
class TrainConfig:
    """Supervised training from scratch (original and retrained models): SGD, cosine learning-rate schedule."""

    epochs: int = 20
    lr: float = 0.05
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 5e-4


@dataclass(frozen=True)
class UnlearnConfig:
    """One unlearning method and its budget (``retrain`` uses a :class:`TrainConfig` instead)."""

    method: str
    epochs: int = 5
    lr: float = 0.01
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 5e-4
    combiner: str = "nash"
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        check_methods([self.method])


def check_methods(methods: list[str] | tuple[str, ...]) -> None:
    """Raise a one-line ValueError for any name not in :data:`METHODS`."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown unlearning method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")


def _batches(indices: torch.Tensor, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    shuffled = indices[torch.randperm(len(indices), generator=generator)]
    return list(shuffled.split(batch_size))


def _cycle_batches(indices: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    while True:
        yield from _batches(indices, batch_size, generator)


def _random_wrong_labels(labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """A label drawn uniformly from the ``num_classes - 1`` classes other than each true label."""
    shift = torch.randint(1, num_classes, labels.shape, generator=generator)
    return (labels + shift) % num_classes


def _optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def _loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: torch.Tensor, device) -> torch.Tensor:
    return F.cross_entropy(model(images[batch].to(device)), labels[batch].to(device))


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    indices: torch.Tensor,
    config: TrainConfig,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> nn.Module:
    """Train ``model`` in place with cross-entropy on ``images[indices]``; returns it."""
    model.to(device).train()
    optimizer = _optimizer(model, config.lr, config.momentum, config.weight_decay)
    steps_per_epoch = -(-len(indices) // config.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
    for _ in tqdm(range(config.epochs), desc="train", leave=False, disable=not progress):
        for batch in _batches(indices, config.batch_size, generator):
            optimizer.zero_grad(set_to_none=True)
            _loss(model, images, labels, batch, device).backward()
            optimizer.step()
            schedule.step()
    return model


def unlearn(
    original: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    forget_indices: torch.Tensor,
    retain_indices: torch.Tensor,
    num_classes: int,
    config: UnlearnConfig,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> nn.Module:
    """A copy of ``original`` unlearned with ``config.method`` (``ft``, ``ga``, ``rl`` or ``munba``).

    ``images``/``labels`` are the whole training set; ``forget_indices`` and ``retain_indices`` split it.
    """
    if config.method == "retrain":
        raise ValueError("retrain starts from scratch; call train_classifier on the retain indices instead")
    model = copy.deepcopy(original).to(device).train()
    optimizer = _optimizer(model, config.lr, config.momentum, config.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    combiner = get_combiner(config.combiner) if config.method == "munba" else None
    forget_stream = _cycle_batches(forget_indices, config.batch_size, generator)

    def forget_loss() -> torch.Tensor:
        batch = next(forget_stream)
        random_labels = _random_wrong_labels(labels[batch], num_classes, generator)
        return F.cross_entropy(model(images[batch].to(device)), random_labels.to(device))

    for _ in tqdm(range(config.epochs), desc=config.method, leave=False, disable=not progress):
        batches = forget_indices if config.method == "ga" else retain_indices
        for batch in _batches(batches, config.batch_size, generator):
            optimizer.zero_grad(set_to_none=True)
            loss = _loss(model, images, labels, batch, device)
            if config.method == "munba":
                bargained_step(
                    {"preserve": loss, "forget": forget_loss()}, params, combiner, max_grad_norm=config.max_grad_norm
                )
            else:
                objective = -loss if config.method == "ga" else loss
                if config.method == "rl":
                    objective = objective + forget_loss()
                objective.backward()
                _clip(params, config.max_grad_norm)
            optimizer.step()
    return model


def _clip(params: list[nn.Parameter], max_grad_norm: float | None) -> None:
    if max_grad_norm is not None:
        clip_gradients_(params, max_grad_norm)
