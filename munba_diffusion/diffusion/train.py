"""The concept-erasure training loop that ``train_erase.py`` drives.

Every optimizer step has 1 + K players: ``preserve`` (keep the frozen model's predictions on neighbouring prompts)
and one ``forget:<concept>`` player per erased concept. Each player's gradient over the LoRA weights is taken
separately, from its own LoRA forward over its own rows (one graph alive at a time), and the bargaining rule
(``munba_diffusion.bargaining``) chooses the update direction; with gradient accumulation the players'
gradients are summed over the micro-batches and bargained once.

The frozen teacher is the same UNet with its adapter disabled; the noisy latents come from a pool of the frozen
model's own sampling trajectories (see :mod:`munba_diffusion.diffusion.latents`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..bargaining import get_combiner
from ..presets import ConceptPreset
from ..step import apply_player_gradients, clip_gradients_, player_gradients
from .latents import (FreshTrajectories, LatentBatch, NoisedImages, SamplerSettings, TrajectoryPool,
                      encode_image_folder)
from .base_model import load_base_pipeline
from .lora import ErasureLoraConfig, adapters_disabled, add_erasure_lora, lora_state_dict, load_lora_state_dict
from .losses import esd_target, forget_loss, preservation_loss

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LOG_FILE = "train_log.jsonl"
LORA_CHECKPOINT_NAME = "erasure_lora.safetensors"
ZERO_DIRECTION_WARN_STEPS = 10  # warn when this many first steps (or the whole run, if shorter) did not move


@dataclass
class ErasureTrainingConfig:
    """Everything an erasure run needs (the argument names follow diffusers' training scripts)."""

    pretrained_model_name_or_path: str
    concepts: list[ConceptPreset]
    output_dir: Path
    revision: str | None = None
    variant: str | None = None
    forget_loss: str = "esd"
    negative_guidance: float = 1.0
    combiner: str = "nash"
    combiner_weights: list[float] | None = None
    lora: ErasureLoraConfig = field(default_factory=ErasureLoraConfig)
    resolution: int | None = None
    train_batch_size: int = 1
    max_train_steps: int = 500
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    seed: int = 0
    latent_source: str = "pool"
    pool_trajectories: int = 2
    sampler_steps: int = 25
    sampler_guidance_scale: float = 7.5
    forget_image_dir: Path | None = None
    preserve_image_dir: Path | None = None
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    report_to: str = "none"
    enable_xformers_memory_efficient_attention: bool = False
    validation_prompts: list[str] | None = None
    validation_seeds: int = 2
    validation_guidance_scale: float = 7.5
    validation_inference_steps: int = 25
    evaluate: bool = True
    overwrite_output_dir: bool = False
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_token: str | None = None
    fp16_loss_scale: float = 1024.0

    def player_names(self) -> list[str]:
        forget = ["forget"] if len(self.concepts) == 1 else [f"forget:{c.name}" for c in self.concepts]
        return ["preserve", *forget]


# ------------------------------------------------------------------------------------------ output folder
def _checkpoint_dirs(output_dir: Path) -> list[Path]:
    root = output_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")
             and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def prepare_output_dir(config: ErasureTrainingConfig) -> Path | None:
    """Check the output folder before any work; return the checkpoint to resume from (or None).

    Results or checkpoints of an earlier run are never silently overwritten: resuming needs
    ``--resume_from_checkpoint``, starting over needs ``--overwrite_output_dir``.
    """
    from .export import check_output_dir

    output_dir = Path(config.output_dir)
    check_output_dir(output_dir, config.overwrite_output_dir)
    existing = _checkpoint_dirs(output_dir)
    resume = config.resume_from_checkpoint
    if resume is None:
        if existing and not config.overwrite_output_dir:
            raise FileExistsError(f"{output_dir} holds checkpoints of an earlier run; pass --resume_from_checkpoint "
                                  "latest to continue it or --overwrite_output_dir to start over")
        if config.overwrite_output_dir:
            for sub in (CHECKPOINTS_DIR, "logs"):
                shutil.rmtree(output_dir / sub, ignore_errors=True)
        return None
    if resume == "latest":
        return existing[-1] if existing else None
    path = Path(resume)
    if not path.is_absolute() and not path.exists():
        path = output_dir / CHECKPOINTS_DIR / resume
    if not (path / LORA_CHECKPOINT_NAME).is_file():
        raise FileNotFoundError(f"{resume} is not a checkpoint of this trainer (no {LORA_CHECKPOINT_NAME}); "
                                "pass --resume_from_checkpoint latest or a checkpoint-N folder")
    return path


def _prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    """Keep room for one more checkpoint within ``limit`` (diffusers' checkpoints_total_limit semantics)."""
    if limit is None:
        return
    existing = _checkpoint_dirs(output_dir)
    for old in existing[: max(0, len(existing) - limit + 1)]:
        shutil.rmtree(old)


# ------------------------------------------------------------------------------------------ the step
@dataclass
class ErasureBatch:
    """Inputs of one micro-step: per forget player its x_t, timesteps, prompt contexts; same for preserve."""

    forget: list[tuple[LatentBatch, torch.Tensor, torch.Tensor]]  # (latents, concept ctx, anchor ctx)
    preserve: tuple[LatentBatch, torch.Tensor]


def _predict(unet, latents: torch.Tensor, timesteps: torch.Tensor, contexts: torch.Tensor, device, dtype):
    return unet(latents.to(device, dtype), timesteps.to(device),
                encoder_hidden_states=contexts.to(device, dtype)).sample


def frozen_targets(unet, batch: ErasureBatch, uncond: torch.Tensor, loss: str, eta: float, names: list[str],
                   device, dtype) -> dict[str, torch.Tensor]:
    """Every player's constant target from the frozen model (adapters disabled, no grad): the frozen prediction
    on the preserve rows, and per forget player its ``esd`` or ``anchor`` target
    (:mod:`munba_diffusion.diffusion.losses`).

    The preserve rows go through the frozen model on their own, in the same batch shape as the LoRA forward of
    :func:`player_loss`: kernels may round differently for other batch shapes, and then the preservation loss of
    the identity LoRA at step 0 would be rounding noise (~1e-10) instead of exactly 0, and its gradient a noise
    direction that the bargaining would treat as a player's wish.
    """
    with torch.no_grad(), adapters_disabled(unet):
        plat, pctx = batch.preserve
        targets = {"preserve": _predict(unet, plat.latents, plat.timesteps, pctx, device, dtype)}
        for name, (lat, ctx, anchor_ctx) in zip(names[1:], batch.forget):
            if loss == "esd":
                b = lat.latents.shape[0]
                both = _predict(unet, torch.cat([lat.latents, lat.latents]),
                                torch.cat([lat.timesteps, lat.timesteps]), torch.cat([uncond.expand_as(ctx), ctx]),
                                device, dtype)
                targets[name] = esd_target(both[:b], both[b:], eta)
            else:
                targets[name] = _predict(unet, lat.latents, lat.timesteps, anchor_ctx, device, dtype)
    return targets


def player_loss(unet, batch: ErasureBatch, name: str, names: list[str], target: torch.Tensor, device,
                dtype) -> torch.Tensor:
    """One player's loss from a LoRA forward over that player's rows only."""
    if name == "preserve":
        lat, ctx = batch.preserve
        return preservation_loss(_predict(unet, lat.latents, lat.timesteps, ctx, device, dtype), target)
    lat, ctx, _ = batch.forget[names.index(name) - 1]
    return forget_loss(_predict(unet, lat.latents, lat.timesteps, ctx, device, dtype), target)


def erasure_player_gradients(unet, batch: ErasureBatch, uncond: torch.Tensor, loss: str, eta: float,
                             names: list[str], params: list[torch.nn.Parameter], device, dtype, *,
                             loss_scale: float = 1.0, autocast=contextlib.nullcontext
                             ) -> tuple[list[list[torch.Tensor]], dict[str, float]]:
    """Each player's gradient of ``loss_scale * L_i`` over ``params``, and each ``L_i``'s value.

    The frozen model gives all targets (no graph); then each player runs its own LoRA forward and
    ``autograd.grad``, so only one player's graph is alive at a time and each backward covers only that player's
    rows (a joint forward would make every player's backward run through the whole batch). ``autocast`` is a
    context-manager factory such as ``accelerator.autocast``.
    """
    with autocast():
        targets = frozen_targets(unet, batch, uncond, loss, eta, names, device, dtype)
    grads, values = [], {}
    for name in names:
        with autocast():
            value = player_loss(unet, batch, name, names, targets[name], device, dtype)
        values[name] = float(value.detach())
        grads.append(player_gradients(value * loss_scale, params, retain_graph=False))
    return grads, values


class ErasureData:
    """Text contexts and latent sources of every player; draws one micro-batch per call."""

    def __init__(self, forget_sources, forget_contexts, anchor_contexts, preserve_source, preserve_contexts,
                 uncond: torch.Tensor):
        self.uncond = uncond  # the empty prompt's context
        self.forget_sources, self.forget_contexts = forget_sources, forget_contexts
        self.anchor_contexts = anchor_contexts
        self.preserve_source, self.preserve_contexts = preserve_source, preserve_contexts

    def batch(self, batch_size: int, generator: torch.Generator) -> ErasureBatch:
        forget = []
        for source, ctx, anchor in zip(self.forget_sources, self.forget_contexts, self.anchor_contexts):
            lat = source.sample(batch_size, generator)
            forget.append((lat, ctx[lat.prompt_index], anchor[lat.prompt_index]))
        plat = self.preserve_source.sample(batch_size, generator)
        return ErasureBatch(forget, (plat, self.preserve_contexts[plat.prompt_index]))


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], device) -> torch.Tensor:
    """Text-encoder hidden states (P, L, D) for ``prompts``, computed once."""
    out = []
    for start in range(0, len(prompts), 32):
        ids = pipe.tokenizer(prompts[start:start + 32], padding="max_length", truncation=True,
                             max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
        out.append(pipe.text_encoder(ids.to(device))[0].float().cpu())
    return torch.cat(out)


def preserve_prompts_of(concepts: list[ConceptPreset]) -> list[str]:
    """The union of the concepts' preservation prompts, minus anything one of them forgets."""
    forget = {p for c in concepts for p in c.forget_prompts}
    seen: dict[str, None] = {}
    for c in concepts:
        for p in c.preserve_prompts:
            if p not in forget:
                seen[p] = None
    if not seen:
        raise ValueError("no preservation prompts left; give the concept 'preserve' prompts or --preserve_prompts_file")
    return list(seen)


def build_erasure_data(config: ErasureTrainingConfig, pipe, unet, device, dtype, latent_shape) -> ErasureData:
    """Encode every prompt and build each player's latent source (pool / fresh / image folder)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    uncond = encode_prompts(pipe, [""], device)
    preserve = preserve_prompts_of(config.concepts)
    forget_ctx = [encode_prompts(pipe, list(c.forget_prompts), device) for c in config.concepts]
    anchor_ctx = [encode_prompts(pipe, list(c.anchor_prompts), device) for c in config.concepts]
    preserve_ctx = encode_prompts(pipe, preserve, device)
    settings = SamplerSettings(config.sampler_steps, config.sampler_guidance_scale, latent_shape)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)

    def denoise(x, t, ctx):
        with adapters_disabled(unet):
            return unet(x, t, encoder_hidden_states=ctx).sample

    generator = torch.Generator().manual_seed(config.seed)

    def source(contexts, image_dir, desc):
        if image_dir is not None:
            latents = encode_image_folder(pipe.vae, image_dir, config.resolution, device, dtype)
            return NoisedImages(latents, len(contexts), DDPMScheduler.from_config(pipe.scheduler.config))
        if config.latent_source == "fresh":
            return FreshTrajectories(denoise, scheduler, contexts, uncond, settings, device, dtype)
        if config.latent_source != "pool":
            raise ValueError(f"unknown --latent_source {config.latent_source!r}; choose pool, fresh or images")
        return TrajectoryPool.build(denoise, scheduler, contexts, uncond, settings, config.pool_trajectories,
                                    generator, device, dtype, desc=desc)

    forget_sources = [source(ctx, config.forget_image_dir, f"pool: {c.name}")
                      for c, ctx in zip(config.concepts, forget_ctx)]
    preserve_source = source(preserve_ctx, config.preserve_image_dir, "pool: preserve")
    return ErasureData(forget_sources, forget_ctx, anchor_ctx, preserve_source, preserve_ctx, uncond)


# ------------------------------------------------------------------------------------------ the loop
def stalled_message(combiner: str, steps: int, status: str) -> str:
    """The warning for a run whose first ``steps`` update directions were all zero."""
    hint = (" MGDA stops at a Pareto-stationary point, and the start is one: the LoRA starts as the identity, so "
            "the preservation loss is at its minimum with a zero gradient; use --combiner nash or normalized."
            if combiner == "mgda" else "")
    return (f"the first {steps} update directions of --combiner {combiner} were all zero (status {status}): the LoRA "
            f"is not changing, so the output will equal the base model.{hint}")


def _step_generator(seed: int, step: int, micro: int, process: int) -> torch.Generator:
    """Per-(step, micro-batch, process) randomness, so a resumed run draws exactly what the original would."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 131 + micro) * 65_537 + process)


def _write_json_atomic(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _save_checkpoint(accelerator, unet, output_dir: Path, step: int, limit: int | None) -> None:
    from safetensors.torch import save_file

    if accelerator.is_main_process:
        _prune_checkpoints(output_dir, limit)
    final = output_dir / CHECKPOINTS_DIR / f"checkpoint-{step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # optimizer, lr scheduler, RNG states
    if accelerator.is_main_process:
        save_file({k: v.contiguous().cpu() for k, v in lora_state_dict(unet).items()}, str(tmp / LORA_CHECKPOINT_NAME))
        _write_json_atomic(tmp / "step.json", {"global_step": step})
        os.replace(tmp, final)  # a checkpoint folder exists only once it is complete
    accelerator.wait_for_everyone()


def _load_checkpoint(accelerator, unet, path: Path) -> int:
    from safetensors.torch import load_file

    accelerator.load_state(str(path))
    load_lora_state_dict(unet, load_file(str(path / LORA_CHECKPOINT_NAME)))
    return int(json.loads((path / "step.json").read_text())["global_step"])


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after ``step`` by an interrupted run, so a resumed log has each step once."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def train_erasure(config: ErasureTrainingConfig) -> Path:
    """Run the erasure and write the output folder; returns its path."""
    from accelerate import Accelerator
    from accelerate.utils import GradScalerKwargs, ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler

    resume_path = prepare_output_dir(config)
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # autograd.grad bypasses the GradScaler; fp16 uses a static loss scale instead (see below)
        kwargs_handlers=[GradScalerKwargs(enabled=False)],
    )
    set_seed(config.seed)
    device = accelerator.device
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)

    pipe = load_base_pipeline(config.pretrained_model_name_or_path, revision=config.revision,
                              variant=config.variant, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        module.requires_grad_(False)
        module.to(device)
    unet = pipe.unet
    if config.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()  # diffusers uses the non-reentrant kind autograd.grad needs
    resolution = config.resolution or unet.config.sample_size * pipe.vae_scale_factor
    config.resolution = resolution
    if resolution % pipe.vae_scale_factor:
        raise ValueError(f"--resolution {resolution} must be a multiple of {pipe.vae_scale_factor} for this VAE")
    latent_shape = (unet.config.in_channels, resolution // pipe.vae_scale_factor, resolution // pipe.vae_scale_factor)

    params = add_erasure_lora(unet, config.lora)
    names = config.player_names()
    combiner = get_combiner(config.combiner, **({"weights": config.combiner_weights} if config.combiner_weights else {}))
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=config.max_train_steps)
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)

    start_step = 0
    if resume_path is not None:
        start_step = _load_checkpoint(accelerator, unet, resume_path)
        logger.info("resumed from %s at step %d", resume_path, start_step)

    t0 = time.time()
    data = build_erasure_data(config, pipe, unet, device, dtype, latent_shape)
    pool_seconds = time.time() - t0

    if accelerator.is_main_process:
        (output_dir / "logs").mkdir(parents=True, exist_ok=True)
        accelerator.init_trackers("munba-erasure", config={k: str(v) for k, v in asdict(config).items()})
    log_path = output_dir / "logs" / LOG_FILE
    if accelerator.is_main_process:
        if resume_path:
            _truncate_log(log_path, start_step)
        else:
            log_path.write_text("")

    scale = config.fp16_loss_scale if config.mixed_precision == "fp16" else 1.0

    def reduce_gradient(g: torch.Tensor) -> torch.Tensor:
        g = g / scale if scale != 1.0 else g
        return accelerator.reduce(g, reduction="mean") if accelerator.num_processes > 1 else g

    progress = tqdm(range(start_step, config.max_train_steps), initial=start_step, total=config.max_train_steps,
                    desc="erasing", disable=not accelerator.is_local_main_process)
    zero_steps, warn_after = 0, min(ZERO_DIRECTION_WARN_STEPS, config.max_train_steps - start_step)
    for step in progress:
        summed: list[list[torch.Tensor]] | None = None
        loss_values = {n: 0.0 for n in names}
        for micro in range(config.gradient_accumulation_steps):
            gen = _step_generator(config.seed, step, micro, accelerator.process_index)
            batch = data.batch(config.train_batch_size, gen)
            grads, values = erasure_player_gradients(
                unet, batch, data.uncond, config.forget_loss, config.negative_guidance, names, params, device,
                dtype, loss_scale=scale / config.gradient_accumulation_steps, autocast=accelerator.autocast)
            for n in names:
                loss_values[n] += values[n] / config.gradient_accumulation_steps
            summed = grads if summed is None else [[a + b for a, b in zip(s, g)] for s, g in zip(summed, grads)]
        summed = [[reduce_gradient(g) for g in player] for player in summed]
        diag = apply_player_gradients(dict(zip(names, summed)), params, combiner, losses=loss_values)
        finite = all(math.isfinite(v) for v in diag.grad_norms)
        if finite:
            if config.max_grad_norm:
                diag.clip_coef = clip_gradients_(params, config.max_grad_norm)[1]
            optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if diag.direction_norm == 0.0 and zero_steps == step - start_step:
            zero_steps += 1
            if zero_steps == warn_after:
                logger.warning(stalled_message(config.combiner, zero_steps, diag.status))
        record = {"step": step + 1, "lr": lr_scheduler.get_last_lr()[0], "skipped": not finite, **diag.as_log_dict()}
        if accelerator.is_main_process:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step + 1)
        progress.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k.startswith(("loss/", "weight/"))})
        if config.checkpointing_steps and (step + 1) % config.checkpointing_steps == 0 and step + 1 < config.max_train_steps:
            _save_checkpoint(accelerator, unet, output_dir, step + 1, config.checkpoints_total_limit)
    train_seconds = time.time() - t0

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from .finish import finish_erasure

        finish_erasure(config, pipe, names, train_seconds=train_seconds, pool_seconds=pool_seconds)
    accelerator.end_training()
    return output_dir
