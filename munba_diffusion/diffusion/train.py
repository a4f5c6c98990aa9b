"""The concept-erasure training loop that ``train_erase.py`` drives.

Order of a run (each step one module's job): the configuration (:mod:`.config`, checked before anything loads)
-> the output folder checked and locked (:mod:`.export.folder`) -> the base pipeline (:mod:`.base_model`) -> the
LoRA (:mod:`.lora`) -> prompts and latents (:mod:`.data`) -> per step: each player's loss and gradient
(:mod:`.players`), accumulated over micro-batches, reduced across processes, combined into ``.grad`` and clipped by
the update owner (:class:`munba_diffusion.step.BargainedUpdate`) -> optimizer step -> checkpoints
(:mod:`.checkpoints`) -> the output folder written once (:mod:`.finish`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import GradScalerKwargs, ProjectConfiguration, gather_object, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ..bargaining import get_combiner
from ..models import model_folder_sha256, resolve_model_path
from ..step import BargainedUpdate
from .adversary import CHECKPOINT_NAME as ADVERSARY_CHECKPOINT
from .adversary import Adversary, AdversarySettings
from .base_model import base_commit, base_model_family, hub_commit, load_base_pipeline, snapshot_commit
from .checkpoints import (
    check_same_base,
    checkpoint_dir,
    checkpoint_to_resume,
    load_checkpoint,
    load_checkpoint_tensors,
    save_checkpoint,
    truncate_log,
)
from .config import ErasureTrainingConfig
from .data import build_erasure_data
from .export import OutputDirLock, check_output_dir
from .family import FLUX, GUIDANCE_ATTRIBUTE, STABLE_DIFFUSION_XL, family_of_pipeline
from .finish import finish_erasure, validation_grid
from .lora import ErasureLoraConfig, add_erasure_loras, denoiser, text_encoders
from .players import TextLora, erasure_players
from .preflight import check_processes, check_run_environment
from .sharding import local_elements, reloaded_transformer, shard_frozen_denoiser
from .trackers import log_images, tracker_scalars

logger = logging.getLogger(__name__)

LOG_FILE = "train_log.jsonl"
ZERO_DIRECTION_WARN_STEPS = 10  # warn when this many first steps (or the whole run, if shorter) did not move
# autograd.grad bypasses Accelerate's GradScaler, so fp16 runs scale the losses by a static factor instead (large
# enough to keep small gradients out of fp16's subnormal range, small enough not to overflow); it is divided out
# before the Gram matrix.
FP16_LOSS_SCALE = 1024.0
# Seed mixing of step_generator: distinct primes, so different (seed, step, micro-batch, process) tuples give
# different generator seeds for any run shorter than about 10^6 steps.
_SEED_MIX = (1_000_003, 131, 65_537)
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def stalled_message(combiner: str, steps: int, status: str) -> str:
    """The warning for a run whose first ``steps`` update directions were all zero."""
    hint = (
        " MGDA stops at a Pareto-stationary point, and the start is one: the LoRA starts as the identity, so "
        "the preservation loss is at its minimum with a zero gradient; use --combiner nash or normalized."
        if combiner == "mgda"
        else ""
    )
    return (
        f"the first {steps} update directions of --combiner {combiner} were all zero (status {status}): the LoRA "
        f"is not changing, so the output will equal the base model.{hint}"
    )


def step_generator(seed: int, step: int, micro: int, process: int) -> torch.Generator:
    """Per-(step, micro-batch, process) randomness, so a resumed run draws exactly what the original would."""
    a, b, c = _SEED_MIX
    return torch.Generator().manual_seed(((seed * a + step) * b + micro) * c + process)


def check_family_options(config: ErasureTrainingConfig, family) -> None:
    """Options the base model's family cannot take (yet): one line naming the fix, before any weight loads."""
    if config.lora_target not in family.target_sets:
        raise ValueError(
            f"--lora_target {config.lora_target} does not exist for {family.title}; choose one of "
            f"{', '.join(family.target_sets)}"
        )
    if not family.prompt_prefixes and (config.robust or config.lora.on_text_encoder):
        flag = "--robust" if config.robust else f"--lora_on {config.lora_on}"
        raise ValueError(
            f"{flag} is not supported on {family.title} yet (soft prompt prefixes and text-encoder LoRAs cover SD 1.x, "
            "2.x and SDXL); drop it"
        )
    if config.flux_guidance is not None and family is not FLUX:
        raise ValueError(
            f"--flux_guidance is for guidance-distilled FLUX-dev; {family.title} takes no guidance input: drop it"
        )
    if config.shard_base and not family.shard_blocks:
        raise ValueError(
            f"--shard_base shards SD3 and FLUX transformers; a {family.title} base fits one GPU: drop it (a "
            "data-parallel launch without it still spreads the rows)"
        )
    if config.lora_target == "full" and family is STABLE_DIFFUSION_XL:
        raise ValueError(
            f"--lora_target full on {family.title} adapts add_embedding, which the ComfyUI / A1111 (kohya) file cannot "
            "name; use --lora_target noxattn (every other layer) or attn"
        )


