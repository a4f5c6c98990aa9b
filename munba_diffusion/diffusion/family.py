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
``force_zeros_for_empty_prompt``, as SDXL base samples). SD3 and FLUX are named so that their folders get a
one-line answer instead of a confusing load error.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..adversarial import encode_with_prefix, prefix_embeddings, prefixed_input_ids
from .lora import text_encoders

PREDICTION_TYPES = ("epsilon", "v_prediction")
PROMPT_CHUNK_SIZE = 32  # prompts per text-encoder call: bounds its memory for long prompt lists

# classes with a known answer that is not (yet) "supported": the fix to name
_NOT_YET = {
    "StableDiffusionXLImg2ImgPipeline": (
        "this is an SDXL refiner folder (image-to-image, no text_encoder); pass the SDXL base model it refines"
    ),
    "StableDiffusion3Pipeline": "SD3 is not supported yet",
    "FluxPipeline": "FLUX is not supported yet",
}


def denoise(unet, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
    """The denoiser's prediction (in the model's own prediction space) for ``x_t`` at ``t`` given one conditioning
    tensor per row: the token rows, plus for a ``text_time`` UNet (SDXL) the packed row of the pooled embedding and
    the time ids (see the module docstring)."""
    if unet.config.get("addition_embed_type") != "text_time":
        return unet(latents, timesteps, encoder_hidden_states=conditioning).sample
    pooled = _pooled_width(unet)
    extra = conditioning[:, -1]
    added = {"text_embeds": extra[:, :pooled], "time_ids": extra[:, pooled : pooled + TIME_IDS]}
    return unet(latents, timesteps, encoder_hidden_states=conditioning[:, :-1], added_cond_kwargs=added).sample


TIME_IDS = 6  # SDXL's (original height, width, crop top, left, target height, width)


def _pooled_width(unet) -> int:
    return int(unet.config.projection_class_embeddings_input_dim) - TIME_IDS * int(unet.config.addition_time_embed_dim)


@dataclass(frozen=True)
class ModelFamily:
    """One family of text-to-image pipelines (see the module docstring for what it answers): Stable Diffusion
    1.x / 2.x here; :class:`StableDiffusionXLFamily` overrides the conditioning."""

    name: str
    pipeline_classes: tuple[str, ...]
    title: str = "Stable Diffusion"

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


STABLE_DIFFUSION = ModelFamily("stable-diffusion", ("StableDiffusionPipeline",))
STABLE_DIFFUSION_XL = StableDiffusionXLFamily("stable-diffusion-xl", ("StableDiffusionXLPipeline",))
FAMILIES = (STABLE_DIFFUSION, STABLE_DIFFUSION_XL)
_VERSIONS = {"StableDiffusionPipeline": "SD 1.x, 2.x", "StableDiffusionXLPipeline": "SDXL"}


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
