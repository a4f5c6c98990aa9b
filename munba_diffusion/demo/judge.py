"""The demo world's judge: a small CNN that names the shape and the colour of a 32x32 image.

It plays NudeNet's role for the demo: a fixed classifier that says whether a concept is still in an image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .world import COLOURS, IMAGE_SIZE, SHAPES

WEIGHTS_NAME = "judge.safetensors"
CONFIG_NAME = "config.json"


@dataclass
class JudgeOutput:
    """Predicted class indices (into SHAPES / COLOURS) and softmax probabilities."""

    shape: torch.Tensor
    colour: torch.Tensor
    shape_probs: torch.Tensor
    colour_probs: torch.Tensor


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GELU(), nn.Conv2d(cout, cout, 3, padding=1), nn.GELU())


class DemoJudge(nn.Module):
    """Conv net with two heads; ``features`` are the pooled penultimate activations (used for the demo FID)."""

    def __init__(self, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim, "shapes": list(SHAPES), "colours": list(COLOURS)}
        self.body = nn.Sequential(
            _block(3, width),
            nn.MaxPool2d(2),
            _block(width, 2 * width),
            nn.MaxPool2d(2),
            _block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * width, feature_dim),
            nn.GELU(),
        )
        self.shape_head = nn.Linear(feature_dim, len(SHAPES))
        self.colour_head = nn.Linear(feature_dim, len(COLOURS))

    @staticmethod
    def _prepare(images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"the judge takes images of shape (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
        return images * 2 - 1

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, feature_dim)."""
        param = next(self.parameters())
        return self.body(self._prepare(images.to(param.device, param.dtype)))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(images)
        return self.shape_head(h), self.colour_head(h)

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> JudgeOutput:
        shape_logits, colour_logits = self(images)
        shape_probs, colour_probs = shape_logits.softmax(-1), colour_logits.softmax(-1)
        return JudgeOutput(shape_probs.argmax(-1), colour_probs.argmax(-1), shape_probs, colour_probs)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / WEIGHTS_NAME))
        (directory / CONFIG_NAME).write_text(json.dumps(self.config, indent=2))

    @classmethod
    def load(cls, directory: Path, device: str | torch.device = "cpu") -> "DemoJudge":
        directory = Path(directory)
        if not (directory / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"no judge weights in {directory}; train them from a checkout with "
                "`python scripts/demo/train_demo.py --output_dir DIR --stage judge`"
            )
        config = json.loads((directory / CONFIG_NAME).read_text())
        judge = cls(width=config["width"], feature_dim=config["feature_dim"])
        judge.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        return judge.to(device).eval().requires_grad_(False)
