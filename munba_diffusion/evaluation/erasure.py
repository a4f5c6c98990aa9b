"""The end-of-run evaluation of an erasure: original versus erased on each concept's evaluation prompt set."""

from __future__ import annotations

from pathlib import Path

from ..diffusion.config import ErasureTrainingConfig
from ..presets import eval_prompts_path
from .evaluate import MetricOptions, evaluate_models
from .generate import GenerationSettings, ModelSpec

EVALUATION_BATCH_SIZE = 32  # images per generation call: the demo's 32x32 images fit many


def evaluate_erasure(config: ErasureTrainingConfig, erased_dir: Path) -> str | None:
    """Original vs erased on each concept's evaluation prompts, written into ``erased_dir/evaluation/<concept>``
    (``erased_dir`` is the staging copy of ``config.output_dir``; reports name the final folder);
    returns the Markdown tables, or None when no concept has an evaluation set for this base model.

    A preset names its evaluation set (``eval``) and the model it was written for (``default_model``); the set
    runs when the base model is that model, so a set is never scored on a model it cannot judge.

    Images go through the image cache (:class:`.generate.ImageCache`, shared with ``eval/evaluate.py``): the
    original model's images are made by the first run and copied by every later one with the same settings.
    """
    tables = []
    for concept in config.concepts:
        if not concept.eval_prompts or concept.default_model != config.pretrained_model_name_or_path:
            continue
        table = evaluate_models(
            [
                ModelSpec(config.pretrained_model_name_or_path, label="original"),
                ModelSpec(str(erased_dir), label="erased", final_path=str(config.output_dir)),
            ],
            eval_prompts_path(concept.eval_prompts),
            erased_dir / "evaluation" / concept.name,
            metrics=("demo",),
            settings=GenerationSettings(
                num_inference_steps=config.validation_inference_steps,
                guidance_scale=config.validation_guidance_scale,
                batch_size=EVALUATION_BATCH_SIZE,
            ),
            options=MetricOptions(concept=concept.name),
            overwrite=True,
        )
        tables.append(
            f"**{concept.name}** (prompts: `{concept.eval_prompts}`; full protocol in "
            f"`evaluation/{concept.name}/report.md`)\n\n{table}"
        )
    return "\n\n".join(tables) or None
