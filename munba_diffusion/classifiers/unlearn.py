"""Training and unlearning of image classifiers.

Methods (all start from the original model except ``retrain``):

- ``retrain``: train from scratch on the retain set only (the reference every other method is compared to),
- ``ft``: fine-tune on the retain set with cross-entropy,
- ``ga``: gradient ascent on the forget set, i.e. minimise ``-CE(forget)``,
- ``rl``: random labels; minimise ``CE(retain) + CE(forget, random wrong labels)``,
- ``munba``: the same two losses as ``rl`` as two players, ``preserve = CE(retain)`` and
  ``forget = CE(forget, random wrong labels)``, combined by :func:`munba_diffusion.step.write_bargained_gradients`
  with a combiner (Nash bargaining by default; ``munba`` with ``sum`` is exactly ``rl``).

``ft``, ``rl`` and ``munba`` iterate over shuffled retain batches each epoch; ``rl`` and ``munba`` pair every
retain batch with the next forget batch, cycling through freshly shuffled forget batches, and draw each forget
sample's random label (uniform over the other classes) per batch. ``ga`` iterates over forget batches. All use SGD
with momentum and weight decay at a constant learning rate; training from scratch uses a cosine schedule.

Every unlearning step follows ``nonfinite_gradients`` when a gradient holds NaN or inf (the bargained players'
or, for the baselines, the objective's): ``raise`` stops with :class:`~munba_diffusion.step.NonFiniteGradientError`,
``skip`` leaves the parameters unchanged for that step and counts it in the training record.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..bargaining import COMBINERS, get_combiner
from ..config import check_options, option
from ..step import (
    max_grad_norm_option,
    nonfinite_gradients_option,
    write_bargained_gradients,
    write_objective_gradients,
)

METHODS: tuple[str, ...] = ("retrain", "ft", "ga", "rl", "munba")
# the baselines' single objective, named in non-finite errors and warnings
OBJECTIVES: dict[str, str] = {"ft": "CE(retain)", "ga": "-CE(forget)", "rl": "CE(retain)+CE(forget, random labels)"}


@dataclass(frozen=True)
class TrainConfig:
    """Supervised training from scratch (original and retrained models): SGD, cosine learning-rate schedule."""

    epochs: int = option(20, "passes over the training set", low=1)
    lr: float = option(0.05, "peak learning rate of the cosine schedule", low=0, low_open=True)
    batch_size: int = option(64, "images per batch", low=1)
    momentum: float = option(0.9, "SGD momentum", low=0, high=1, high_open=True)
    weight_decay: float = option(5e-4, "SGD weight decay (L2 penalty)", low=0)

    def __post_init__(self) -> None:
        check_options(self)


@dataclass(frozen=True)
class UnlearnConfig:
    """One unlearning method and its budget (``retrain`` uses a :class:`TrainConfig` instead)."""

    method: str = option(help="unlearning method", choices=METHODS)
    epochs: int = option(5, "passes over the retain set (ga: the forget set)", low=1)
    lr: float = option(0.01, "constant learning rate", low=0, low_open=True)
    batch_size: int = option(64, "images per retain and per forget batch", low=1)
    momentum: float = option(0.9, "SGD momentum", low=0, high=1, high_open=True)
    weight_decay: float = option(5e-4, "SGD weight decay (L2 penalty)", low=0)
    combiner: str = option("nash", "how munba combines the players' gradients", choices=COMBINERS)
    max_grad_norm: float | None = max_grad_norm_option()
    nonfinite_gradients: str = nonfinite_gradients_option()

    def __post_init__(self) -> None:
        check_options(self)


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
) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``original`` unlearned with ``config.method`` (``ft``, ``ga``, ``rl`` or ``munba``).

    ``images``/``labels`` are the whole training set; ``forget_indices`` and ``retain_indices`` split it.
    Returns the model and a training record: ``steps`` (optimizer steps attempted) and ``skipped_steps`` (steps
    skipped for a non-finite gradient under ``nonfinite_gradients="skip"``).
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

    record = {"steps": 0, "skipped_steps": 0}
    for _ in tqdm(range(config.epochs), desc=config.method, leave=False, disable=not progress):
        batches = forget_indices if config.method == "ga" else retain_indices
        for batch in _batches(batches, config.batch_size, generator):
            record["steps"] += 1
            optimizer.zero_grad(set_to_none=True)
            loss = _loss(model, images, labels, batch, device)
            if config.method == "munba":
                diagnostics = write_bargained_gradients(
                    {"preserve": loss, "forget": forget_loss()},
                    params,
                    combiner,
                    max_grad_norm=config.max_grad_norm,
                    nonfinite=config.nonfinite_gradients,
                )
                skip = diagnostics.skipped
            else:
                objective = -loss if config.method == "ga" else loss
                if config.method == "rl":
                    objective = objective + forget_loss()
                skip = not write_objective_gradients(
                    objective,
                    params,
                    name=OBJECTIVES[config.method],
                    max_grad_norm=config.max_grad_norm,
                    nonfinite=config.nonfinite_gradients,
                )
            if skip:
                record["skipped_steps"] += 1
                continue
            optimizer.step()
    return model, record
