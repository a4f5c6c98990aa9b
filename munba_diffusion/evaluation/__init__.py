"""Evaluation: generate a prompt set with each model, score the images, write a report that states its protocol.

Modules: ``prompt_sets`` (CSV / I2P / packaged sets) and ``replay_sets`` (published adversarial prompt sets),
``generate`` (resumable, seeded, multi-process generation, the image cache), ``manifest`` (how metrics find images),
one module per metric (``nudenet``, ``fid``, ``clip_score``, ``objects``, ``demo``), ``intervals`` (95% Wilson
intervals of rates), ``report`` (report.json, report.md, grid.png), ``evaluate`` (all of it, for the CLI and the
trainer) and ``attack`` (the white-box prefix attack and replay attacks, for ``munba-attack``).
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
