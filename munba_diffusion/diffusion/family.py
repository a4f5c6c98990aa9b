r"""Model families: what the trainer, the latent pool, the exporter and the attacks need to know about a base model.

A family is detected from the pipeline class that ``model_index.json`` names (``_class_name``), before any weight
loads; a class no family covers is one line naming the supported ones. A family says

- how prompts become the denoiser's conditioning, one tensor per prompt (:meth:`ModelFamily.encode_prompts`; for
  Stable Diffusion the text encoder's last hidden states, (P, 77, D)), and the unconditional branch's
  (:meth:`ModelFamily.null_conditioning`);
- how the denoiser is called (:func:`denoise`);
- the prediction space (:meth:`ModelFamily.prediction_type`, from the scheduler's configuration) in which the ESD
  and anchor targets are formed: the model's own predictions, whatever they predict. The ESD target
  :math:`y^*(r) - \eta (y^*(c) - y^*(r))` has weights that sum to 1, so with :math:`x_t` and :math:`t` fixed it
  commutes with the affine map from a noise prediction to a velocity
  (:math:`v = \epsilon / \sqrt{\bar\alpha_t} - \sqrt{(1 - \bar\alpha_t) / \bar\alpha_t}\, x_t`): formed in v space
  it is the velocity of the epsilon-space target, and its loss is the epsilon-space loss weighted by
  :math:`1 / \bar\alpha_t`;
- the sampler of the latent pool: DDIM built from the pipeline's own scheduler configuration (its prediction type,
  betas and timestep spacing);
- what the LoRA target sets mean (:mod:`munba_diffusion.diffusion.lora`: ``xattn``, ``noxattn``, ``attn``,
  ``full`` over the UNet's ``attn1`` / ``attn2`` blocks) and the native resolution (the UNet's ``sample_size``
  times the VAE's scale factor: 512 px for SD 1.x, 768 px for SD 2.x's v models).

Stable Diffusion 1.x and 2.x share ``StableDiffusionPipeline`` and one family; they differ in the text encoder
(CLIP ViT-L/14, 768 wide; OpenCLIP ViT-H/14, 1024 wide), in what the 768 px 2.x models predict (v) and in native
size. SDXL (``StableDiffusionXLPipeline``, base 1.0 layout) conditions its UNet on more than one tensor: the two
text encoders' penultimate hidden states concatenated (77 x 2048), the second encoder's pooled projection (1280)
and six size/crop numbers (``time_ids``: original size, crop corner, target size = the training resolution, as the
pipeline builds them). Every consumer handles conditioning as one tensor per prompt (indexed, concatenated, moved),
so the SDXL family packs the pooled embedding and the time ids into one extra row after the 77 token rows
(``[pooled, time_ids, 0...]``; the width 2048 holds 1280 + 6) and :func:`denoise` unpacks it for a ``text_time``
UNet: nothing else needs to know. Its unconditional branch is the pipeline's own (zeros, with
``force_zeros_for_empty_prompt``, as SDXL base samples).

SD3 / 3.5 (``StableDiffusion3Pipeline``, :class:`FlowFamily`) and FLUX.1 (``FluxPipeline``, :class:`FluxFamily`)
are MMDiT transformers trained with rectified flow: the denoiser is ``pipe.transformer``, the prediction space is
the velocity (``flow``), the latent pool samples with the pipeline's own FlowMatch Euler scheduler (its shift; FLUX's
resolution-dependent ``mu`` and sigmas as FluxPipeline sets them), image folders are noised as diffusers' SD3 / FLUX
training scripts do by default (logit-normal timesteps for SD3, uniform ones for FLUX; the loss unweighted), and the
conditioning is the pipeline's own prompt encoding (FLUX-schnell's at 256 T5 tokens, the most it takes) with one
packed row (the pooled CLIP vector; FLUX-dev's guidance input after it). FLUX latents stay (C, H, W) in the
trainer; :func:`denoise` packs them into 2x2-patch tokens with their position ids and unpacks the velocity. Soft
prompt prefixes (``--robust``, the white-box attack, a text-encoder LoRA) are not available there yet.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.models import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.training_utils import compute_density_for_timestep_sampling

from ..adversarial import encode_with_prefix, prefix_embeddings, prefixed_input_ids
from .lora import UNET_TARGET_SETS, denoiser, text_encoders

PREDICTION_TYPES = ("epsilon", "v_prediction")
PROMPT_CHUNK_SIZE = 32  # prompts per text-encoder call: bounds its memory for long prompt lists

# classes with a known answer that is not (yet) "supported": the fix to name
_NOT_YET = {
    "StableDiffusionXLImg2ImgPipeline": (
        "this is an SDXL refiner folder (image-to-image, no text_encoder); pass the SDXL base model it refines"
    ),
}


def denoise(unet, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
    """The denoiser's prediction (in the model's own prediction space) for ``x_t`` at ``t`` given one conditioning
    tensor per row: the token rows, plus for a ``text_time`` UNet (SDXL) the packed row of the pooled embedding and
    the time ids, for SD3 and FLUX transformers the packed row of the pooled embedding (and FLUX-dev's guidance)
    (see the module docstring). ``unet`` is the denoiser: a UNet, or an SD3 / FLUX transformer."""
    if isinstance(unet, (SD3Transformer2DModel, FluxTransformer2DModel)):
        return _denoise_transformer(unet, latents, timesteps, conditioning)
    if unet.config.get("addition_embed_type") != "text_time":
        return unet(latents, timesteps, encoder_hidden_states=conditioning).sample
    pooled = _pooled_width(unet)
    extra = conditioning[:, -1]
    added = {"text_embeds": extra[:, :pooled], "time_ids": extra[:, pooled : pooled + TIME_IDS]}
    return unet(latents, timesteps, encoder_hidden_states=conditioning[:, :-1], added_cond_kwargs=added).sample


TIME_IDS = 6  # SDXL's (original height, width, crop top, left, target height, width)


def pack_flux_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): FLUX's 2x2 patches as tokens (FluxPipeline's layout)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_flux_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_flux_latents` for latents of ``height`` x ``width``."""
    b, _, channels = tokens.shape
    c = channels // 4
    return tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def flux_image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """FLUX's position ids of the packed latent tokens, (H/2 * W/2, 3): (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(height // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


def _denoise_transformer(model, latents, timesteps, conditioning) -> torch.Tensor:
    """An SD3 / FLUX transformer's velocity for ``x_t`` at ``t`` (the flow schedulers' timesteps, sigma x 1000)."""
    pooled_width = int(model.config.pooled_projection_dim)
    tokens, extra = conditioning[:, :-1], conditioning[:, -1]
    if isinstance(model, SD3Transformer2DModel):  # float32 timesteps, as StableDiffusion3Pipeline passes them
        timesteps = timesteps.to(latents.device, torch.float32).expand(len(latents))
        return model(
            hidden_states=latents,
            encoder_hidden_states=tokens,
            pooled_projections=extra[:, :pooled_width],
            timestep=timesteps,
        ).sample
    timesteps = timesteps.to(latents.dtype).expand(len(latents))  # FluxPipeline casts them to the latents' dtype
    height, width = latents.shape[-2:]
    guidance = extra[:, pooled_width].float() if model.config.guidance_embeds else None
    out = model(
        hidden_states=pack_flux_latents(latents),
        encoder_hidden_states=tokens,
        pooled_projections=extra[:, :pooled_width],
        timestep=timesteps / 1000,  # FluxPipeline's convention: the transformer scales by 1000 itself
        guidance=guidance,
        img_ids=flux_image_ids(height, width, latents.device, latents.dtype),
        txt_ids=torch.zeros(tokens.shape[1], 3, device=latents.device, dtype=latents.dtype),
    ).sample
    return unpack_flux_latents(out, height, width)


def _pooled_width(unet) -> int:
    return int(unet.config.projection_class_embeddings_input_dim) - TIME_IDS * int(unet.config.addition_time_embed_dim)


VALIDATION_GUIDANCE = 7.5  # the validation images' guidance scale unless --validation_guidance_scale (FLUX: its own)


@dataclass(frozen=True)
class ModelFamily:
    """One family of text-to-image pipelines (see the module docstring for what it answers): Stable Diffusion
    1.x / 2.x here; :class:`StableDiffusionXLFamily` overrides the conditioning."""

    name: str
    pipeline_classes: tuple[str, ...]
    title: str = "Stable Diffusion"
    target_sets: tuple[str, ...] = UNET_TARGET_SETS  # the LoRA target sets (:mod:`.lora`) this family has
    classifier_free_guidance: bool = True  # whether the latent pool's sampler guides with the unconditional branch
    prompt_prefixes: bool = True  # soft prompt prefixes: --robust, the white-box attack, a text-encoder LoRA
    shard_blocks: tuple[str, ...] = ()  # the denoiser's block lists, one FSDP unit per block (--shard_base)

    denoiser = staticmethod(denoiser)

    def latent_shape(self, pipe, resolution: int) -> tuple[int, int, int]:
        """The shape (C, H, W) of one latent at ``resolution`` pixels, as the denoiser's sampler makes it."""
        side = resolution // int(pipe.vae_scale_factor)
        return (int(self.denoiser(pipe).config.in_channels), side, side)

    def trajectory_scheduler(self, pipe, latent_shape: tuple[int, int, int], steps: int) -> tuple[object, dict]:
        """The latent pool's sampler and the keywords of its ``set_timesteps`` for ``steps`` steps: DDIM from the
        pipeline's own scheduler configuration (its prediction type, betas and timestep spacing)."""
        return DDIMScheduler.from_config(pipe.scheduler.config), {}

    def forward_process(self, pipe):
        """``noised(x0, generator) -> (x_t, t)``: clean latents pushed through q(x_t | x_0) at uniform timesteps
        (DDPM's training distribution; the ``--*_image_dir`` latent source)."""
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

        def noised(x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            t = torch.randint(scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
            noise = torch.randn(x0.shape, generator=generator)
            return scheduler.add_noise(x0, noise, t), t

        return noised

    def validation_guidance(self, pipe) -> float:
        """The guidance scale of the validation images and the end-of-run evaluation when the run sets none."""
        return VALIDATION_GUIDANCE

    def call_options(self, pipe) -> dict:
        """Keywords of a ``pipe(prompt, ...)`` call that make it read the prompt as the trainer encodes it."""
        return {}

    def covers(self, pipe) -> bool:
        """Whether ``pipe`` is one of this family's pipelines (subclasses such as MunbaPipeline included)."""
        return any(cls.__name__ in self.pipeline_classes for cls in type(pipe).__mro__)

    def describe(self, pipe) -> str:
        """The family as the model card names it, e.g. ``Stable Diffusion 2.x (v-prediction, 768 px)``."""
        width = pipe.unet.config.cross_attention_dim
        version = {768: " 1.x", 1024: " 2.x"}.get(width if isinstance(width, int) else 0, "")
        prediction = "v-prediction" if self.prediction_type(pipe.scheduler) == "v_prediction" else "epsilon"
        return f"{self.title}{version} ({prediction}, {self.native_resolution(pipe)} px)"

    @staticmethod
    def prediction_type(scheduler) -> str:
        """What the model predicts: ``epsilon`` or ``v_prediction`` (one line for anything else)."""
        kind = scheduler.config.get("prediction_type", "epsilon")
        if kind not in PREDICTION_TYPES:
            raise ValueError(
                f"the scheduler predicts {kind!r}; erasure supports {' and '.join(PREDICTION_TYPES)} models: pass "
                "a base model whose scheduler config says one of them"
            )
        return kind

    @staticmethod
    def native_resolution(pipe) -> int:
        return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)

    @staticmethod
    def check_resolution(resolution: int, pipe) -> None:
        """A resolution the family can take: a multiple of the VAE's scale factor (one line otherwise)."""
        factor = int(pipe.vae_scale_factor)
        if resolution % factor:
            raise ValueError(f"--resolution {resolution} must be a multiple of {factor} for this VAE")

    @staticmethod
    def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
        """Token ids (P, L) of ``prompts``, padded to the tokenizer's ``model_max_length`` (as the pipeline does)."""
        return tokenizer(
            prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
        ).input_ids

    def encode_prompts(self, pipe, prompts: list[str], device, resolution: int | None = None) -> torch.Tensor:
        """The conditioning (P, L, D) of ``prompts``: the text encoder's last hidden states, float32 on the CPU."""
        out = []
        for start in range(0, len(prompts), PROMPT_CHUNK_SIZE):
            ids = self.tokenize(pipe.tokenizer, prompts[start : start + PROMPT_CHUNK_SIZE])
            out.append(pipe.text_encoder(ids.to(device))[0].float().cpu())
        return torch.cat(out)

    def null_conditioning(self, pipe, device, resolution: int | None = None) -> torch.Tensor:
        """The unconditional branch's conditioning (1, L, D): the empty prompt's."""
        return self.encode_prompts(pipe, [""], device, resolution)

    # -- prompt prefixes (the white-box attack and the robust mode; :mod:`munba_diffusion.adversarial`)
    def prefix_vocabulary(self, pipe) -> torch.Tensor:
        """The token-embedding table (V, d) a soft prefix lives in and is projected onto."""
        return pipe.text_encoder.get_input_embeddings().weight.detach()

    def prefixed_ids(self, pipe, prompts: list[str], prefix_length: int) -> torch.Tensor:
        """Token ids with ``prefix_length`` prefix slots after BOS, one row per prompt."""
        return prefixed_input_ids(pipe.tokenizer, prompts, prefix_length)

    def token_ids(self, pipe, prompts: list[str]) -> torch.Tensor:
        """The prompts' token ids as :meth:`encode_with_prefix` takes them (a text-encoder LoRA re-encodes them)."""
        return self.tokenize(pipe.tokenizer, prompts)

    text_encoders = staticmethod(text_encoders)

    def encode_with_prefix(
        self, pipe, ids: torch.Tensor, prefix: torch.Tensor | None, rows: torch.Tensor | None = None, resolution=None
    ) -> torch.Tensor:
        """The conditioning of ``ids`` whose prefix slots hold ``prefix`` (none: the ids as they are), through the
        text encoder as it is (a LoRA on it is used), on its device, with grad where ``prefix`` or a LoRA has one."""
        encoder = pipe.text_encoder
        if prefix is None:
            return encoder(ids.to(encoder.device))[0]
        return encode_with_prefix(encoder, ids, prefix.to(encoder.device, encoder.dtype), rows)

    def generate(self, pipe, conditioning: torch.Tensor, null: torch.Tensor, *, seed: int, **settings):
        """One image (PIL) from a conditioning and the unconditional one, the row's seed on a CPU generator."""
        return pipe(
            prompt_embeds=conditioning.to(pipe.device, pipe.unet.dtype),
            negative_prompt_embeds=null.to(pipe.device, pipe.unet.dtype),
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pil",
            **settings,
        ).images[0]


@dataclass(frozen=True)
class StableDiffusionXLFamily(ModelFamily):
    """SDXL: two text encoders, a pooled embedding and time ids, packed into one tensor per prompt."""

    title: str = "Stable Diffusion XL"

    def describe(self, pipe) -> str:
        prediction = "v-prediction" if self.prediction_type(pipe.scheduler) == "v_prediction" else "epsilon"
        return f"{self.title} ({prediction}, {self.native_resolution(pipe)} px)"

    @staticmethod
    def _pack(hidden: torch.Tensor, pooled: torch.Tensor, resolution: int) -> torch.Tensor:
        """``[hidden; pooled, time_ids, 0...]`` (P, L + 1, D), float32 on ``hidden``'s device."""
        size = (resolution, resolution)
        time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=torch.float32, device=hidden.device)
        extra = torch.cat([pooled.float(), time_ids.expand(len(hidden), -1)], dim=1)
        width = hidden.shape[-1]
        if extra.shape[1] > width:
            raise ValueError(
                f"SDXL's pooled embedding and time ids ({extra.shape[1]}) do not fit its width {width}; pass an SDXL "
                "base 1.0 layout model"
            )
        extra = torch.nn.functional.pad(extra, (0, width - extra.shape[1]))
        return torch.cat([hidden.float(), extra[:, None]], dim=1)

    def encode_prompts(self, pipe, prompts: list[str], device, resolution: int | None = None) -> torch.Tensor:
        """The pipeline's own prompt encoding (both encoders' penultimate states, the pooled projection), packed."""
        resolution = resolution or self.native_resolution(pipe)
        out = []
        for start in range(0, len(prompts), PROMPT_CHUNK_SIZE):
            hidden, _, pooled, _ = pipe.encode_prompt(
                prompts[start : start + PROMPT_CHUNK_SIZE], device=device, do_classifier_free_guidance=False
            )
            out.append(self._pack(hidden, pooled, resolution).cpu())
        return torch.cat(out)

    def null_conditioning(self, pipe, device, resolution: int | None = None) -> torch.Tensor:
        """The pipeline's own negative conditioning for no negative prompt (zeros with
        ``force_zeros_for_empty_prompt``, the empty prompt's otherwise), packed."""
        _, hidden, _, pooled = pipe.encode_prompt("", device=device, do_classifier_free_guidance=True)
        return self._pack(hidden, pooled, resolution or self.native_resolution(pipe)).cpu()

    # -- prompt prefixes: one soft prefix in both encoders' embedding spaces, concatenated (d1 + d2 wide), so that a
    # projection picks one token for both (a typed prompt reaches both encoders)
    def prefix_vocabulary(self, pipe) -> torch.Tensor:
        tables = [e.get_input_embeddings().weight.detach() for e in (pipe.text_encoder, pipe.text_encoder_2)]
        return torch.cat([tables[0], tables[1].to(tables[0].device, tables[0].dtype)], dim=1)

    def prefixed_ids(self, pipe, prompts: list[str], prefix_length: int) -> torch.Tensor:
        """(P, 2, L): each tokenizer's ids with the prefix slots (they differ in padding only)."""
        return torch.stack(
            [prefixed_input_ids(t, prompts, prefix_length) for t in (pipe.tokenizer, pipe.tokenizer_2)], dim=1
        )

    def token_ids(self, pipe, prompts: list[str]) -> torch.Tensor:
        """(P, 2, L): each tokenizer's ids of the prompts."""
        return torch.stack([self.tokenize(t, prompts) for t in (pipe.tokenizer, pipe.tokenizer_2)], dim=1)

    def encode_with_prefix(
        self, pipe, ids: torch.Tensor, prefix: torch.Tensor | None, rows: torch.Tensor | None = None, resolution=None
    ) -> torch.Tensor:
        """As the pipeline encodes a prompt (both encoders' penultimate states, the pooled projection), with the
        prefix slots holding ``prefix`` (its first d1 columns in the first encoder, the rest in the second; none:
        the ids as they are); packed on the encoders' device."""
        first, second = pipe.text_encoder, pipe.text_encoder_2
        width = first.get_input_embeddings().weight.shape[1]
        if prefix is None:
            hooks = contextlib.nullcontext()
        else:
            prefix = prefix.to(first.device)
            hooks = contextlib.ExitStack()
            hooks.enter_context(prefix_embeddings(first, prefix[..., :width], rows))
            hooks.enter_context(prefix_embeddings(second, prefix[..., width:], rows))
        with hooks:
            hidden = first(ids[:, 0].to(first.device), output_hidden_states=True).hidden_states[-2]
            out = second(ids[:, 1].to(second.device), output_hidden_states=True)
        hidden = torch.cat([hidden, out.hidden_states[-2].to(hidden.device)], dim=-1)
        return self._pack(hidden, out[0].to(hidden.device), resolution or self.native_resolution(pipe))

    def generate(self, pipe, conditioning: torch.Tensor, null: torch.Tensor, *, seed: int, **settings):
        pooled = _pooled_width(pipe.unet)
        device, dtype = pipe.device, pipe.unet.dtype
        return pipe(
            prompt_embeds=conditioning[:, :-1].to(device, dtype),
            pooled_prompt_embeds=conditioning[:, -1, :pooled].to(device, dtype),
            negative_prompt_embeds=null[:, :-1].to(device, dtype),
            negative_pooled_prompt_embeds=null[:, -1, :pooled].to(device, dtype),
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pil",
            **settings,
        ).images[0]


