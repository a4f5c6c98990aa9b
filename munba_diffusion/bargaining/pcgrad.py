r"""PCGrad (Yu et al. 2020) on the Gram matrix.

PCGrad projects each gradient, in a random order of the other players, off every gradient it conflicts with:

.. math::

    g_i' \leftarrow g_i' - \frac{\min(0,\ g_i' \cdot g_j)}{|g_j|^2} g_j, \qquad d = \sum_i g_i'.

Every ``g_i'`` stays a linear combination ``g_i' = sum_k c_{ik} g_k`` of the original gradients, and
``g_i' . g_j = (c_i^T M)_j``, so the whole procedure runs on the coefficients with the Gram matrix ``M`` and
returns the equivalent weights ``w = sum_i c_i``. Zero gradients are never projected onto. The orders come from
a ``torch.Generator`` seeded at construction, so a run is reproducible and successive calls use fresh orders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .base import Weighting, check_gram


def pcgrad_weights(gram: torch.Tensor, generator: torch.Generator | None = None) -> Weighting:
    """Weights ``w`` with ``sum_i w_i g_i`` equal to PCGrad's update (see the module doc)."""
    gram = check_gram(gram)
    k = gram.shape[0]
    coefficients = torch.eye(k, dtype=torch.float64)
    for i in range(k):
        for j in torch.randperm(k, generator=generator).tolist():
            if j == i or gram[j, j] <= 0:
                continue
            product = coefficients[i] @ gram[:, j]
            if product < 0:
                coefficients[i, j] -= product / gram[j, j]
    return Weighting(coefficients.sum(dim=0), "ok")


@dataclass
class PCGradWeighting:
    """PCGrad with a seeded random projection order."""

    name: ClassVar[str] = "pcgrad"
    seed: int = 0
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, gram: torch.Tensor) -> Weighting:
        return pcgrad_weights(gram, self.generator)
