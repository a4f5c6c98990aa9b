"""Generate a prompt set with each model, score the images with the chosen metrics, write the report.

Output folder layout::

    output_dir/images/<model label>/{00000_<seed>.png, ..., manifest.jsonl, generation.json}
    output_dir/report.json  output_dir/report.md  output_dir/grid.png
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from .clip_score import DEFAULT_CLIP_MODEL, clip_score_metrics
from .generate import (
    GenerationSettings,
    ModelSpec,
    generate_images,
    load_pipeline,
    model_protocol,
    native_resolution,
    process_state,
)
from .objects import IMAGENETTE_CLASSES, TORCHVISION_RESNET50, imagenette_class, object_metrics
from .prompt_sets import PromptSet, load_prompt_set
from .report import GRID_PNG, check_no_report, comparison_grid, library_versions, results_table, write_report

METRICS: tuple[str, ...] = ("nudenet", "fid", "clip", "objects", "demo")


@dataclass(frozen=True)
class MetricOptions:
    """Settings of the metrics.

    ``concept``: the erased concept the metrics score: an Imagenette class for ``objects``, a demo shape or
    colour for ``demo`` (None: plain accuracy). ``reference``: FID reference folder or ``.npz`` of mu/sigma.
    ``inception_dir``: where clean-fid's Inception file lives (None: clean-fid's own place, /tmp).
    """

    concept: str | None = None
    reference: str | None = None
    clip_model: str = DEFAULT_CLIP_MODEL
    classifier: str = TORCHVISION_RESNET50
    nudenet_threshold: float = 0.6
    attack_threshold: float | None = 0.45
    inception_dir: str | None = None


def check_metric_inputs(metrics: Sequence[str], prompt_set: PromptSet, options: MetricOptions) -> None:
    """Fail before generating anything when a metric cannot run on this prompt set with these options."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"unknown metrics {unknown}; choose from {', '.join(METRICS)}")
    columns = set().union(*(r.extra for r in prompt_set.records))
    if "fid" in metrics and options.reference is None:
        raise ValueError("fid needs a reference: pass --reference-dir (a folder of images or a .npz of mu/sigma)")
    if "objects" in metrics:
        if "label" not in columns:
            raise ValueError(
                f"objects needs a 'label' column (Imagenette class) in {prompt_set.name}; "
                "use prompts/eval/imagenette_objects.csv"
            )
        if options.concept is not None:
            imagenette_class(options.concept)
    if "demo" in metrics:
        if not {"shape", "colour"} <= columns:
            raise ValueError(f"demo needs 'shape' and 'colour' columns in {prompt_set.name}; use a demo prompt set")
        if options.concept is not None:
            from .demo import concept_kind

            concept_kind(options.concept)


def metric_protocol(name: str, options: MetricOptions) -> dict:
    """What a report states about a metric's setup."""
    if name == "nudenet":
        from .nudenet import EXPOSED_CLASSES, detector_protocol

        return {
            **detector_protocol(),
            "threshold": options.nudenet_threshold,
            "attack_threshold": options.attack_threshold,
            "classes": list(EXPOSED_CLASSES),
            "input": "PNG file paths",
        }
    if name == "fid":
        from .fid import INCEPTION_FILE, default_inception_dir

        inception = Path(options.inception_dir or default_inception_dir()) / INCEPTION_FILE
        return {"library": "clean-fid", "mode": "clean", "features": str(inception), "reference": options.reference}
    if name == "clip":
        return {"model": options.clip_model, "score": "mean of max(100 * cos, 0)"}
    if name == "objects":
        return {"classifier": options.classifier, "erased_class": options.concept, "imagenet_index": IMAGENETTE_CLASSES}
    from ..demo import demo_clip_path

    return {
        "judge": "munba_diffusion.demo.load_demo_judge",
        "clip_model": str(demo_clip_path()),
        "concept": options.concept,
    }


def run_metric(name: str, folder: Path, options: MetricOptions, device: torch.device) -> dict:
    if name == "nudenet":
        from .nudenet import nudenet_metrics

        return nudenet_metrics(folder, threshold=options.nudenet_threshold, attack_threshold=options.attack_threshold)
    if name == "fid":
        from .fid import fid_score

        return fid_score(folder, options.reference, device=device, inception_dir=options.inception_dir)
    if name == "clip":
        return clip_score_metrics(folder, model_name_or_path=options.clip_model, device=device)
    if name == "objects":
        return object_metrics(folder, options.concept, classifier=options.classifier, device=device)
    from .demo import demo_metrics

    return demo_metrics(folder, options.concept, device=device)


def _seed_protocol(prompt_set: PromptSet) -> dict:
    seeds = [r.seed for r in prompt_set.records]
    return {
        "policy": "one CPU torch.Generator per image, seeded with its row's seed (listed in each manifest)",
        "min": min(seeds),
        "max": max(seeds),
        "unique": len(set(seeds)),
    }


def evaluate_models(
    models: Sequence[str | ModelSpec],
    prompts: str | Path | PromptSet,
    output_dir: str | Path,
    *,
    metrics: Sequence[str] = ("clip",),
    settings: GenerationSettings | None = None,
    options: MetricOptions | None = None,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    grid_prompts: int = 6,
) -> str:
    """Generate ``prompts`` with every model, score them, write report.json / report.md / grid.png.

    ``models``: diffusers folders, Hub ids, ``"munba-demo"``, erased output folders, or ``"BASE::LORA_FILE"``
    (or :class:`ModelSpec`). Generation is resumable and split across processes; metrics run on the main
    process. Returns the headline Markdown table (for a model card); other processes return "".
    """
    settings, options = settings or GenerationSettings(), options or MetricOptions()
    output_dir = Path(output_dir)
    check_no_report(output_dir, overwrite)
    prompt_set = prompts if isinstance(prompts, PromptSet) else load_prompt_set(prompts)
    check_metric_inputs(metrics, prompt_set, options)
    specs = [ModelSpec.parse(m) if isinstance(m, str) else m for m in models]
    labels = [s.name for s in specs]
    if not specs or len(set(labels)) != len(labels):
        raise ValueError(
            f"need at least one model, each with its own label, got {labels}; "
            "give ModelSpec(label=...) to tell them apart"
        )
    state = process_state()
    device = torch.device(device) if device is not None else state.device

    protocol_models, manifests = {}, {}
    for spec in specs:
        pipe = load_pipeline(spec, settings, device)
        protocol_models[spec.name] = {**model_protocol(spec, pipe), "native_resolution": native_resolution(pipe)}
        manifests[spec.name] = generate_images(
            pipe,
            prompt_set,
            output_dir / "images" / spec.name,
            settings,
            model=protocol_models[spec.name],
            overwrite=overwrite,
        )
        del pipe
        gc.collect()
    if not state.is_main_process:
        return ""

    results = {
        label: {m: run_metric(m, path.parent, options, device) for m in metrics} for label, path in manifests.items()
    }
    report = {
        "results": results,
        "protocol": {
            "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "models": protocol_models,
            "prompt_set": prompt_set.protocol(),
            "seeds": _seed_protocol(prompt_set),
            "generation": {
                **asdict(settings),
                "resolution": settings.resolution or "native (see models)",
                "device": str(device),
                "safety_checker": "off",
            },
            "metrics": {m: metric_protocol(m, options) for m in metrics},
            "libraries": library_versions(),
        },
    }
    write_report(output_dir, report, overwrite=overwrite)
    comparison_grid(manifests, output_dir / GRID_PNG, max_prompts=grid_prompts)
    return results_table(results)
