"""Classifier backbones for unlearning experiments: a small CIFAR-style ResNet and torchvision's ResNet-18."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision
from torch import nn

MODELS: tuple[str, ...] = ("small-resnet", "resnet18")


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))`` with a 1x1 projection shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, one stage per width (stride 2 after the first), global pooling, linear head."""

    def __init__(
        self, num_classes: int, in_channels: int = 3, widths: Sequence[int] = (16, 32, 64), blocks_per_stage: int = 1
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        blocks, channels = [], widths[0]
        for stage, width in enumerate(widths):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                blocks.append(BasicBlock(channels, width, stride))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.blocks(self.stem(x))
        return self.head(features.mean(dim=(2, 3)))


def cifar_resnet18(num_classes: int, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem used by SalUn/MUNBa: 3x3 stride-1 first conv, no max-pool."""
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """A freshly initialised classifier called ``name`` (one of :data:`MODELS`)."""
    if name == "small-resnet":
        return SmallResNet(num_classes, in_channels)
    if name == "resnet18":
        return cifar_resnet18(num_classes, in_channels)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
