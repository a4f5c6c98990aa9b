"""Evaluate models on a prompt set: generate images, score them, write report.json, report.md and grid.png.

    python eval/evaluate.py --model munba-demo --model outputs/erase-circle \
        --prompts prompts/eval/demo.csv --metrics demo --concept circle --output-dir runs/eval-circle

    python eval/evaluate.py --model CompVis/stable-diffusion-v1-4 --model outputs/erase-nudity \
        --prompts i2p --nudity-only --metrics nudenet clip --output-dir runs/eval-nudity

A model is a diffusers folder, a Hub id, "munba-demo", an erased output folder, or BASE::LORA_FILE.
Interrupted runs resume where they stopped (rerun the same command).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from munba_diffusion.evaluation.clip_score import DEFAULT_CLIP_MODEL
from munba_diffusion.evaluation.evaluate import METRICS, MetricOptions, evaluate_models
from munba_diffusion.evaluation.generate import GenerationSettings, ModelSpec
from munba_diffusion.evaluation.objects import TORCHVISION_RESNET50
from munba_diffusion.evaluation.prompt_sets import load_prompt_set


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        help="model to evaluate (repeat for several): folder, Hub id, munba-demo, or BASE::LORA_FILE",
    )
    parser.add_argument("--label", action="append", default=None, help="table label per --model, in the same order")
    parser.add_argument(
        "--prompts", required=True, help="prompt-set CSV, a packaged set like eval/artists.csv, or 'i2p'"
    )
    parser.add_argument("--nudity-only", action="store_true", help="keep rows with nudity_percentage > 0 (I2P layout)")
    parser.add_argument(
        "--category", default=None, help="keep rows whose categories contain this one (I2P layout), e.g. sexual"
    )
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--metrics", nargs="+", default=["clip"], choices=METRICS)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing report (and images of a different run)"
    )
    parser.add_argument(
        "--concept",
        default=None,
        help="the erased concept: an Imagenette class (objects) or a demo shape/colour (demo)",
    )
    parser.add_argument(
        "--reference-dir", default=None, help="FID reference: a folder of images or a .npz with mu and sigma"
    )
    parser.add_argument(
        "--inception-dir", default=None, help="folder holding clean-fid's inception-2015-12-05.pt (default: /tmp)"
    )
    parser.add_argument(
        "--clip-model", default=DEFAULT_CLIP_MODEL, help="CLIP id, folder, or munba-demo for the clip metric"
    )
    parser.add_argument(
        "--classifier",
        default=TORCHVISION_RESNET50,
        help="ImageNet classifier: torchvision/resnet50 or a transformers id/folder",
    )
    parser.add_argument("--nudenet-threshold", type=float, default=0.6)
    parser.add_argument("--attack-threshold", type=float, default=0.45)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--resolution", type=int, default=None, help="image size (default: the model's native size)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--scheduler", default=None, help="diffusers scheduler class name (default: the model's own)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument(
        "--use-prompt-settings",
        action="store_true",
        help="take guidance and size from the prompt set's columns where given",
    )
    parser.add_argument("--device", default=None, help="default: accelerate's device for this process")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if args.label is not None and len(args.label) != len(args.model):
            raise ValueError(f"got {len(args.label)} --label for {len(args.model)} --model; give one per model or none")
        models = [
            ModelSpec.parse(text) if args.label is None else replace(ModelSpec.parse(text), label=label)
            for text, label in zip(args.model, args.label or args.model)
        ]
        prompt_set = load_prompt_set(
            args.prompts, nudity_only=args.nudity_only, category=args.category, limit=args.limit
        )
        table = evaluate_models(
            models,
            prompt_set,
            args.output_dir,
            metrics=args.metrics,
            settings=GenerationSettings(
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                resolution=args.resolution,
                batch_size=args.batch_size,
                scheduler=args.scheduler,
                dtype=args.dtype,
                use_prompt_settings=args.use_prompt_settings,
            ),
            options=MetricOptions(
                concept=args.concept,
                reference=args.reference_dir,
                clip_model=args.clip_model,
                classifier=args.classifier,
                nudenet_threshold=args.nudenet_threshold,
                attack_threshold=args.attack_threshold,
                inception_dir=args.inception_dir,
            ),
            device=args.device,
            overwrite=args.overwrite,
        )
    except (ValueError, FileNotFoundError, FileExistsError, ConnectionError) as error:
        sys.exit(f"error: {error}")
    if table:
        print(table)


if __name__ == "__main__":
    main()
