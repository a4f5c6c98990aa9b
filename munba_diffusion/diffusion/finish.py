"""After training: the before/after grid, then the output folder written once (model, record, evaluation, card),
then the optional Hub upload."""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from .base_model import base_commit
from .config import ErasureTrainingConfig
from .export import (
    check_output_dir,
    erased_model_card,
    push_erased_model_to_hub,
    read_evaluation_reports,
    run_record,
    staged_output_dir,
    write_erased_model,
    write_model_card,
)
from .family import family_of_pipeline
from .lora import ADAPTER_NAME, adapters_disabled, denoiser, text_encoders

logger = logging.getLogger(__name__)
GRID_CELL = 160  # pixels per image in the before/after grid
GRID_BATCH = 8  # images per grid call (one call per image: 46 s, not 18 s, in the demo quick start)


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
    """Same prompt and seed, adapters off (top row: original) and on (bottom row: erased); labelled columns.

    Each row is generated in batches of up to ``GRID_BATCH`` columns, one seeded generator per image, so a column's
    starting noise is the one a single-image call with its seed would draw.
    """
    columns = [(p, s) for p in prompts for s in range(seeds)]
    rows = []
    for disabled in (True, False):
        images = []
        for start in range(0, len(columns), GRID_BATCH):
            chunk = columns[start : start + GRID_BATCH]
            kwargs = dict(
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=[torch.Generator().manual_seed(seed) for _, seed in chunk],
            )
            batch_prompts = [prompt for prompt, _ in chunk]
            with adapters_disabled(denoiser(pipe), *text_encoders(pipe)) if disabled else contextlib.nullcontext():
                images += pipe(batch_prompts, **kwargs).images
        rows.append(images)
    header, side = 50, 70
    grid = Image.new("RGB", (side + GRID_CELL * len(columns), header + 2 * GRID_CELL), "white")
    draw = ImageDraw.Draw(grid)
    for c, (prompt, seed) in enumerate(columns):
        _label(draw, (side + c * GRID_CELL, 0), f"{prompt} (seed {seed})", GRID_CELL)
        for r, row in enumerate(rows):
            grid.paste(
                row[c].resize((GRID_CELL, GRID_CELL), Image.Resampling.NEAREST),
                (side + c * GRID_CELL, header + r * GRID_CELL),
            )
    for r, name in enumerate(("original", "erased")):
        draw.text(
            (6, header + r * GRID_CELL + GRID_CELL // 2), name, fill=(20, 20, 20), font=ImageFont.load_default(size=14)
        )
    widget = [(prompt, rows[1][c]) for c, (prompt, seed) in enumerate(columns) if seed == 0][:4]
    return grid, widget


def _target_modules(model) -> list[str]:
    """The modules the erasure adapter of ``model`` adapts ([] when it has none)."""
    config = (getattr(model, "peft_config", None) or {}).get(ADAPTER_NAME)
    return sorted(config.target_modules) if config is not None else []


def _evaluate(evaluate, config: ErasureTrainingConfig, staging: Path) -> str | None:
    """The end-of-run evaluation; a failure (offline data, a missing detector, a full disk) costs the evaluation,
    never the trained model: it is logged in one line and the folder is written without it."""
    try:
        return evaluate(config, staging)
    except (ValueError, OSError, RuntimeError, ImportError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        logger.warning(
            "the end-of-run evaluation failed (%s); the erased model is saved without it: evaluate it later with "
            "eval/evaluate.py",
            first,
        )
        shutil.rmtree(staging / "evaluation", ignore_errors=True)
        return None


def validation_grid(config: ErasureTrainingConfig, pipe) -> tuple[Image.Image, list]:
    """:func:`before_after_grid` of the run's validation prompts, seeds, sampler steps and guidance (the family's
    when the run sets none)."""
    prompts = config.validation_prompts or default_validation_prompts(config.concepts)
    guidance = config.validation_guidance_scale
    if guidance is None:
        guidance = family_of_pipeline(pipe).validation_guidance(pipe)
    return before_after_grid(pipe, prompts, config.validation_seeds, config.validation_inference_steps, guidance)


def finish_erasure(
    config: ErasureTrainingConfig,
    pipe,
    names: list[str],
    *,
    drawn_grid: tuple[Image.Image, list] | None = None,
    train_seconds: float,
    pool_seconds: float,
    resolution: int,
    steps_skipped: int = 0,
    base_sha256: str | None = None,
    evaluate: Callable[[ErasureTrainingConfig, Path], str | None] | None = None,
) -> Image.Image:
    """Grid; then model, record, images, evaluation and model card into a staging folder swapped in once; upload.

    Returns the before/after grid (the trainer logs it to the trackers); ``drawn_grid``: one :func:`validation_grid`
    already drew (with ``--shard_base`` every process draws it together); ``base_sha256``: a local base's files
    (:func:`~munba_diffusion.models.model_folder_sha256`), recorded beside the Hub commit a Hub base has.

    ``evaluate(config, erased_folder)`` writes its reports under ``erased_folder/evaluation`` and returns the
    Markdown for the model card; the numbers of its ``evaluation/<concept>/report.json`` become the card's
    model-index (the command line passes
    :func:`munba_diffusion.evaluation.erasure.evaluate_erasure`; the trainer itself does not know the evaluators).
    """
    output_dir = check_output_dir(
        config.output_dir, config.overwrite_output_dir or config.resume_from_checkpoint is not None
    )
    grid, widget_images = drawn_grid or validation_grid(config, pipe)
    record = run_record(
        config,
        players=names,
        target_modules=_target_modules(denoiser(pipe)),
        text_encoder_target_modules=_target_modules(pipe.text_encoder),
        family=family_of_pipeline(pipe).describe(pipe),
        base_commit=base_commit(denoiser(pipe)),
        base_sha256=base_sha256,
        train_seconds=train_seconds,
        pool_seconds=pool_seconds,
        resolution=resolution,
        steps_skipped=steps_skipped,
    )
    with staged_output_dir(output_dir) as staging:
        widget = write_erased_model(pipe, staging, record, before_after=grid, widget_images=widget_images)
        table = _evaluate(evaluate, config, staging) if evaluate is not None and config.evaluate else None
        card = erased_model_card(
            record,
            widget=widget,
            has_before_after=True,
            evaluation_markdown=table,
            evaluation_reports=read_evaluation_reports(staging),
            model_id=config.hub_model_id or output_dir.name,
        )
        write_model_card(staging, card)
    if table:
        print(table)
    logger.info("wrote %s", output_dir)
    if config.push_to_hub:
        push_erased_model_to_hub(output_dir, config.hub_model_id, token=config.hub_token)
    return grid
