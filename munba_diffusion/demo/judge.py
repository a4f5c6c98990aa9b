"""The demo world's judge: a small CNN that names the shape and the colour of a 32x32 image.

It plays NudeNet's role for the demo: a fixed classifier that says whether a concept is still in an image. It must
name one of four shapes and one of four colours, so it also has a third outcome, *unrecognisable*: an image that is
not a scene of the demo world (noise, a blank canvas, a collapsed model's blotches) gets ``recognised == False``
and the evaluator counts it as neither the concept nor a right shape or colour.

Why not the judge's own confidence: its softmax is confident on garbage (median max-probability over both heads
0.90 on uniform noise and 1.00 on a zeroed UNet's images, against 1.00 on renders), and distances in its feature
space overlap too (Mahalanobis distances of noise fall inside the renders' 99th percentile). What the world does
guarantee is its look: one flat-coloured shape on a plain background. :func:`scene_fit` measures exactly that.
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


# Scene-fit threshold below which the judge calls an image unrecognisable, measured with
# `python -m tests.test_judge_calibration` (the test of the same name re-checks it on a smaller sample): scene_fit of
# 5,000 fresh renders (render_scene, seed 99) against 16,096 garbage images: 2,000 each of uniform noise, Gaussian
# noise, constant colours, constant colours + faint noise, noise blurred over 3/5/9 px and two-colour pixel noise,
# plus 48 each from the demo pipeline with a zeroed UNet and with UNet weights + 1.0 x their std of Gaussian noise
# (8 steps, guidance 4). Renders: 1st percentile 0.940, min 0.913. Garbage: 99th percentile 0.517, max 0.696 (the
# noised UNet). The threshold is the midpoint of those two percentiles (0.729), rounded: it keeps 100% of the
# renders and of the intact demo model's images (48, min 0.915) and rejects 100% of the garbage.
SCENE_FIT_THRESHOLD = 0.73


@dataclass
class JudgeOutput:
    """Predicted class indices (into SHAPES / COLOURS), softmax probabilities, and whether the image is a scene.

    ``shape`` and ``colour`` are the argmax even where ``recognised`` is False; readers of the verdict must treat
    those images as unrecognisable (see :meth:`DemoJudge.classify`).
    """

    shape: torch.Tensor
    colour: torch.Tensor
    shape_probs: torch.Tensor
    colour_probs: torch.Tensor
    scene_fit: torch.Tensor
    recognised: torch.Tensor


def _to_judge_size(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"the judge takes images of shape (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
    if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
    return images


@torch.no_grad()
def scene_fit(images: torch.Tensor, iterations: int = 8) -> torch.Tensor:
    """How much a (B, 3, H, W) batch in [0, 1] looks like a demo scene: a score in [0, 1] per image.

    A scene is one flat-coloured shape on a plain background, i.e. two colours in two solid regions. The score is
    the smaller of (a) the share of the image's colour variance that its best two-colour fit explains (2-means in
    RGB; a render scores about 0.97, pixel noise about 0.25, a constant image 0) and (b) the share of neighbouring
    pixel pairs that fall on the same side of that fit (two solid regions: about 0.96; two-colour pixel noise: 0.5).
    Deterministic: 2-means starts from the pixel farthest from the mean and the pixel farthest from that one.
    """
    images = _to_judge_size(images.float())
    batch, _, height, width = images.shape
    pixels = images.flatten(2).transpose(1, 2).double()  # (B, N, 3)
    mean = pixels.mean(1, keepdim=True)
    total = ((pixels - mean) ** 2).sum((1, 2))

    def farthest(from_: torch.Tensor) -> torch.Tensor:
        index = (pixels - from_).norm(dim=-1).argmax(1)
        return pixels[torch.arange(batch), index][:, None]

    first = farthest(mean)
    centres = torch.cat([first, farthest(first)], 1)  # (B, 2, 3)
    for _ in range(iterations):
        weights = F.one_hot(torch.cdist(pixels, centres).argmin(-1), 2).double()  # (B, N, 2)
        counts = weights.sum(1)[..., None]
        updated = torch.einsum("bnk,bnc->bkc", weights, pixels) / counts.clamp_min(1)
        centres = torch.where(counts > 0, updated, centres)
    distances = torch.cdist(pixels, centres)
    labels = distances.argmin(-1).view(batch, height, width)
    residual = (distances.min(-1).values ** 2).sum(1)
    flat = total <= 1e-9 * height * width  # one colour: no shape at all
    explained = torch.where(flat, torch.zeros_like(total), 1 - residual / total.clamp_min(1e-30))
    same_side = torch.cat(
        [(labels[:, 1:] == labels[:, :-1]).flatten(1), (labels[:, :, 1:] == labels[:, :, :-1]).flatten(1)], 1
    )
    return torch.minimum(explained, same_side.double().mean(1)).float().clamp(0, 1).to(images.device)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GELU(), nn.Conv2d(cout, cout, 3, padding=1), nn.GELU())


class DemoJudge(nn.Module):
    """Conv net with two heads; ``features`` are the pooled penultimate activations (used for the demo KID)."""

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
        return _to_judge_size(images) * 2 - 1

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, feature_dim)."""
        param = next(self.parameters())
        return self.body(self._prepare(images.to(param.device, param.dtype)))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(images)
        return self.shape_head(h), self.colour_head(h)

    @torch.no_grad()
    def classify(self, images: torch.Tensor, threshold: float = SCENE_FIT_THRESHOLD) -> JudgeOutput:
        """Shape and colour verdicts; ``recognised`` is False where :func:`scene_fit` is below ``threshold``."""
        shape_logits, colour_logits = self(images)
        shape_probs, colour_probs = shape_logits.softmax(-1), colour_logits.softmax(-1)
        fit = scene_fit(images).to(shape_probs.device)
        return JudgeOutput(
            shape_probs.argmax(-1), colour_probs.argmax(-1), shape_probs, colour_probs, fit, fit >= threshold
        )

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
