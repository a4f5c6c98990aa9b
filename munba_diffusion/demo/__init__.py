"""The bundled demo world: rendered shapes, their judge, and the packaged folders of its tiny models.

Everything here runs offline on a CPU. The packaged folders (a stock ``StableDiffusionPipeline`` drawing 32x32
images from 16x16x4 latents, a stock ``StableDiffusion3Pipeline`` of the same world trained with flow matching,
a tiny ``CLIPModel``, the judge) are reached by name through
:func:`munba_diffusion.models.resolve_model_path`, the one place that knows the bundled names. The scripts that
trained and measured them live outside the package, in ``scripts/demo/``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .judge import DemoJudge, JudgeOutput
from .world import COLOUR_NAMES, COLOURS, SHAPE_NAMES, SHAPES, canonical_caption, caption, render_scene

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
REBUILD_COMMAND = "python scripts/demo/train_demo.py --output_dir munba_diffusion/demo/weights --seed 0 --stage all"
REBUILD_FLOW_COMMAND = "python scripts/demo/train_flow_demo.py --output_dir munba_diffusion/demo/weights"

__all__ = [
    "COLOURS",
    "COLOUR_NAMES",
    "DemoJudge",
    "JudgeOutput",
    "REBUILD_COMMAND",
    "SHAPES",
    "SHAPE_NAMES",
    "WEIGHTS_DIR",
    "bundled_folder",
    "canonical_caption",
    "caption",
    "demo_clip_path",
    "load_demo_judge",
    "render_scene",
]


def bundled_folder(name: str) -> Path:
    """The packaged folder ``weights/<name>`` (``pipeline``, ``flow_pipeline``, ``clip``, ``judge``); a clear error
    when it is missing."""
    path = WEIGHTS_DIR / name
    if not path.is_dir():
        raise FileNotFoundError(
            f"the bundled demo {name!r} is missing from {WEIGHTS_DIR}; reinstall munba-diffusion or, in a checkout, "
            f"rebuild it with `{REBUILD_FLOW_COMMAND if name == 'flow_pipeline' else REBUILD_COMMAND}`"
        )
    return path


def demo_clip_path() -> Path:
    """The packaged CLIPModel folder (model, tokenizer and image processor; ``from_pretrained``-able)."""
    return bundled_folder("clip")


def load_demo_judge(device: str | torch.device = "cpu") -> DemoJudge:
    """The demo world's shape/colour classifier, in eval mode with gradients off."""
    return DemoJudge.load(bundled_folder("judge"), device=device)
