"""The bundled demo text-to-image model, intact or damaged on purpose, and its images (for the metric tests)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from munba_diffusion.demo import COLOURS, SHAPES, canonical_caption
from munba_diffusion.diffusion.base_model import load_base_pipeline
from tests.eval_helpers import write_generation_folder

# Every "a {colour} {shape}" caption once; a prompt set repeats it per seed.
ASKS: list[tuple[str, str]] = [(shape, colour) for shape in SHAPES for colour in COLOURS]


def demo_pipeline():
    pipe = load_base_pipeline("munba-demo")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def damage_unet(pipe, noise: float | None, seed: int = 0) -> None:
    """In place: every UNet tensor + ``noise`` x its own std of Gaussian noise, or all zeros where ``noise`` is None."""
    generator = torch.Generator().manual_seed(seed)
    for tensor in pipe.unet.state_dict().values():
        if noise is None:
            tensor.zero_()
        elif tensor.numel() > 1:
            tensor.add_(noise * tensor.std() * torch.randn(tensor.shape, generator=generator))


@torch.no_grad()
def draw(pipe, asks: Sequence[tuple[str, str]], steps: int = 4, guidance: float = 4.0) -> torch.Tensor:
    """One image per (shape, colour) row, seeded by the row index: (B, 3, 32, 32) in [0, 1]."""
    return pipe(
        [canonical_caption(shape, colour) for shape, colour in asks],
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=[torch.Generator().manual_seed(i) for i in range(len(asks))],
        output_type="pt",
    ).images.cpu()


def write_folder(folder: Path, images: torch.Tensor, asks: Sequence[tuple[str, str]]) -> Path:
    """A generation folder (PNGs + manifest with shape/colour columns) the demo evaluator reads; seeds = row index."""
    from torchvision.transforms.functional import to_pil_image

    return write_generation_folder(
        folder,
        [to_pil_image(image) for image in images],
        [canonical_caption(shape, colour) for shape, colour in asks],
        [{"shape": shape, "colour": colour} for shape, colour in asks],
    )
