"""Measure the bundled demo world and draw what its text-to-image models make (the README's numbers and pictures).

    python scripts/demo/measure_demo.py --output_dir docs/demo                          # munba-demo
    python scripts/demo/measure_demo.py --output_dir docs/demo --model munba-demo-flow  # the flow demo

Writes ``demo_world.json`` (judge and CLIP accuracy on fresh renders, the VAE round trip, and how often the judge
agrees with the text-to-image model for every shape x colour caption, overall on the training scripts' judging seeds
and caption by caption on seeds they never use: the quality bar is per caption) and ``demo_grid.png``; for the flow
demo ``demo_world_flow.json`` and ``demo_grid_flow.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from train_demo import clip_zero_shot_accuracy, judge_pipeline, load_tokenizer, render_dataset
from transformers import CLIPModel

from munba_diffusion.demo import COLOURS, SHAPES, canonical_caption, demo_clip_path, load_demo_judge
from munba_diffusion.diffusion.base_model import load_base_pipeline
from munba_diffusion.models import DEMO_MODEL

FRESH_SEED = 777_000  # renders no training stage has seen (training seeds are < 100)
HELD_OUT_SEED = 5000  # generator seeds the training scripts never judge with (they use 1000 + i)
SAMPLER_STEPS = {DEMO_MODEL: 25, "munba-demo-flow": 28}  # as each model's training script judges it


def per_caption_judgement(pipe, judge, seeds_per_caption: int, steps: int, guidance: float) -> dict:
    """Each "a {colour} {shape}" caption's share of images judged right for shape and for colour, over
    ``seeds_per_caption`` held-out seeds (5000 + 100 k + caption index)."""
    combos = [(shape, colour) for shape in SHAPES for colour in COLOURS]
    right = {f"{colour} {shape}": [0, 0] for shape, colour in combos}
    for k in range(seeds_per_caption):
        images = pipe(
            [canonical_caption(shape, colour) for shape, colour in combos],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator().manual_seed(HELD_OUT_SEED + 100 * k + i) for i in range(len(combos))],
            output_type="pt",
        ).images
        verdict = judge.classify(images)
        for (shape, colour), s, c in zip(combos, verdict.shape.tolist(), verdict.colour.tolist()):
            right[f"{colour} {shape}"][0] += SHAPES[s] == shape
            right[f"{colour} {shape}"][1] += COLOURS[c] == colour
    images = seeds_per_caption * len(combos)
    return {
        "images": images,
        "seeds": f"{HELD_OUT_SEED} + 100 k + caption index, k < {seeds_per_caption}",
        "shape_accuracy": sum(r[0] for r in right.values()) / images,
        "colour_accuracy": sum(r[1] for r in right.values()) / images,
        "per_caption": {
            name: {"shape": s / seeds_per_caption, "colour": c / seeds_per_caption} for name, (s, c) in right.items()
        },
    }


def measure(
    model: str = DEMO_MODEL, seeds_per_caption: int = 4, held_out_seeds: int = 8, guidance: float = 4.0
) -> dict:
    steps = SAMPLER_STEPS[model]
    judge = load_demo_judge()
    images, shapes, colours = render_dataset(2000, FRESH_SEED)
    out = judge.classify(images)
    clip = CLIPModel.from_pretrained(demo_clip_path()).eval()
    zero_shot = clip_zero_shot_accuracy(clip, load_tokenizer(demo_clip_path()), images, shapes, colours)
    pipe = load_base_pipeline(model)
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
        "model": model,
        "text_to_image_judged": judge_pipeline(pipe, judge, seeds_per_caption, steps, guidance),
        "text_to_image_per_caption": per_caption_judgement(pipe, judge, held_out_seeds, steps, guidance),
        "parameters": {
            **{
                name: sum(p.numel() for p in component.parameters())
                for name, component in pipe.components.items()
                if isinstance(component, torch.nn.Module)
            },
            "clip": sum(p.numel() for p in clip.parameters()),
            "judge": sum(p.numel() for p in judge.parameters()),
        },
    }


def caption_grid(model: str = DEMO_MODEL, seeds: int = 6, guidance: float = 4.0, cell: int = 48) -> Image.Image:
    """One row per caption "a {colour} {shape}", one column per seed."""
    pipe = load_base_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    steps = SAMPLER_STEPS[model]
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
    parser.add_argument("--model", choices=sorted(SAMPLER_STEPS), default=DEMO_MODEL)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.model == DEMO_MODEL else "_flow"
    results = measure(args.model)
    (args.output_dir / f"demo_world{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    caption_grid(args.model).save(args.output_dir / f"demo_grid{suffix}.png")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
