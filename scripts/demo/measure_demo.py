"""Measure the bundled demo world and draw what its text-to-image model makes (the README's numbers and picture).

    python scripts/demo/measure_demo.py --output_dir docs/demo

Writes ``demo_world.json`` (judge and CLIP accuracy on fresh renders, the VAE round trip, and how often the judge
agrees with the text-to-image model for every shape x colour caption) and ``demo_grid.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image, ImageDraw, ImageFont
from train_demo import clip_zero_shot_accuracy, judge_pipeline, load_tokenizer, render_dataset
from transformers import CLIPModel

from munba_diffusion.demo import COLOURS, SHAPES, canonical_caption, demo_clip_path, load_demo_judge
from munba_diffusion.models import DEMO_MODEL, resolve_model_path

FRESH_SEED = 777_000  # renders no training stage has seen (training seeds are < 100)


def measure(seeds_per_caption: int = 4, steps: int = 25, guidance: float = 4.0) -> dict:
    judge = load_demo_judge()
    images, shapes, colours = render_dataset(2000, FRESH_SEED)
    out = judge.classify(images)
    clip = CLIPModel.from_pretrained(demo_clip_path()).eval()
    zero_shot = clip_zero_shot_accuracy(clip, load_tokenizer(demo_clip_path()), images, shapes, colours)
    pipe = StableDiffusionPipeline.from_pretrained(resolve_model_path(DEMO_MODEL))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        recon = pipe.vae.decode(pipe.vae.encode(images[:500] * 2 - 1).latent_dist.mean).sample
    judged_recon = judge.classify(((recon + 1) / 2).clamp(0, 1))
    return {
        "fresh_renders": len(images),
        "judge": {
            "shape_accuracy": (out.shape == shapes).float().mean().item(),
            "colour_accuracy": (out.colour == colours).float().mean().item(),
        },
        "clip_zero_shot": zero_shot,
        "vae_round_trip_judged": {
            "shape_accuracy": (judged_recon.shape == shapes[:500]).float().mean().item(),
            "colour_accuracy": (judged_recon.colour == colours[:500]).float().mean().item(),
        },
        "text_to_image_judged": judge_pipeline(pipe, judge, seeds_per_caption, steps, guidance),
        "parameters": {
            "unet": sum(p.numel() for p in pipe.unet.parameters()),
            "vae": sum(p.numel() for p in pipe.vae.parameters()),
            "text_encoder": sum(p.numel() for p in pipe.text_encoder.parameters()),
            "clip": sum(p.numel() for p in clip.parameters()),
            "judge": sum(p.numel() for p in judge.parameters()),
        },
    }


def caption_grid(seeds: int = 6, steps: int = 25, guidance: float = 4.0, cell: int = 48) -> Image.Image:
    """One row per caption "a {colour} {shape}", one column per seed."""
    pipe = StableDiffusionPipeline.from_pretrained(resolve_model_path(DEMO_MODEL))
    pipe.set_progress_bar_config(disable=True)
    captions = [canonical_caption(s, c) for s in SHAPES for c in COLOURS]
    side = 130
    grid = Image.new("RGB", (side + cell * seeds, cell * len(captions)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=14)
    for row, text in enumerate(captions):
        images = pipe(
            [text] * seeds,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator().manual_seed(s) for s in range(seeds)],
        ).images
        draw.text((4, row * cell + cell // 2 - 8), text, fill=(0, 0, 0), font=font)
        for col, image in enumerate(images):
            grid.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (side + col * cell, row * cell))
    return grid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", "--output-dir", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    results = measure()
    (args.output_dir / "demo_world.json").write_text(json.dumps(results, indent=2) + "\n")
    caption_grid().save(args.output_dir / "demo_grid.png")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
