"""After training: the before/after grid, the exported folder, its evaluation and model card, the Hub upload."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from .export import export_erased_model, push_erased_model_to_hub, rewrite_model_card
from .lora import ADAPTER_NAME, adapters_disabled

logger = logging.getLogger(__name__)
GRID_CELL = 160


def default_validation_prompts(concepts, per_concept: int = 3, preserve: int = 3) -> list[str]:
    prompts = [p for c in concepts for p in c.forget_prompts[:per_concept]]
    prompts += [p for p in concepts[0].preserve_prompts[:preserve] if p not in prompts]
    return prompts


def _label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, width: int) -> None:
    font = ImageFont.load_default(size=13)
    words, line, lines = text.split(), "", []
    for word in words:
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=font) > width - 6 and line:
            lines.append(line)
            line = word
        else:
            line = candidate
    lines.append(line)
    for i, text_line in enumerate(lines[:3]):
        draw.text((xy[0] + 3, xy[1] + 2 + 15 * i), text_line, fill=(20, 20, 20), font=font)


@torch.no_grad()
def before_after_grid(pipe, prompts: list[str], seeds: int, steps: int, guidance: float) -> tuple[Image.Image, list]:
    """Same prompt and seed, adapters off (top row: original) and on (bottom row: erased); labelled columns."""
    columns = [(p, s) for p in prompts for s in range(seeds)]
    rows = []
    for disabled in (True, False):
        images = []
        for prompt, seed in columns:
            kwargs = dict(num_inference_steps=steps, guidance_scale=guidance,
                          generator=torch.Generator().manual_seed(seed))
            if disabled:
                with adapters_disabled(pipe.unet):
                    images.append(pipe(prompt, **kwargs).images[0])
            else:
                images.append(pipe(prompt, **kwargs).images[0])
        rows.append(images)
    header, side = 50, 70
    grid = Image.new("RGB", (side + GRID_CELL * len(columns), header + 2 * GRID_CELL), "white")
    draw = ImageDraw.Draw(grid)
    for c, (prompt, seed) in enumerate(columns):
        _label(draw, (side + c * GRID_CELL, 0), f"{prompt} (seed {seed})", GRID_CELL)
        for r, row in enumerate(rows):
            grid.paste(row[c].resize((GRID_CELL, GRID_CELL), Image.Resampling.NEAREST),
                       (side + c * GRID_CELL, header + r * GRID_CELL))
    for r, name in enumerate(("original", "erased")):
        draw.text((6, header + r * GRID_CELL + GRID_CELL // 2), name, fill=(20, 20, 20),
                  font=ImageFont.load_default(size=14))
    widget = [(prompt, rows[1][c]) for c, (prompt, seed) in enumerate(columns) if seed == 0][:4]
    return grid, widget


def erasure_record(config, names: list[str], stats: dict) -> dict:
    """The erasure_config.json content (ErasureConfig schema of export.py)."""
    from ..demo import is_demo_model

    concepts = []
    for c in config.concepts:
        anchors = sorted(set(c.anchor_prompts))
        concepts.append({"name": c.name, "forget_prompts": list(c.forget_prompts),
                         "preserve_prompts": list(c.preserve_prompts),
                         "anchor": anchors[0] if len(anchors) == 1 else None})
    return {
        "base_model": config.pretrained_model_name_or_path,
        "revision": config.revision,
        "variant": config.variant,
        "license": "apache-2.0" if is_demo_model(config.pretrained_model_name_or_path) else None,
        "concepts": concepts,
        "loss": config.forget_loss,
        "combiner": config.combiner,
        "lora": {"rank": config.lora.rank, "alpha": float(config.lora.alpha or config.lora.rank),
                 "target_modules": stats["target_modules"], "preset": config.lora.target},
        "training": {"max_train_steps": config.max_train_steps, "learning_rate": config.learning_rate,
                     "train_batch_size": config.train_batch_size, "seed": config.seed,
                     "resolution": config.resolution,
                     "gradient_accumulation_steps": config.gradient_accumulation_steps,
                     "mixed_precision": config.mixed_precision},
        "extra": {
            "players": names,
            "anchor_prompts": {c.name: list(c.anchor_prompts) for c in config.concepts},
            "negative_guidance": config.negative_guidance,
            "combiner_weights": config.combiner_weights,
            "latent_source": config.latent_source,
            "pool_trajectories": config.pool_trajectories,
            "sampler_steps": config.sampler_steps,
            "sampler_guidance_scale": config.sampler_guidance_scale,
            "lr_scheduler": config.lr_scheduler, "lr_warmup_steps": config.lr_warmup_steps,
            "max_grad_norm": config.max_grad_norm,
            "train_seconds": round(stats["train_seconds"], 1),
            "latent_pool_seconds": round(stats["pool_seconds"], 1),
            "concept_sources": [c.source for c in config.concepts],
        },
    }


def evaluate_erasure(config, output_dir: Path) -> str | None:
    """Original vs erased on the concept's evaluation prompts, when the preset names a bundled set that the
    base model can be scored on (the demo world, offline); returns the Markdown table, else None."""
    from ..demo import is_demo_model
    from ..evaluation.evaluate import MetricOptions, evaluate_models
    from ..evaluation.generate import GenerationSettings, ModelSpec
    from ..presets import eval_prompts_path

    if not config.evaluate or not is_demo_model(config.pretrained_model_name_or_path):
        return None
    tables = []
    for concept in config.concepts:
        if not concept.eval_prompts:
            continue
        eval_dir = output_dir / "evaluation" / concept.name
        table = evaluate_models(
            [ModelSpec(config.pretrained_model_name_or_path, label="original"), ModelSpec(str(output_dir), label="erased")],
            eval_prompts_path(concept.eval_prompts), eval_dir, metrics=("demo",),
            settings=GenerationSettings(num_inference_steps=config.validation_inference_steps,
                                        guidance_scale=config.validation_guidance_scale, batch_size=32),
            options=MetricOptions(concept=concept.name), overwrite=True,
        )
        tables.append(f"**{concept.name}** (prompts: `{concept.eval_prompts}`; full protocol in "
                      f"`evaluation/{concept.name}/report.md`)\n\n{table}")
    return "\n\n".join(tables) or None


def finish_erasure(config, pipe, names: list[str], *, train_seconds: float, pool_seconds: float) -> None:
    """Grid, export, evaluation (demo), model card, optional upload."""
    output_dir = Path(config.output_dir)
    prompts = config.validation_prompts or default_validation_prompts(config.concepts)
    grid, widget = before_after_grid(pipe, prompts, config.validation_seeds, config.validation_inference_steps,
                                     config.validation_guidance_scale)
    stats = {"train_seconds": train_seconds, "pool_seconds": pool_seconds,
             "target_modules": sorted(pipe.unet.peft_config[ADAPTER_NAME].target_modules)}
    export_erased_model(pipe, output_dir, erasure_record(config, names, stats), before_after=grid,
                        widget_images=widget, hub_model_id=config.hub_model_id,
                        overwrite_output_dir=config.overwrite_output_dir or config.resume_from_checkpoint is not None)
    table = evaluate_erasure(config, output_dir)
    if table:
        rewrite_model_card(output_dir, evaluation_markdown=table, hub_model_id=config.hub_model_id)
        print(table)
    logger.info("wrote %s", output_dir)
    if config.push_to_hub:
        if not config.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/sd14-erase-nudity)")
        push_erased_model_to_hub(output_dir, config.hub_model_id, token=config.hub_token)
