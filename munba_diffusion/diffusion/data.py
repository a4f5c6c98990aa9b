"""The players' prompts and latents: text contexts encoded once, one latent source per player, micro-batches.

The noisy latents come from a pool of the frozen model's own sampling trajectories by default (see
:mod:`munba_diffusion.diffusion.latents`); image folders are the alternative.
"""

from __future__ import annotations

import torch

from .config import ErasureTrainingConfig
from .family import denoise as family_denoise
from .family import family_of_pipeline
from .latents import (
    FreshTrajectories,
    LatentSource,
    NoisedImages,
    RowTokens,
    SamplerSettings,
    TrajectoryPool,
    encode_image_folder,
)
from .lora import adapters_disabled, text_encoders
from .players import NEIGHBOURS, ErasureBatch


class ErasureData:
    """Text contexts and latent sources of every player; draws one micro-batch per call."""

    def __init__(
        self,
        forget_sources: list[LatentSource],
        forget_contexts: list[torch.Tensor],
        anchor_contexts: list[torch.Tensor],
        preserve_source: LatentSource,
        preserve_contexts: torch.Tensor,
        uncond: torch.Tensor,
        neighbour_source: LatentSource | None = None,
        neighbour_contexts: torch.Tensor | None = None,
        token_ids: dict[str, torch.Tensor] | None = None,
    ):
        self.uncond = uncond  # the empty prompt's context
        self.forget_sources, self.forget_contexts = forget_sources, forget_contexts
        self.anchor_contexts = anchor_contexts
        self.preserve_source, self.preserve_contexts = preserve_source, preserve_contexts
        self.neighbour_source, self.neighbour_contexts = neighbour_source, neighbour_contexts
        # with a text-encoder LoRA: each row group's prompt tokens (P, L), keyed as players.row_group names them
        self.token_ids = token_ids

    def batch(self, batch_size: int, generator: torch.Generator) -> ErasureBatch:
        forget, drawn = [], {}
        for i, (source, ctx, anchor) in enumerate(zip(self.forget_sources, self.forget_contexts, self.anchor_contexts)):
            lat = source.sample(batch_size, generator)
            forget.append((lat, ctx[lat.prompt_index], anchor[lat.prompt_index]))
            drawn[f"forget/{i}"] = lat
        plat = self.preserve_source.sample(batch_size, generator)
        drawn["preserve"] = plat
        neighbours = None
        if self.neighbour_source is not None:
            nlat = self.neighbour_source.sample(batch_size, generator)
            neighbours = (nlat, self.neighbour_contexts[nlat.prompt_index])
            drawn[NEIGHBOURS] = nlat
        tokens = None
        if self.token_ids is not None:
            tokens = {key: RowTokens(self.token_ids[key][lat.prompt_index]) for key, lat in drawn.items()}
        return ErasureBatch(forget, (plat, self.preserve_contexts[plat.prompt_index]), neighbours, tokens=tokens)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], device, resolution: int | None = None) -> torch.Tensor:
    """The frozen text encoder's conditioning for ``prompts`` (:meth:`.family.ModelFamily.encode_prompts`; SDXL's
    time ids say ``resolution``), computed once (a text-encoder LoRA, if any, is off)."""
    with adapters_disabled(*text_encoders(pipe)):
        return family_of_pipeline(pipe).encode_prompts(pipe, prompts, device, resolution)


def build_erasure_data(
    config: ErasureTrainingConfig, pipe, unet, device, dtype, latent_shape, resolution: int
) -> ErasureData:
    """Encode every prompt and build each player's latent source (pool / fresh / image folder)."""
    family = family_of_pipeline(pipe)
    with torch.no_grad(), adapters_disabled(*text_encoders(pipe)):
        uncond = family.null_conditioning(pipe, device, resolution)
    preserve = config.preserve_prompts()
    pairs = [c.training_pairs(config.forget_loss) for c in config.concepts]  # (forget, anchor) rows, aligned
    forget_ctx = [encode_prompts(pipe, list(forget), device, resolution) for forget, _ in pairs]
    anchor_ctx = [encode_prompts(pipe, list(anchors), device, resolution) for _, anchors in pairs]
    preserve_ctx = encode_prompts(pipe, preserve, device, resolution)
    scheduler, timestep_kwargs = family.trajectory_scheduler(pipe, latent_shape, config.sampler_steps)
    settings = SamplerSettings(config.sampler_steps, config.sampler_guidance_scale, latent_shape, timestep_kwargs)
    sampler_uncond = uncond if family.classifier_free_guidance else None

    def denoise(x, t, ctx):
        with adapters_disabled(unet):
            return family_denoise(unet, x, t, ctx)

    generator = torch.Generator().manual_seed(config.seed)

    def source(contexts, image_dir, desc):
        if image_dir is not None:
            latents = encode_image_folder(pipe.vae, image_dir, resolution, device, dtype)
            return NoisedImages(latents, len(contexts), family.forward_process(pipe))
        if config.latent_source == "fresh":
            return FreshTrajectories(denoise, scheduler, contexts, sampler_uncond, settings, device, dtype)
        return TrajectoryPool.build(
            denoise,
            scheduler,
            contexts,
            sampler_uncond,
            settings,
            config.pool_trajectories,
            generator,
            device,
            dtype,
            desc=desc,
        )

    # substitute: each forget row's x_t come from its anchor's trajectories (the same prompt index)
    trajectory_ctx = anchor_ctx if config.forget_loss == "substitute" else forget_ctx
    forget_sources = [
        source(ctx, config.forget_image_dir, f"pool: {c.name}") for c, ctx in zip(config.concepts, trajectory_ctx)
    ]
    preserve_source = source(preserve_ctx, config.preserve_image_dir, "pool: preserve")
    neighbour_source = neighbour_ctx = None
    if config.neighbour_player:
        neighbour_ctx = encode_prompts(pipe, config.neighbour_prompts(), device, resolution)
        neighbour_source = source(neighbour_ctx, None, "pool: neighbours")
    token_ids = None
    if config.lora.on_text_encoder:
        token_ids = {f"forget/{i}": family.token_ids(pipe, list(forget)) for i, (forget, _) in enumerate(pairs)}
        token_ids["preserve"] = family.token_ids(pipe, preserve)
        if config.neighbour_player:
            token_ids[NEIGHBOURS] = family.token_ids(pipe, config.neighbour_prompts())
    return ErasureData(
        forget_sources,
        forget_ctx,
        anchor_ctx,
        preserve_source,
        preserve_ctx,
        uncond,
        neighbour_source,
        neighbour_ctx,
        token_ids,
    )
