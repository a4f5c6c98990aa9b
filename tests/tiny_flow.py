"""Tiny flow-matching pipelines built from configs, for offline tests: SD3 (``StableDiffusion3Pipeline``, with or
without its T5 encoder) and FLUX.1 (``FluxPipeline``, dev with ``guidance_embeds`` or schnell without).

Every part is a real diffusers/transformers class with a very small config; the CLIP tokenizers are the tiny SD
tests' (:mod:`tests.tiny_sd`) and the T5 tokenizer is a Unigram model built here with the tokenizers library, so
nothing is downloaded. Weights come from fixed seeds: two calls with the same arguments build identical pipelines.

    from tests.tiny_flow import build_tiny_sd3_pipeline, build_tiny_flux_pipeline
    sd3 = build_tiny_sd3_pipeline(seed=0)                 # 32 px images, 16x16x4 latents
    dev = build_tiny_flux_pipeline(guidance_embeds=True)  # FLUX-dev layout; False: schnell
"""

from __future__ import annotations

import string

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from tests.tiny_sd import IMAGE_SIZE, TINY_SD_WORDS, _tiny_vae, build_tiny_tokenizer

CLIP_WIDTH = 32
FLUX_TEXT_WIDTH = 48  # T5's width = joint_attention_dim: room for the 32-wide pooled vector and the guidance


def build_tiny_t5_tokenizer(model_max_length: int = 512) -> T5TokenizerFast:
    """A T5 tokenizer (Unigram, metaspace, ``</s>`` appended) whose words are :data:`tests.tiny_sd.TINY_SD_WORDS`;
    other text falls back to single characters."""
    characters = string.ascii_lowercase + string.digits + ".,!?'-"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + word, -1.0) for word in TINY_SD_WORDS] + [(c, -5.0) for c in characters]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=model_max_length,
    )


def _t5(width: int, vocab_size: int) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=width,
            d_ff=2 * width,
            d_kv=8,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,  # built in training mode: no dropout, so that encodings are deterministic
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def _clip_config(tokenizer, projection_dim: int = CLIP_WIDTH) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=CLIP_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_sd3_transformer(seed: int = 0, dual_attention_layers: tuple[int, ...] = ()) -> SD3Transformer2DModel:
    """A two-layer MMDiT over 16x16x4 latents (patch 2); ``dual_attention_layers`` as SD3.5 Medium's (a second image
    self-attention, ``attn2``, in those blocks)."""
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=2 * CLIP_WIDTH,
        caption_projection_dim=32,
        pooled_projection_dim=2 * CLIP_WIDTH,
        pos_embed_max_size=16,
        dual_attention_layers=dual_attention_layers,
    )


def build_tiny_sd3_pipeline(seed: int = 0, t5: bool = True) -> StableDiffusion3Pipeline:
    """A StableDiffusion3Pipeline with tiny random weights: :func:`tiny_sd3_transformer`, two CLIP encoders with
    projections (32 + 32 wide, pooled 64) and a one-layer T5 (64 wide), or none (``t5=False``, SD3's documented mode
    without T5: zero rows stand in for its states)."""
    tokenizer = build_tiny_tokenizer()
    transformer = tiny_sd3_transformer(seed)
    torch.manual_seed(seed + 1)
    vae = _tiny_vae()
    vae.register_to_config(shift_factor=0.0609)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer))
    t5_tokenizer = build_tiny_t5_tokenizer() if t5 else None
    torch.manual_seed(seed + 4)
    text_encoder_3 = _t5(2 * CLIP_WIDTH, len(t5_tokenizer)) if t5 else None
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_tiny_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def build_tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True) -> FluxPipeline:
    """A FluxPipeline with tiny random weights: one double- and one single-stream block over 16x16x4 latents packed
    into 8x8 tokens of 16 channels, a CLIP encoder (pooled 32) and a one-layer T5 (48 wide, 512 tokens as
    FluxPipeline pads them). ``guidance_embeds``: FLUX-dev (guidance-distilled, resolution-dependent shift) or,
    without it, FLUX-schnell (fixed shift 1)."""
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=FLUX_TEXT_WIDTH,
        pooled_projection_dim=CLIP_WIDTH,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae()
    vae.register_to_config(shift_factor=0.1159)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_clip_config(tokenizer))
    t5_tokenizer = build_tiny_t5_tokenizer()
    torch.manual_seed(seed + 3)
    text_encoder_2 = _t5(FLUX_TEXT_WIDTH, len(t5_tokenizer))
    if guidance_embeds:
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=16,
            max_image_seq_len=256,
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    pipeline = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
