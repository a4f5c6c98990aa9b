"""CLIP score: 100 x cosine(image embedding, prompt embedding) with a named transformers CLIP.

Each image's score is clamped at 0, as torchmetrics' ``CLIPScore`` (the field's usual implementation) does;
the reported value is the mean over images. Papers use ViT-L/14 or ViT-B/32, so the model is always reported.
Prompts longer than CLIP's 77 tokens are truncated.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPModel, CLIPProcessor

from ..clip_features import clip_image_embeddings, clip_text_embeddings
from ..models import resolve_model_path
from .manifest import collect_images, load_rgb, require_field

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"


def clip_scores_from_embeddings(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Row-wise max(100 * cos(image_i, text_i), 0) for paired (N, D) embeddings."""
    cosine = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
    return (100 * cosine).clamp(min=0)


def load_clip(name_or_path: str | Path, device: str | torch.device):
    """(CLIPModel, CLIPProcessor) from a Hub id, a local folder or a bundled CLIP name
    (:mod:`munba_diffusion.models`)."""
    name_or_path = resolve_model_path(name_or_path, kind="clip")
    try:
        model = CLIPModel.from_pretrained(str(name_or_path))
        processor = CLIPProcessor.from_pretrained(str(name_or_path))
    except OSError as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise FileNotFoundError(
            f"cannot load CLIP {str(name_or_path)!r} ({reason}); pass a local CLIP folder or go online once"
        ) from None
    return model.to(device).eval(), processor


@torch.no_grad()
def clip_scores(
    images: Sequence[Image.Image | Path],
    prompts: Sequence[str],
    model,
    processor,
    *,
    batch_size: int = 32,
) -> torch.Tensor:
    """Per-image CLIP scores (N,) of ``images`` (PIL images or files, read a batch at a time) against ``prompts``."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")
    device = next(model.parameters()).device
    max_length = processor.tokenizer.model_max_length
    scores = []
    for start in tqdm(range(0, len(images), batch_size), desc="clip score", disable=len(images) <= batch_size):
        batch = [load_rgb(i) if isinstance(i, Path) else i for i in images[start : start + batch_size]]
        inputs = processor(
            text=list(prompts[start : start + batch_size]),
            images=batch,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        ).to(device)
        image_embeds = clip_image_embeddings(model, inputs["pixel_values"])
        text_embeds = clip_text_embeddings(model, inputs["input_ids"], inputs.get("attention_mask"))
        scores.append(clip_scores_from_embeddings(image_embeds, text_embeds).cpu())
    return torch.cat(scores)


def clip_score_metrics(
    source: str | Path,
    *,
    model_name_or_path: str | Path = DEFAULT_CLIP_MODEL,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
) -> dict:
    """Mean CLIP score of a generation folder (or manifest) against each image's own prompt."""
    entries = collect_images(source)
    prompts = require_field(entries, "prompt", "CLIP score")
    model, processor = load_clip(model_name_or_path, device)
    scores = clip_scores([e.path for e in entries], prompts, model, processor, batch_size=batch_size)
    return {
        "clip_score": float(scores.mean()),
        "clip_score_std": float(scores.std()) if len(scores) > 1 else 0.0,
        "num_images": len(scores),
        "clip_model": str(model_name_or_path),
        "clamped_at_zero": True,
    }
