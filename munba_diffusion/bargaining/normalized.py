"""Sum of unit gradients: ``d = sum_i g_i / |g_i|``, i.e. weights ``w_i = 1 / |g_i|`` (``|g_i| = sqrt(M_ii)``).

A zero gradient (``|g_i| <= zero_rtol * max_j |g_j|``) has no direction and gets weight 0
(status ``zero_gradient:i``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Weighting, check_gram, join_tags, zero_gradient_mask, zero_gradient_tag


def normalized_weights(gram: torch.Tensor, *, zero_rtol: float = 1e-10) -> Weighting:
    """Weights ``1 / |g_i|`` (0 for zero gradients) so that ``d`` is the sum of the unit gradients."""
    gram = check_gram(gram)
    zero = zero_gradient_mask(gram, zero_rtol)
    norms = gram.diagonal().clamp_min(0).sqrt()
    weights = torch.where(zero, torch.zeros_like(norms), 1.0 / torch.where(zero, torch.ones_like(norms), norms))
    return Weighting(weights, join_tags(zero_gradient_tag(zero)))


@dataclass(frozen=True)
class NormalizedWeighting:
    """Sum of the players' unit gradients."""

    name: ClassVar[str] = "normalized"
    zero_rtol: float = 1e-10

    def __call__(self, gram: torch.Tensor) -> Weighting:
        return normalized_weights(gram, zero_rtol=self.zero_rtol)
