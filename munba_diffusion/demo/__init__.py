"""The bundled demo world: a tiny text-to-image model, its judge and a tiny CLIP, all trained on rendered shapes.

Everything here runs offline on a CPU. Wherever a model id or path is accepted, ``"munba-demo"`` names the bundled
Stable Diffusion pipeline folder (a stock ``StableDiffusionPipeline``: 32x32 images from 16x16x4 latents).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .judge import DemoJudge, JudgeOutput
from .world import COLOURS, COLOUR_NAMES, SHAPE_NAMES, SHAPES, canonical_caption, caption, render_scene

DEMO_MODEL_NAME = "munba-demo"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

__all__ = [
    "COLOURS", "COLOUR_NAMES", "DEMO_MODEL_NAME", "DemoJudge", "JudgeOutput", "SHAPES", "SHAPE_NAMES",
    "WEIGHTS_DIR", "canonical_caption", "caption", "demo_clip_path", "demo_pipeline_path", "is_demo_model",
    "load_demo_judge", "render_scene", "resolve_model_path",
]


def _bundled(name: str) -> Path:
    path = WEIGHTS_DIR / name
    if not path.is_dir():
        raise FileNotFoundError(
            f"the bundled demo {name!r} is missing from {WEIGHTS_DIR}; reinstall munba-diffusion or rebuild it with "
            "`python -m munba_diffusion.demo.train --output-dir munba_diffusion/demo/weights`"
        )
    return path


def demo_pipeline_path() -> Path:
    """The packaged StableDiffusionPipeline folder."""
    return _bundled("pipeline")


def demo_clip_path() -> Path:
    """The packaged CLIPModel folder (model, tokenizer and image processor; ``from_pretrained``-able)."""
    return _bundled("clip")


def is_demo_model(name_or_path: str | Path) -> bool:
    return str(name_or_path) == DEMO_MODEL_NAME


def resolve_model_path(name_or_path: str | Path) -> str:
    """``"munba-demo"`` -> the packaged pipeline folder; any other id or path is returned unchanged."""
    return str(demo_pipeline_path()) if is_demo_model(name_or_path) else str(name_or_path)


def load_demo_judge(device: str | torch.device = "cpu") -> DemoJudge:
    """The demo world's shape/colour classifier, in eval mode with gradients off."""
    return DemoJudge.load(_bundled("judge"), device=device)
