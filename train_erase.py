#!/usr/bin/env python
"""Erase concepts from a Stable Diffusion model with MUNBa (Nash-bargained LoRA fine-tuning).

    accelerate launch train_erase.py --concept nudity --output_dir sd14-no-nudity
    python train_erase.py --pretrained_model_name_or_path munba-demo --concept circle --output_dir demo-no-circle

Every step bargains between a preservation player and one forgetting player per ``--concept``; see
munba_diffusion/diffusion/train.py. The output folder loads with diffusers (README "Using an erased model").
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from munba_diffusion.bargaining import COMBINERS
from munba_diffusion.diffusion.latents import LATENT_SOURCES
from munba_diffusion.diffusion.lora import TARGET_SETS, ErasureLoraConfig
from munba_diffusion.diffusion.losses import FORGET_LOSSES
from munba_diffusion.diffusion.train import ErasureTrainingConfig, train_erasure
from munba_diffusion.presets import ConceptPreset, read_prompt_file, resolve_concept

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", default=DEFAULT_MODEL,
                   help="Hub id, local diffusers folder, or 'munba-demo' (the bundled tiny model)")
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None, help="e.g. fp16")
    g = p.add_argument_group("what to erase")
    g.add_argument("--concept", action="append", required=True,
                   help="preset name (see prompts/presets), a preset .yaml, or 'text:<phrase>'; repeat to erase several concepts at once")
    g.add_argument("--forget_prompts_file", type=Path, default=None, help="replace the forget prompts (one per line; single concept)")
    g.add_argument("--preserve_prompts_file", type=Path, default=None, help="replace the preservation prompts (one per line)")
    g.add_argument("--anchor_prompt", default=None, help="replace the anchor prompt of every forget prompt")
    g = p.add_argument_group("method")
    g.add_argument("--forget_loss", choices=FORGET_LOSSES, default="esd")
    g.add_argument("--negative_guidance", type=float, default=1.0, help="eta of the esd loss")
    g.add_argument("--combiner", choices=COMBINERS, default="nash")
    g.add_argument("--combiner_weights", type=float, nargs="+", default=None,
                   help="fixed weights for --combiner sum (preserve first, then each concept)")
    g.add_argument("--lora_target", choices=TARGET_SETS, default="xattn")
    g.add_argument("--rank", type=int, default=4)
    g.add_argument("--lora_alpha", type=float, default=None, help="default: the rank")
    g = p.add_argument_group("latents")
    g.add_argument("--latent_source", choices=LATENT_SOURCES, default="pool")
    g.add_argument("--pool_trajectories", type=int, default=2, help="frozen-model trajectories per prompt in the pool")
    g.add_argument("--sampler_steps", type=int, default=25)
    g.add_argument("--sampler_guidance_scale", type=float, default=7.5)
    g.add_argument("--forget_image_dir", type=Path, default=None, help="images of the concept instead of data-free latents")
    g.add_argument("--preserve_image_dir", type=Path, default=None)
    g = p.add_argument_group("training")
    g.add_argument("--output_dir", type=Path, required=True)
    g.add_argument("--overwrite_output_dir", action="store_true")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resolution", type=int, default=None, help="default: the model's native size")
    g.add_argument("--train_batch_size", type=int, default=1, help="per player and process")
    g.add_argument("--max_train_steps", type=int, default=500)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--lr_scheduler", default="constant",
                   help='"linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"')
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="default: accelerate config's choice, else no")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    g.add_argument("--report_to", default="none", help='"tensorboard", "wandb", "all" or "none"')
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help='a checkpoint-N folder or "latest"')
    g = p.add_argument_group("validation and sharing")
    g.add_argument("--validation_prompt", action="append", default=None, help="repeat for several")
    g.add_argument("--validation_seeds", type=int, default=2)
    g.add_argument("--validation_guidance_scale", type=float, default=7.5)
    g.add_argument("--validation_inference_steps", type=int, default=25)
    g.add_argument("--no_evaluation", action="store_true", help="skip the demo evaluation at the end")
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", default=None)
    g.add_argument("--hub_token", default=None)
    args = p.parse_args(argv)
    if args.max_train_steps < 1:
        p.error("--max_train_steps must be at least 1")
    return args


def concepts_from_args(args: argparse.Namespace) -> list[ConceptPreset]:
    """Resolve every --concept and apply the prompt-file overrides."""
    from dataclasses import replace

    concepts = [resolve_concept(spec) for spec in args.concept]
    if len({c.name for c in concepts}) != len(concepts):
        raise ValueError("the same concept is given twice; pass each --concept once")
    if args.forget_prompts_file:
        if len(concepts) > 1:
            raise ValueError("--forget_prompts_file replaces one concept's prompts; use preset .yaml files for several")
        forget = read_prompt_file(args.forget_prompts_file)
        concepts[0] = replace(concepts[0], forget_prompts=forget, anchor_prompts=(concepts[0].anchor_prompts[0],) * len(forget))
    if args.preserve_prompts_file:
        preserve = read_prompt_file(args.preserve_prompts_file)
        concepts = [replace(c, preserve_prompts=preserve) for c in concepts]
    if args.anchor_prompt is not None:
        concepts = [replace(c, anchor_prompts=(args.anchor_prompt,) * len(c.forget_prompts)) for c in concepts]
    return concepts


def config_from_args(args: argparse.Namespace) -> ErasureTrainingConfig:
    return ErasureTrainingConfig(
        pretrained_model_name_or_path=args.pretrained_model_name_or_path,
        concepts=concepts_from_args(args),
        output_dir=args.output_dir,
        revision=args.revision,
        variant=args.variant,
        forget_loss=args.forget_loss,
        negative_guidance=args.negative_guidance,
        combiner=args.combiner,
        combiner_weights=args.combiner_weights,
        lora=ErasureLoraConfig(rank=args.rank, alpha=args.lora_alpha, target=args.lora_target),
        resolution=args.resolution,
        train_batch_size=args.train_batch_size,
        max_train_steps=args.max_train_steps,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        gradient_checkpointing=args.gradient_checkpointing,
        learning_rate=args.learning_rate,
        lr_scheduler=args.lr_scheduler,
        lr_warmup_steps=args.lr_warmup_steps,
        max_grad_norm=args.max_grad_norm or None,
        mixed_precision=args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no"),
        seed=args.seed,
        latent_source=args.latent_source,
        pool_trajectories=args.pool_trajectories,
        sampler_steps=args.sampler_steps,
        sampler_guidance_scale=args.sampler_guidance_scale,
        forget_image_dir=args.forget_image_dir,
        preserve_image_dir=args.preserve_image_dir,
        checkpointing_steps=args.checkpointing_steps,
        checkpoints_total_limit=args.checkpoints_total_limit,
        resume_from_checkpoint=args.resume_from_checkpoint,
        report_to=args.report_to,
        enable_xformers_memory_efficient_attention=args.enable_xformers_memory_efficient_attention,
        validation_prompts=args.validation_prompt,
        validation_seeds=args.validation_seeds,
        validation_guidance_scale=args.validation_guidance_scale,
        validation_inference_steps=args.validation_inference_steps,
        evaluate=not args.no_evaluation,
        overwrite_output_dir=args.overwrite_output_dir,
        push_to_hub=args.push_to_hub,
        hub_model_id=args.hub_model_id,
        hub_token=args.hub_token,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        train_erasure(config_from_args(args))
    except (ValueError, OSError) as error:  # bad input: one line that names the fix, no traceback
        sys.exit(f"train_erase.py: error: {error}")


if __name__ == "__main__":
    main()