def _prepare_denoiser(config: ErasureTrainingConfig, pipe, device) -> None:
    for module in (pipe.vae, *text_encoders(pipe), denoiser(pipe)):
        module.requires_grad_(False)
        if not (config.shard_base and module is denoiser(pipe)):  # sharding places it: only a slice reaches device
            module.to(device)
    if config.enable_xformers_memory_efficient_attention:
        denoiser(pipe).enable_xformers_memory_efficient_attention()
    if config.gradient_checkpointing:
        denoiser(pipe).enable_gradient_checkpointing()  # diffusers uses the non-reentrant kind autograd.grad needs
    if denoiser(pipe).config.get("guidance_embeds"):  # FLUX-dev: the guidance input of targets and trajectories
        setattr(pipe, GUIDANCE_ATTRIBUTE, config.flux_guidance)
    elif config.flux_guidance is not None:
        raise ValueError("--flux_guidance is for FLUX-dev; this FLUX model has no guidance embedding: drop it")


def lora_models(pipe, lora: ErasureLoraConfig) -> dict[str, torch.nn.Module]:
    """The models that carry the erasure LoRA, by component name (``unet``, ``text_encoder``, ``text_encoder_2``)."""
    models = {"unet": denoiser(pipe)} if lora.on_unet else {}
    if lora.on_text_encoder:
        models.update(zip(("text_encoder", "text_encoder_2"), text_encoders(pipe)))
    return models


def trained_module(pipe, lora: ErasureLoraConfig) -> torch.nn.Module:
    """The one module holding every trained layer (for the per-player gradients of the fast path)."""
    models = lora_models(pipe, lora)
    return next(iter(models.values())) if len(models) == 1 else torch.nn.ModuleDict(models)


def _adversary(
    config: ErasureTrainingConfig, pipe, device, resume_path: Path | None, resolution: int
) -> Adversary | None:
    """The robust mode's adversary (None without ``--robust``), with its kept prefixes when resuming."""
    if not config.robust:
        return None
    settings = AdversarySettings(
        tokens=config.adversarial_tokens,
        every=config.adversarial_every,
        steps=config.adversarial_steps,
        lr=config.adversarial_lr,
        kept=config.adversarial_prompts_kept,
    )
    adversary = Adversary(
        pipe, [list(c.training_pairs(config.forget_loss)[0]) for c in config.concepts], settings, device, resolution
    )
    if resume_path is not None:
        adversary.load_state_dict(load_checkpoint_tensors(resume_path, ADVERSARY_CHECKPOINT))
    return adversary


def _resolution(config: ErasureTrainingConfig, pipe) -> int:
    """The training resolution: ``--resolution`` or the model's native size (the configuration is not changed)."""
    family = family_of_pipeline(pipe)
    resolution = config.resolution or family.native_resolution(pipe)
    family.check_resolution(resolution, pipe)
    family.prediction_type(pipe.scheduler)  # one line for a prediction space the targets cannot be formed in
    return resolution


def _optimizer_class(config: ErasureTrainingConfig):
    """AdamW, or bitsandbytes' 8-bit AdamW (``--use_8bit_adam``; its availability is checked before any load)."""
    if not config.use_8bit_adam:
        return torch.optim.AdamW
    import bitsandbytes  # noqa: PLC0415 (optional: GPU only, checked before any load)

    return bitsandbytes.optim.AdamW8bit


