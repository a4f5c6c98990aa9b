"""Fixed linear scalarisation: ``d = sum_i w_i g_i`` with constant weights (default all ones, i.e. the gradient
of the summed losses). Ignores the Gram matrix apart from its size."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Weighting, check_gram


@dataclass(frozen=True)
class SumWeighting:
    """Constant weights ``w`` (``None``: all ones): the update is the gradient of ``sum_i w_i L_i``."""

    name: ClassVar[str] = "sum"
    weights: Sequence[float] | None = None

    def __call__(self, gram: torch.Tensor) -> Weighting:
        k = check_gram(gram).shape[0]
        if self.weights is None:
            return Weighting(torch.ones(k, dtype=torch.float64), "ok")
        if len(self.weights) != k:
            raise ValueError(
                f"sum combiner has {len(self.weights)} weights but there are {k} players; pass one weight per loss"
            )
        return Weighting(torch.tensor(list(self.weights), dtype=torch.float64), "ok")
