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
from munba_diffusion.evaluation.intervals import rate_entry, rate_fields
from munba_diffusion.models import DEMO_MODEL

FRESH_SEED = 777_000  # renders no training stage has seen (training seeds are < 100)
HELD_OUT_SEED = 5000  # generator seeds the training scripts never judge with (they use 1000 + i)
SAMPLER_STEPS = {DEMO_MODEL: 25, "munba-demo-flow": 28}  # as each model's training script judges it
QUALITY_BAR = 0.9  # every caption judged right at least this often, for shape and for colour
HELD_OUT_SEEDS = 32  # per caption: the bar is then 29 of 32, where at 8 one image moved a caption 12.5 points


def per_caption_judgement(
    pipe, judge, seeds_per_caption: int, steps: int, guidance: float, first_seed: int = HELD_OUT_SEED
) -> dict:
    """Each "a {colour} {shape}" caption's share of images judged right for shape and for colour, with its 95%
    Wilson interval, over ``seeds_per_caption`` held-out seeds (``first_seed`` + 100 k + caption index), and the
    captions under the quality bar (right less than 90% of the time for shape or for colour)."""
    combos = [(shape, colour) for shape in SHAPES for colour in COLOURS]
    hits = {f"{colour} {shape}": ([], []) for shape, colour in combos}
    for k in range(seeds_per_caption):
        images = pipe(
            [canonical_caption(shape, colour) for shape, colour in combos],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator().manual_seed(first_seed + 100 * k + i) for i in range(len(combos))],
            output_type="pt",
        ).images
        verdict = judge.classify(images)
        for (shape, colour), s, c in zip(combos, verdict.shape.tolist(), verdict.colour.tolist()):
            hits[f"{colour} {shape}"][0].append(SHAPES[s] == shape)
            hits[f"{colour} {shape}"][1].append(COLOURS[c] == colour)
    per_caption = {
        name: {"shape": rate_entry(shape_hits), "colour": rate_entry(colour_hits)}
        for name, (shape_hits, colour_hits) in hits.items()
    }
    return {
        "images": seeds_per_caption * len(combos),
        "seeds": f"{first_seed} + 100 k + caption index, k < {seeds_per_caption}",
        "steps": steps,
        "guidance_scale": guidance,
        **rate_fields("shape_accuracy", [h for shape_hits, _ in hits.values() for h in shape_hits]),
        **rate_fields("colour_accuracy", [h for _, colour_hits in hits.values() for h in colour_hits]),
        "quality_bar": QUALITY_BAR,
        "captions_under_bar": sorted(
            name for name, rates in per_caption.items() if min(r["rate"] for r in rates.values()) < QUALITY_BAR
        ),
        "per_caption": per_caption,
    }


def measure(
    model: str = DEMO_MODEL,
    seeds_per_caption: int = 4,
    held_out_seeds: int = HELD_OUT_SEEDS,
    guidance: float = 4.0,
    held_out_seed: int = HELD_OUT_SEED,
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
        "text_to_image_per_caption": per_caption_judgement(pipe, judge, held_out_seeds, steps, guidance, held_out_seed),
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
    parser.add_argument(
        "--held_out_seeds",
        "--held-out-seeds",
        type=int,
        default=HELD_OUT_SEEDS,
        help=f"seeds per caption for the per-caption judgement (default {HELD_OUT_SEEDS})",
    )
    parser.add_argument(
        "--held_out_seed",
        "--held-out-seed",
        type=int,
        default=HELD_OUT_SEED,
        help=f"first generator seed of the per-caption judgement (default {HELD_OUT_SEED}; seed k of caption i is this + "
        "100 k + i, so with 32 seeds per caption 8200 and up share none with the default's)",
    )
    parser.add_argument(
        "--guidance", type=float, default=4.0, help="guidance of every judged image and of the grid (default 4)"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.held_out_seeds < 1:
        parser.error(f"--held_out_seeds must be at least 1, got {args.held_out_seeds}")
    if args.held_out_seed < 0:
        parser.error(f"--held_out_seed must be at least 0, got {args.held_out_seed}")
    if args.guidance < 0:
        parser.error(f"--guidance must be at least 0, got {args.guidance}")
    torch.set_num_threads(args.threads)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.model == DEMO_MODEL else "_flow"
    results = measure(
        args.model, held_out_seeds=args.held_out_seeds, guidance=args.guidance, held_out_seed=args.held_out_seed
    )
    (args.output_dir / f"demo_world{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    caption_grid(args.model, guidance=args.guidance).save(args.output_dir / f"demo_grid{suffix}.png")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
