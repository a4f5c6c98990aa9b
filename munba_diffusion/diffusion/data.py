"""The players' prompts and latents: text contexts encoded once, one latent source per player, micro-batches.

The noisy latents come from a pool of the frozen model's own sampling trajectories by default (see
:mod:`munba_diffusion.diffusion.latents`); image folders are the alternative.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from .config import ErasureTrainingConfig
from .latents import FreshTrajectories, LatentSource, NoisedImages, SamplerSettings, TrajectoryPool, encode_image_folder
from .lora import adapters_disabled
from .players import ErasureBatch

PROMPT_CHUNK_SIZE = 32  # prompts per text-encoder call: bounds its memory for long prompt lists


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
    ):
        self.uncond = uncond  # the empty prompt's context
        self.forget_sources, self.forget_contexts = forget_sources, forget_contexts
        self.anchor_contexts = anchor_contexts
        self.preserve_source, self.preserve_contexts = preserve_source, preserve_contexts
        self.neighbour_source, self.neighbour_contexts = neighbour_source, neighbour_contexts

    def batch(self, batch_size: int, generator: torch.Generator) -> ErasureBatch:
        forget = []
        for source, ctx, anchor in zip(self.forget_sources, self.forget_contexts, self.anchor_contexts):
            lat = source.sample(batch_size, generator)
            forget.append((lat, ctx[lat.prompt_index], anchor[lat.prompt_index]))
        plat = self.preserve_source.sample(batch_size, generator)
        neighbours = None
        if self.neighbour_source is not None:
            nlat = self.neighbour_source.sample(batch_size, generator)
            neighbours = (nlat, self.neighbour_contexts[nlat.prompt_index])
        return ErasureBatch(forget, (plat, self.preserve_contexts[plat.prompt_index]), neighbours)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], device) -> torch.Tensor:
    """Text-encoder hidden states (P, L, D) for ``prompts``, computed once."""
    out = []
    for start in range(0, len(prompts), PROMPT_CHUNK_SIZE):
        ids = pipe.tokenizer(
            prompts[start : start + PROMPT_CHUNK_SIZE],
            padding="max_length",
            truncation=True,
            max_length=pipe.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        out.append(pipe.text_encoder(ids.to(device))[0].float().cpu())
    return torch.cat(out)


def build_erasure_data(
    config: ErasureTrainingConfig, pipe, unet, device, dtype, latent_shape, resolution: int
) -> ErasureData:
    """Encode every prompt and build each player's latent source (pool / fresh / image folder)."""
    uncond = encode_prompts(pipe, [""], device)
    preserve = config.preserve_prompts()
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
            latents = encode_image_folder(pipe.vae, image_dir, resolution, device, dtype)
            return NoisedImages(latents, len(contexts), DDPMScheduler.from_config(pipe.scheduler.config))
        if config.latent_source == "fresh":
            return FreshTrajectories(denoise, scheduler, contexts, uncond, settings, device, dtype)
        return TrajectoryPool.build(
            denoise,
            scheduler,
            contexts,
            uncond,
            settings,
            config.pool_trajectories,
            generator,
            device,
            dtype,
            desc=desc,
        )

    forget_sources = [
        source(ctx, config.forget_image_dir, f"pool: {c.name}") for c, ctx in zip(config.concepts, forget_ctx)
    ]
    preserve_source = source(preserve_ctx, config.preserve_image_dir, "pool: preserve")
    neighbour_source = neighbour_ctx = None
    if config.neighbour_player:
        neighbour_ctx = encode_prompts(pipe, config.neighbour_prompts(), device)
        neighbour_source = source(neighbour_ctx, None, "pool: neighbours")
    return ErasureData(
        forget_sources, forget_ctx, anchor_ctx, preserve_source, preserve_ctx, uncond, neighbour_source, neighbour_ctx
    )
