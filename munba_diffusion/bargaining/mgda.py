r"""MGDA (Desideri 2012; Sener & Koltun 2018): the minimum-norm point of the convex hull of the gradients,

.. math::

    \lambda^\star = \arg\min_{\lambda \in \Delta_K} \lambda^\top M \lambda, \qquad d = \sum_i \lambda_i g_i,

with ``M = G^T G`` and ``Delta_K`` the probability simplex. Optimality means ``g_i . d >= |d|^2`` for all ``i``
(with equality where ``lambda_i > 0``): every player gains unless ``d = 0`` (a Pareto-stationary point).

Two players, exactly: ``lambda_0 = clip((M_11 - M_01) / (M_00 + M_11 - 2 M_01), 0, 1)`` (1/2 for identical
gradients). ``K >= 3``: Frank-Wolfe with exact line search (each step is the two-point problem above between the
iterate and the best vertex) until the duality gap ``lambda^T M lambda - min_i (M lambda)_i`` is at most
``tol * max_i M_ii``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Weighting, check_gram, join_tags, zero_gradient_mask, zero_gradient_tag


def _min_norm_on_segment(aa: torch.Tensor, bb: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """``t`` in [0, 1] minimising ``|t x + (1 - t) y|^2`` given ``|x|^2 = aa``, ``|y|^2 = bb``, ``x . y = ab``."""
    denominator = aa + bb - 2 * ab
    if denominator <= 0:
        return torch.tensor(0.5, dtype=torch.float64)
    return ((bb - ab) / denominator).clamp(0.0, 1.0)


def mgda_weights(gram: torch.Tensor, *, tol: float = 1e-12, max_iter: int = 10_000) -> Weighting:
    """Convex weights of the minimum-norm point in the convex hull of the gradients (see the module doc)."""
    gram = check_gram(gram)
    k = gram.shape[0]
    tag = zero_gradient_tag(zero_gradient_mask(gram))
    if k == 1:
        return Weighting(torch.ones(1, dtype=torch.float64), join_tags(tag))
    if k == 2:
        t = _min_norm_on_segment(gram[0, 0], gram[1, 1], gram[0, 1])
        return Weighting(torch.stack([t, 1 - t]), join_tags(tag))
    weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
    scale = gram.diagonal().max().clamp_min(torch.finfo(torch.float64).tiny)
    for _ in range(max_iter):
        products = gram @ weights  # (M lambda)_i = g_i . d
        norm_sq = weights @ products
        vertex = int(torch.argmin(products))
        if norm_sq - products[vertex] <= tol * scale:
            return Weighting(weights, join_tags(tag))
        t = _min_norm_on_segment(gram[vertex, vertex], norm_sq, products[vertex])
        weights = (1 - t) * weights
        weights[vertex] += t
    return Weighting(weights, join_tags(tag, "not_converged"))


@dataclass(frozen=True)
class MGDAWeighting:
    """Minimum-norm point of the convex hull of the gradients."""

    name: ClassVar[str] = "mgda"
    tol: float = 1e-12
    max_iter: int = 10_000

    def __call__(self, gram: torch.Tensor) -> Weighting:
        return mgda_weights(gram, tol=self.tol, max_iter=self.max_iter)