def _start_log(path: Path, resume_step: int | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if resume_step is None:
        path.write_text("")
    else:
        truncate_log(path, resume_step)


def _reloaded_for_export(config: ErasureTrainingConfig, sharded, dtype: torch.dtype):
    """:func:`.sharding.reloaded_transformer`; a failure says where the trained LoRA is and how to export it."""
    try:
        return reloaded_transformer(config, sharded, dtype)
    except (OSError, ValueError) as error:
        saved = checkpoint_dir(config.output_dir, config.max_train_steps)
        raise type(error)(
            f"{error}; the trained LoRA is safe in {saved}: fix that and rerun the same command with "
            "--resume_from_checkpoint latest to export it"
        ) from None


def train_erasure(
    config: ErasureTrainingConfig, evaluate: Callable[[ErasureTrainingConfig, Path], str | None] | None = None
) -> Path:
    """Run the erasure and write the output folder; returns its path.

    ``evaluate(config, erased_folder)`` is the end-of-run evaluation (see :func:`.finish.finish_erasure`).
    """
    check_run_environment(config)
    check_output_dir(config.output_dir, config.overwrite_output_dir or config.resume_from_checkpoint is not None)
    # one lock per run: the launch's first process holds it (the other ranks would find it and stop); RANK is read
    # from the launcher's environment because the distributed state is set up later, by the Accelerator
    first_process = int(os.environ.get("RANK", "0")) == 0
    lock = OutputDirLock(config.output_dir) if first_process else contextlib.nullcontext()
    with lock:
        return _train_locked(config, evaluate)


def _train_locked(config: ErasureTrainingConfig, evaluate) -> Path:
    resume_path = checkpoint_to_resume(config)
    family = base_model_family(config.pretrained_model_name_or_path, revision=config.revision)  # before anything slow
    check_family_options(config, family)
    # a local or bundled base's files (read once: a few seconds per GB); None for a Hub id
    content = model_folder_sha256(config.pretrained_model_name_or_path)
    if resume_path is not None:  # before minutes of loading; checked again on what loaded
        name = config.pretrained_model_name_or_path
        now = snapshot_commit(resolve_model_path(name)) if content else hub_commit(name, revision=config.revision)
        if content or now:
            check_same_base(config, resume_path, now, content)
    output_dir = config.output_dir
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        kwargs_handlers=[GradScalerKwargs(enabled=False)],  # see FP16_LOSS_SCALE
    )
    check_processes(accelerator.num_processes)
    set_seed(config.seed)
    device = accelerator.device
    dtype = _DTYPES.get(config.mixed_precision, torch.float32)

    pipe = load_base_pipeline(
        config.pretrained_model_name_or_path, revision=config.revision, variant=config.variant, torch_dtype=dtype
    )
    pipe.set_progress_bar_config(disable=True)
    _prepare_denoiser(config, pipe, device)
    if config.validation_guidance_scale is None:  # the family's: a copy, so the caller's configuration stays as given
        config = copy.copy(config)
        config.validation_guidance_scale = family.validation_guidance(pipe)
    unet = denoiser(pipe)  # the UNet, or SD3's / FLUX's transformer
    commit = base_commit(unet)
    loaded = gather_object([(commit, content)])
    commits, contents = sorted({c for c, _ in loaded}, key=str), sorted({f for _, f in loaded}, key=str)
    if len(commits) > 1:  # each process resolved the Hub id itself, and its main moved in between
        raise ValueError(
            f"the processes loaded {config.pretrained_model_name_or_path} at different commits "
            f"({', '.join(map(str, commits))}); rerun with --revision set to one of them"
        )
    if len(contents) > 1:  # each machine has its own copy of a local folder
        raise ValueError(
            f"the processes read different files as {config.pretrained_model_name_or_path} (sha256 "
            f"{', '.join(str(f)[:12] for f in contents)}); give every machine the same folder"
        )
    if resume_path is not None:
        check_same_base(config, resume_path, commit, content)
    resolution = _resolution(config, pipe)
    latent_shape = family.latent_shape(pipe, resolution)

    params = add_erasure_loras(pipe, config.lora)
    if config.shard_base:
        shard_frozen_denoiser(unet, family.shard_blocks, params, device)
        held, total = local_elements(unet)
        logger.info("--shard_base: this process holds %d of the base transformer's %d weights", held, total)
    text_lora = TextLora(pipe, family, resolution) if config.lora.on_text_encoder else None  # re-encodes the rows
    lora_module = trained_module(pipe, config.lora)
    names = config.player_names()
    combiner = get_combiner(
        config.combiner, **({"weights": config.combiner_weights} if config.combiner_weights else {})
    )
    optimizer = _optimizer_class(config)(params, lr=config.learning_rate)
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_train_steps,
    )
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)

    start_step = 0
    if resume_path is not None:
        start_step = load_checkpoint(accelerator, lora_models(pipe, config.lora), resume_path)
        logger.info("resumed from %s at step %d", resume_path, start_step)

    t0 = time.time()
    data = build_erasure_data(config, pipe, unet, device, dtype, latent_shape, resolution)
    adversary = _adversary(config, pipe, device, resume_path, resolution)
    pool_seconds = time.time() - t0
    encoder_needed = adversary is not None or text_lora is not None
    if not encoder_needed:  # every prompt is encoded: the text encoders leave the accelerator until the grid
        for encoder in text_encoders(pipe):
            encoder.to("cpu")

    log_path = output_dir / "logs" / LOG_FILE
    if accelerator.is_main_process:
        _start_log(log_path, start_step if resume_path else None)
        accelerator.init_trackers("munba-erasure", config={k: str(v) for k, v in config.record().items()})

    loss_scale = FP16_LOSS_SCALE if config.mixed_precision == "fp16" else 1.0
    update = BargainedUpdate(
        params,
        combiner,
        max_grad_norm=config.max_grad_norm or None,
        nonfinite=config.nonfinite_gradients,
        reduce=(lambda g: accelerator.reduce(g, reduction="mean")) if accelerator.num_processes > 1 else None,
        loss_scale=loss_scale,
        player_gradients=config.player_gradients,
    )
    progress = tqdm(
        range(start_step, config.max_train_steps),
        initial=start_step,
        total=config.max_train_steps,
        desc="erasing",
        disable=not accelerator.is_local_main_process,
    )
    zero_steps, skipped_steps = 0, 0
    warn_after = min(ZERO_DIRECTION_WARN_STEPS, config.max_train_steps - start_step)
    for step in progress:
        if adversary is not None and adversary.due(step):
            adversary.refresh(
                unet, data.forget_sources, data.forget_contexts, config.seed, step, config.train_batch_size, dtype
            )
        for micro in range(config.gradient_accumulation_steps):
            generator = step_generator(config.seed, step, micro, accelerator.process_index)
            batch = data.batch(config.train_batch_size, generator)
            if adversary is not None:
                batch.adversarial, adversarial_tokens = adversary.rows(data, config.train_batch_size, generator)
                if batch.tokens is not None:
                    batch.tokens.update(adversarial_tokens)
            players = erasure_players(
                unet,
                batch,
                data.uncond,
                config.forget_loss,
                config.negative_guidance,
                names,
                device,
                dtype,
                autocast=accelerator.autocast,
                text_lora=text_lora,
                lora_module=lora_module,
            )
            update.accumulate_players(players, weight=1.0 / config.gradient_accumulation_steps)
        diag = update.write_gradients()
        if diag.skipped:  # the update owner has logged which player's gradient was not finite
            skipped_steps += 1
        else:
            optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if diag.direction_norm == 0.0 and zero_steps == step - start_step:
            zero_steps += 1
            if zero_steps == warn_after:
                logger.warning(stalled_message(config.combiner, zero_steps, diag.status))
        record = {"step": step + 1, "lr": lr_scheduler.get_last_lr()[0], **diag.as_log_dict()}
        if adversary is not None:
            record.update(adversary.log_values(names))
        if accelerator.is_main_process:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        accelerator.log(tracker_scalars(record), step=step + 1)
        progress.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k.startswith(("loss/", "weight/"))})
        if (
            config.checkpointing_steps
            and (step + 1) % config.checkpointing_steps == 0
            and step + 1 < config.max_train_steps
        ):
            extra = {ADVERSARY_CHECKPOINT: adversary.state_dict()} if adversary is not None else None
            save_checkpoint(
                accelerator,
                lora_models(pipe, config.lora),
                config,
                step + 1,
                extra=extra,
                base_commit=commit,
                base_sha256=content,
            )
    train_seconds = time.time() - t0

    accelerator.wait_for_everyone()
    for encoder in text_encoders(pipe):
        encoder.to(device)
    drawn_grid = None
    if config.shard_base:  # the sharded transformer's forwards are collective: every process draws the grid
        if start_step < config.max_train_steps:  # what the export's reload of the base may not lose
            models = lora_models(pipe, config.lora)
            save_checkpoint(
                accelerator, models, config, config.max_train_steps, base_commit=commit, base_sha256=content
            )
        drawn_grid = validation_grid(config, pipe)
        if accelerator.is_main_process:
            pipe.transformer = _reloaded_for_export(config, unet, dtype)
    if accelerator.is_main_process:
        grid = finish_erasure(
            config,
            pipe,
            names,
            drawn_grid=drawn_grid,
            train_seconds=train_seconds,
            pool_seconds=pool_seconds,
            resolution=resolution,
            steps_skipped=skipped_steps,
            base_sha256=content,
            evaluate=evaluate,
        )
        log_images(accelerator, {"validation/before_after": grid}, step=config.max_train_steps)
    accelerator.end_training()
    return output_dir
