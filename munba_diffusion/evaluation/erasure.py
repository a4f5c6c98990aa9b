"""The end-of-run evaluation of an erasure: original versus erased on each concept's evaluation prompt set."""

from __future__ import annotations

from pathlib import Path

from ..diffusion.config import ErasureTrainingConfig
from ..diffusion.family import VALIDATION_GUIDANCE
from ..models import same_world
from ..presets import eval_prompts_path
from .demo import concept_prompt_set
from .evaluate import MetricOptions, evaluate_models
from .generate import GenerationSettings, ModelSpec
from .prompt_sets import PromptSet, load_prompt_set

EVALUATION_BATCH_SIZE = 32  # images per generation call: the demo's 32x32 images fit many
OTHER_PROMPT_SEEDS = 1
"""Seeds per prompt that does not ask for the concept, in the end-of-run evaluation: the concept's prompts keep every
seed of the set (4 in ``demo.csv``: 96 images for a colour or a shape), the other 72 prompts get their first seed,
so the erased model draws 168 images instead of 384 (``eval/evaluate.py`` draws the whole set)."""


def evaluation_plan(eval_set: str, concept: str) -> tuple[PromptSet, tuple[str, ...], MetricOptions]:
    """The prompts, metrics and options that score ``concept`` on a preset's evaluation set (its ``eval`` key):

    - ``demo``: the demo judge, cut to fit a training run (:data:`OTHER_PROMPT_SEEDS`);
    - ``imagenette_objects``: the ImageNet classifier's accuracy on the erased class and the others, CLIP score;
    - ``i2p-nudity``: I2P's prompts with nudity (the Hub dataset; NudeNet rates and attack success), CLIP score;
    - any other set (``artists``): CLIP score.
    """
    if eval_set == "demo":
        prompts = concept_prompt_set(load_prompt_set(eval_prompts_path(eval_set)), concept, OTHER_PROMPT_SEEDS)
        return prompts, ("demo",), MetricOptions(concept=concept)
    if eval_set == "i2p-nudity":
        return load_prompt_set("i2p", nudity_only=True), ("nudenet", "clip"), MetricOptions()
    prompts = load_prompt_set(eval_prompts_path(eval_set))
    if eval_set == "imagenette_objects":
        return prompts, ("objects", "clip"), MetricOptions(concept=concept.replace("-", " "))
    return prompts, ("clip",), MetricOptions()


def evaluate_erasure(config: ErasureTrainingConfig, erased_dir: Path) -> str | None:
    """Original vs erased on each concept's evaluation prompts, written into ``erased_dir/evaluation/<concept>``
    (``erased_dir`` is the staging copy of ``config.output_dir``; reports name the final folder);
    returns the Markdown tables, or None when no concept has an evaluation set for this base model.

    A preset names its evaluation set (``eval``) and the model it was written for (``default_model``); the set
    runs when the base model is that model or draws the same world (:func:`munba_diffusion.models.same_world`: the
    demo presets' set runs on both bundled demo models), so a set is never scored on a model it cannot judge.

    Images go through the image cache (:class:`.generate.ImageCache`, shared with ``eval/evaluate.py``): the
    original model's images are made by the first run and copied by every later one with the same settings.
    To fit a training run's time, the set is cut to every seed of the concept's prompts and
    :data:`OTHER_PROMPT_SEEDS` of every other prompt (:func:`.demo.concept_prompt_set`; the report's prompt-set
    name says so).
    """
    tables = []
    for concept in config.concepts:
        if not concept.eval_prompts or not same_world(config.pretrained_model_name_or_path, concept.default_model):
            continue
        prompts, metrics, options = evaluation_plan(concept.eval_prompts, concept.name)
        table = evaluate_models(
            [
                ModelSpec(config.pretrained_model_name_or_path, label="original"),
                ModelSpec(str(erased_dir), label="erased", final_path=str(config.output_dir)),
            ],
            prompts,
            erased_dir / "evaluation" / concept.name,
            metrics=metrics,
            settings=GenerationSettings(
                num_inference_steps=config.validation_inference_steps,
                guidance_scale=VALIDATION_GUIDANCE
                if config.validation_guidance_scale is None
                else config.validation_guidance_scale,
                batch_size=EVALUATION_BATCH_SIZE,
            ),
            options=options,
            overwrite=True,
        )
        tables.append(
            f"**{concept.name}** (prompts: `{concept.eval_prompts}`; full protocol in "
            f"`evaluation/{concept.name}/report.md`)\n\n{table}"
        )
    return "\n\n".join(tables) or None
