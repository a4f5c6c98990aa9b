"""Evaluation: generate a prompt set with each model, score the images, write a report that states its protocol.

Modules: ``prompt_sets`` (CSV / I2P / packaged sets), ``generate`` (resumable, seeded, multi-process generation),
``manifest`` (how metrics find images), one module per metric (``nudenet``, ``fid``, ``clip_score``, ``objects``,
``demo``), ``report`` (report.json, report.md, grid.png) and ``evaluate`` (all of it, for the CLI and the trainer).
"""

from .evaluate import METRICS, EvaluationConfig, MetricOptions, evaluate_models, run_evaluation
from .generate import GenerationSettings, ModelSpec, generate_images
from .prompt_sets import PromptSet, load_prompt_set

__all__ = [
    "METRICS",
    "EvaluationConfig",
    "GenerationSettings",
    "MetricOptions",
    "ModelSpec",
    "PromptSet",
    "evaluate_models",
    "generate_images",
    "load_prompt_set",
    "run_evaluation",
]
