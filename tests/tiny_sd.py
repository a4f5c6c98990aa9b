"""A tiny Stable Diffusion pipeline built from configs, for offline tests.

Every part is a real diffusers/transformers class with a very small config: a UNet of about one million
parameters, a two-block VAE (32x32 images <-> 16x16x4 latents), a two-layer CLIP text encoder and a CLIP
tokenizer read from a self-made byte-level BPE vocabulary. Weights come from fixed seeds, so two calls with the
same seed build identical pipelines.

    from tests.tiny_sd import build_tiny_sd_pipeline, save_tiny_sd
    pipe = build_tiny_sd_pipeline(seed=0)
    folder = save_tiny_sd(tmp_path / "tiny-sd")     # a from_pretrained-able StableDiffusionPipeline folder
    add_random_lora(pipe)                           # a cross-attention LoRA that visibly changes the images
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from peft import LoraConfig
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from munba_diffusion.diffusion.config import ErasureTrainingConfig
from munba_diffusion.diffusion.export import run_record
from munba_diffusion.presets import ConceptPreset

TINY_SD_WORDS = (
    "a photo of the an in on with and red green blue yellow circle square triangle cross "
    "shape picture painting dog cat car tree house style"
).split()
"""Words that get their own token (each followed by the end-of-word marker); other text falls back to bytes."""

IMAGE_SIZE = 32
CROSS_ATTENTION_TARGETS = r".*attn2\.(to_q|to_k|to_v|to_out\.0)"
TEXT_HIDDEN_SIZE = 32


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes)))


def _tiny_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """A byte-level BPE vocabulary (single bytes, their end-of-word forms, TINY_SD_WORDS, two specials)."""
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [char + "</w>" for char in byte_chars]
    merges: list[str] = []
    for word in TINY_SD_WORDS:
        # left-to-right merges: "c i" -> "ci", "ci r" -> "cir", ..., "circl e</w>" -> "circle</w>"
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            merge = f"{merged} {piece}"
            merged += piece
            if merge not in merges:
                merges.append(merge)
            if merged not in tokens:
                tokens.append(merged)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def build_tiny_tokenizer(directory: str | Path | None = None) -> CLIPTokenizer:
    """CLIPTokenizer loaded from a vocab.json + merges.txt written into `directory` (a temp dir when None)."""
    vocab, merges = _tiny_vocab_and_merges()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(directory) if directory is not None else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77)


def _tiny_vae() -> AutoencoderKL:
    """A two-block VAE: 32x32 images <-> 16x16x4 latents."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )


def build_tiny_sd_pipeline(seed: int = 0, version: int = 1) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline with tiny random weights; same `seed` -> identical weights.

    ``version=2``: SD 2.x's layout: v-prediction, linear projections in the transformer blocks, per-block head
    widths (as diffusers' own SD 2 tests configure it).
    """
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    sd2 = {"use_linear_projection": True, "attention_head_dim": (2, 4)} if version == 2 else {"attention_head_dim": 8}
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        norm_num_groups=8,
        **sd2,
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_HIDDEN_SIZE,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if version == 2 else "epsilon",
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def save_tiny_sd(path: str | Path, seed: int = 0, version: int = 1) -> Path:
    """Save `build_tiny_sd_pipeline(seed, version)` as a from_pretrained-able folder at `path`; returns the path."""
    path = Path(path)
    build_tiny_sd_pipeline(seed, version).save_pretrained(path)
    return path


def add_random_lora(
    pipeline: StableDiffusionPipeline, *, rank: int = 4, alpha: float = 8.0, seed: int = 0, strength: float = 0.5
) -> LoraConfig:
    """Attach a cross-attention LoRA ("default" adapter) with random A and B to `pipeline.unet`.

    peft starts B at zero (the LoRA then changes nothing); B is redrawn as N(0, strength^2) so the adapter
    visibly changes the images. Returns the LoraConfig used.
    """
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=CROSS_ATTENTION_TARGETS)
    pipeline.unet.requires_grad_(False)
    torch.manual_seed(seed)
    pipeline.unet.add_adapter(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in pipeline.unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * strength)
    return config


def tiny_erasure_config(concept: str = "circle", *, base_model: str = "CompVis/stable-diffusion-v1-4") -> dict:
    """The run record a trainer would write for `add_random_lora`'s adapter (built from a real configuration)."""
    preset = ConceptPreset(
        name=concept,
        forget_prompts=(f"a {concept}", f"a red {concept}"),
        preserve_prompts=("a square", "a blue triangle"),
        anchor_prompts=("", ""),
    )
    config = ErasureTrainingConfig(
        concepts=[preset],
        output_dir=Path("unused"),
        pretrained_model_name_or_path=base_model,
        rank=4,
        lora_alpha=8.0,
        max_train_steps=10,
        resolution=32,
    )
    return run_record(
        config,
        players=config.player_names(),
        target_modules=[CROSS_ATTENTION_TARGETS],
        train_seconds=0.0,
        pool_seconds=0.0,
        resolution=32,
    )


def build_tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A StableDiffusionXLPipeline with tiny random weights (the layout of diffusers' own SDXL tests: a
    ``text_time`` UNet, two CLIP text encoders, the second with a projection); same `seed` -> identical weights."""
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + TEXT_HIDDEN_SIZE,  # time ids + the pooled text embedding
        cross_attention_dim=2 * TEXT_HIDDEN_SIZE,  # both encoders' hidden states, concatenated
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae()
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TEXT_HIDDEN_SIZE,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_tiny_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