FLUX_GUIDANCE = 3.5  # FluxPipeline's default guidance: the embedded guidance a FLUX-dev erasure trains at
FLUX_DEV_TOKENS, FLUX_SCHNELL_TOKENS = 512, 256  # T5 tokens per prompt: schnell takes at most 256 (FluxPipeline docs)
GUIDANCE_ATTRIBUTE = "erasure_guidance"  # set on a FLUX-dev pipeline by the trainer (--flux_guidance)


@dataclass(frozen=True)
class FlowFamily(ModelFamily):
    r"""SD3 / 3.5: an MMDiT transformer trained with rectified flow. The model predicts the velocity
    :math:`v = \epsilon - x_0` of :math:`x_t = (1 - \sigma) x_0 + \sigma \epsilon`; the ESD and anchor targets are
    formed from velocity predictions at the same :math:`x_t` and :math:`\sigma` (weights summing to 1, as in every
    prediction space). Conditioning: the pipeline's own prompt encoding (the two CLIP encoders' penultimate states
    side by side, padded to T5's width, followed by T5's states, or zeros without T5), plus one packed row holding
    the pooled CLIP projections."""

    title: str = "Stable Diffusion 3"
    target_sets: tuple[str, ...] = ("xattn", "noxattn", "attn", "full", "image")
    prompt_prefixes: bool = False
    shard_blocks: tuple[str, ...] = ("transformer_blocks",)
    weighting_scheme: str = "logit_normal"  # the default --weighting_scheme of diffusers' training script

    def describe(self, pipe) -> str:
        return f"{self.title} (flow matching, {self.native_resolution(pipe)} px)"

    @staticmethod
    def prediction_type(scheduler) -> str:
        """``flow``: the velocity of rectified flow (a FlowMatch scheduler; one line otherwise)."""
        if "FlowMatch" not in type(scheduler).__name__:
            raise ValueError(
                f"the pipeline's scheduler is {type(scheduler).__name__}; a flow-matching transformer samples with a "
                "FlowMatch scheduler (FlowMatchEulerDiscreteScheduler): pass the model's own scheduler"
            )
        return "flow"

    @staticmethod
    def native_resolution(pipe) -> int:
        return int(pipe.default_sample_size) * int(pipe.vae_scale_factor)

    def patch(self, pipe) -> int:
        """Latent pixels per side of one image token."""
        return int(self.denoiser(pipe).config.patch_size)

    def check_resolution(self, resolution: int, pipe) -> None:
        factor = int(pipe.vae_scale_factor) * self.patch(pipe)
        if resolution % factor:
            raise ValueError(f"--resolution {resolution} must be a multiple of {factor} for this model")

    def trajectory_scheduler(self, pipe, latent_shape, steps: int):
        """The pipeline's own flow sampler (Euler), its timesteps set as the pipeline sets them (a resolution-dependent
        shift ``mu`` when the scheduler shifts dynamically)."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        if not scheduler.config.get("use_dynamic_shifting", False):
            return scheduler, {}
        return scheduler, {"mu": self._shift(scheduler, pipe, latent_shape)}

    def _shift(self, scheduler, pipe, latent_shape) -> float:
        """``mu`` of the pipelines' ``calculate_shift``: linear in the number of image tokens."""
        tokens = (latent_shape[1] // self.patch(pipe)) * (latent_shape[2] // self.patch(pipe))
        config = scheduler.config
        slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
        return config.base_shift + slope * (tokens - config.base_image_seq_len)

    def forward_process(self, pipe):
        r"""As diffusers' SD3 / FLUX training scripts with their default ``--weighting_scheme``
        (:attr:`weighting_scheme`): timesteps from the scheduler's training schedule at positions
        :math:`u \in [0, 1)` drawn logit-normal (mean 0, std 1; SD3's ``logit_normal``) or uniform (FLUX's
        ``none``), :math:`x_t = (1 - \sigma) x_0 + \sigma \epsilon`; the loss is unweighted under both."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        steps = scheduler.config.num_train_timesteps

        def noised(x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            u = compute_density_for_timestep_sampling(
                self.weighting_scheme, len(x0), logit_mean=0.0, logit_std=1.0, generator=generator
            )
            t = scheduler.timesteps[(u * steps).long().clamp(max=steps - 1)]
            sigma = (t / steps).view(-1, *([1] * (x0.dim() - 1)))
            noise = torch.randn(x0.shape, generator=generator)
            return (1 - sigma) * x0 + sigma * noise, t

        return noised

    def _extra_row(self, pipe, pooled: torch.Tensor) -> torch.Tensor:
        """The packed row's content before padding: the pooled projection."""
        return pooled.float()

    def _pack(self, pipe, tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        extra = self._extra_row(pipe, pooled)
        width = tokens.shape[-1]
        if extra.shape[1] > width:
            raise ValueError(
                f"the pooled embedding ({extra.shape[1]}) does not fit the text width {width}; pass a model whose "
                "joint_attention_dim is at least its pooled_projection_dim (+1 with guidance)"
            )
        extra = torch.nn.functional.pad(extra, (0, width - extra.shape[1]))
        return torch.cat([tokens.float(), extra[:, None]], dim=1)

    def _encode(self, pipe, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device, do_classifier_free_guidance=False)
        return embeds, pooled

    def encode_prompts(self, pipe, prompts: list[str], device, resolution: int | None = None) -> torch.Tensor:
        """The pipeline's own prompt encoding, packed (one extra row: the pooled embedding), float32 on the CPU."""
        out = []
        for start in range(0, len(prompts), PROMPT_CHUNK_SIZE):
            tokens, pooled = self._encode(pipe, prompts[start : start + PROMPT_CHUNK_SIZE], device)
            out.append(self._pack(pipe, tokens, pooled).cpu())
        return torch.cat(out)

    def null_conditioning(self, pipe, device, resolution: int | None = None) -> torch.Tensor:
        """The pipeline's negative conditioning for no negative prompt: the empty prompt's encoding."""
        return self.encode_prompts(pipe, [""], device, resolution)

    def pooled_width(self, pipe) -> int:
        return int(self.denoiser(pipe).config.pooled_projection_dim)

    def generate(self, pipe, conditioning: torch.Tensor, null: torch.Tensor, *, seed: int, **settings):
        device, dtype, pooled = pipe.device, self.denoiser(pipe).dtype, self.pooled_width(pipe)
        return pipe(
            prompt_embeds=conditioning[:, :-1].to(device, dtype),
            pooled_prompt_embeds=conditioning[:, -1, :pooled].to(device, dtype),
            negative_prompt_embeds=null[:, :-1].to(device, dtype),
            negative_pooled_prompt_embeds=null[:, -1, :pooled].to(device, dtype),
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pil",
            **settings,
        ).images[0]


@dataclass(frozen=True)
class FluxFamily(FlowFamily):
    r"""FLUX.1: an MMDiT with double- and single-stream blocks, latents packed as 2x2 patches with RoPE position
    ids (:func:`denoise` packs and unpacks; the trainer keeps (C, H, W) latents). T5 gives the token states, CLIP
    only a pooled vector. There is no real unconditional branch: FLUX-dev is guidance-distilled (``guidance_embeds``:
    the guidance scale is an input, packed into the conditioning after the pooled vector) and FLUX-schnell is
    timestep-distilled (no guidance at all), so the latent pool samples with the prompt alone.

    The ESD target on FLUX-dev is formed from two predictions at the same guidance input g (``--flux_guidance``,
    3.5 by default, FluxPipeline's default): :math:`v_g(\varnothing) - \eta (v_g(c) - v_g(\varnothing))`. The
    distilled model approximates its teacher's guided prediction, :math:`v_g(c) \approx v(\varnothing) + g (v(c) -
    v(\varnothing))` and :math:`v_g(\varnothing) \approx v(\varnothing)`, so the difference is g times the
    teacher's concept direction: the target pushes against what the concept adds at the guidance the model is used
    with. ``anchored_esd`` (a named anchor prompt instead of the empty one) avoids the empty prompt, which FLUX was
    never trained to treat as unconditional."""

    title: str = "FLUX.1"
    target_sets: tuple[str, ...] = ("xattn", "noxattn", "attn", "full", "image", "single")
    classifier_free_guidance: bool = False
    weighting_scheme: str = "none"  # uniform timesteps: train_dreambooth_lora_flux.py's default
    shard_blocks: tuple[str, ...] = ("transformer_blocks", "single_transformer_blocks")

    def describe(self, pipe) -> str:
        kind = "dev, guidance-distilled" if self.denoiser(pipe).config.guidance_embeds else "schnell, no guidance"
        return f"{self.title} ({kind}, flow matching, {self.native_resolution(pipe)} px)"

    def patch(self, pipe) -> int:
        return 2  # FLUX packs 2x2 latent patches into one token

    def trajectory_scheduler(self, pipe, latent_shape, steps: int):
        """As FluxPipeline: sigmas from 1 to 1/steps, shifted by ``mu`` (resolution-dependent for FLUX-dev)."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        sigmas = np.linspace(1.0, 1 / steps, steps)
        return scheduler, {"sigmas": sigmas, "mu": self._shift(scheduler, pipe, latent_shape)}

    def latent_shape(self, pipe, resolution: int) -> tuple[int, int, int]:
        side = resolution // int(pipe.vae_scale_factor)
        return (int(self.denoiser(pipe).config.in_channels) // 4, side, side)

    def _encode(self, pipe, prompts: list[str], device):
        tokens = FLUX_DEV_TOKENS if self.denoiser(pipe).config.guidance_embeds else FLUX_SCHNELL_TOKENS
        embeds, pooled, _ = pipe.encode_prompt(prompts, None, device=device, max_sequence_length=tokens)
        return embeds, pooled

    @staticmethod
    def embedded_guidance(pipe) -> float:
        """FLUX-dev's guidance input of targets, trajectories and validation images: ``--flux_guidance``, else
        :data:`FLUX_GUIDANCE`."""
        guidance = getattr(pipe, GUIDANCE_ATTRIBUTE, None)
        return FLUX_GUIDANCE if guidance is None else float(guidance)

    def call_options(self, pipe) -> dict:
        """FLUX-schnell: its 256 T5 tokens (FluxPipeline's call pads to 512 unless told)."""
        return {} if self.denoiser(pipe).config.guidance_embeds else {"max_sequence_length": FLUX_SCHNELL_TOKENS}

    def validation_guidance(self, pipe) -> float:
        """FLUX-dev draws at the guidance it was erased at (its ``guidance_scale`` is the embedded input);
        FLUX-schnell takes none (0, as its model card samples)."""
        return self.embedded_guidance(pipe) if self.denoiser(pipe).config.guidance_embeds else 0.0

    def _extra_row(self, pipe, pooled: torch.Tensor) -> torch.Tensor:
        if not self.denoiser(pipe).config.guidance_embeds:
            return pooled.float()
        guidance = self.embedded_guidance(pipe)
        return torch.cat([pooled.float(), torch.full((len(pooled), 1), guidance, device=pooled.device)], dim=1)

    def generate(self, pipe, conditioning: torch.Tensor, null: torch.Tensor, *, seed: int, **settings):
        device, dtype, pooled = pipe.device, self.denoiser(pipe).dtype, self.pooled_width(pipe)
        return pipe(
            prompt_embeds=conditioning[:, :-1].to(device, dtype),
            pooled_prompt_embeds=conditioning[:, -1, :pooled].to(device, dtype),
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pil",
            **settings,
        ).images[0]


STABLE_DIFFUSION = ModelFamily("stable-diffusion", ("StableDiffusionPipeline",))
STABLE_DIFFUSION_XL = StableDiffusionXLFamily("stable-diffusion-xl", ("StableDiffusionXLPipeline",))
STABLE_DIFFUSION_3 = FlowFamily("stable-diffusion-3", ("StableDiffusion3Pipeline",))
FLUX = FluxFamily("flux", ("FluxPipeline",))
FAMILIES = (STABLE_DIFFUSION, STABLE_DIFFUSION_XL, STABLE_DIFFUSION_3, FLUX)
_VERSIONS = {
    "StableDiffusionPipeline": "SD 1.x, 2.x",
    "StableDiffusionXLPipeline": "SDXL",
    "StableDiffusion3Pipeline": "SD3, SD3.5",
    "FluxPipeline": "FLUX.1 dev, schnell",
}


def family_of_pipeline(pipe) -> ModelFamily:
    """The family of a loaded pipeline (one line naming the supported classes otherwise)."""
    for family in FAMILIES:
        if family.covers(pipe):
            return family
    return family_of_class(type(pipe).__name__)


def supported_classes() -> list[str]:
    return [name for family in FAMILIES for name in family.pipeline_classes]


def family_of_class(class_name: str | None) -> ModelFamily:
    """The family of a pipeline class (``model_index.json``'s ``_class_name``), or a one-line error that names the
    supported classes."""
    for family in FAMILIES:
        if class_name in family.pipeline_classes:
            return family
    supported = ", ".join(f"{c} ({_VERSIONS[c]})" for c in supported_classes())
    reason = _NOT_YET.get(class_name or "", f"{class_name or 'an unnamed pipeline class'} is not supported")
    raise ValueError(f"{reason}; erasure supports {supported}; pass such a folder or Hub id")


def absent_components(index: dict) -> dict[str, None]:
    """The components ``model_index.json`` lists as absent (``[null, null]``, e.g. SD3 without its T5 encoder), as
    the ``None`` keywords ``from_pretrained`` needs to build the pipeline without them."""
    return {
        name: None
        for name, entry in index.items()
        if not name.startswith("_") and isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is None
    }
