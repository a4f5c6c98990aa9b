"""Helpers for the evaluation tests: a generation folder written by hand, a tiny random CLIP, one-thread torch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from munba_diffusion.evaluation.manifest import MANIFEST_NAME
from munba_diffusion.io import write_jsonl_atomic
from tests.tiny_sd import build_tiny_tokenizer


def write_generation_folder(
    folder: Path, images: Sequence[Image.Image], prompts: Sequence[str], extras: Sequence[dict] | None = None
) -> Path:
    """PNGs plus a manifest in the harness's format, as if ``generate_images`` had made them."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        name = f"{i:05d}_{i}.png"
        image.save(folder / name)
        records.append(
            {
                "index": i,
                "file": name,
                "prompt": prompt,
                "seed": i,
                "model": "hand-made",
                "extra": dict(extras[i]) if extras else {},
                "settings": {},
            }
        )
    write_jsonl_atomic(folder / MANIFEST_NAME, records)
    return folder


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A randomly initialised CLIPModel + CLIPProcessor (32 px images, tiny vocabulary) saved to ``folder``."""
    tokenizer = build_tiny_tokenizer()
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
