"""CLIP embeddings that work across transformers versions.

transformers v5 returns a model output (projected features in ``pooler_output``) from ``get_image_features`` /
``get_text_features``; v4 returned the tensor itself.
"""

from __future__ import annotations

import torch


def _as_tensor(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def clip_image_embeddings(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected (not normalised) image embeddings, (B, projection_dim)."""
    return _as_tensor(model.get_image_features(pixel_values=pixel_values))


def clip_text_embeddings(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Projected (not normalised) text embeddings, (B, projection_dim)."""
    return _as_tensor(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
