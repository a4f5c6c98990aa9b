"""The interface every combination rule implements: a Gram matrix in, weights out.

Players are indexed ``0..K-1``. A rule sees only the Gram matrix ``M = G^T G`` of the players' gradients
``G = [g_0 ... g_{K-1}]`` (so it is independent of the number of parameters) and returns weights ``w`` for the
update direction ``d = sum_i w_i g_i``.

``Weighting.status`` is ``"ok"`` or ``";"``-joined tags of handled special cases. A tag is ``name`` or
``name:i,j`` where ``i,j`` are player indices; :func:`name_players` turns indices into player names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Weighting:
    """Weights of the players' gradients and what (if anything) was special about the step.

    Attributes:
        weights: float64 tensor of shape ``(K,)``; the update direction is ``d = sum_i weights[i] * g_i``.
        status: ``"ok"`` or tags of the degenerate cases that were handled, e.g. ``"zero_gradient:1"``.
    """

    weights: torch.Tensor
    status: str


class Combiner(Protocol):
    """A rule that turns the players' Gram matrix into weights."""

    name: str

    def __call__(self, gram: torch.Tensor) -> Weighting: ...


def check_gram(gram: torch.Tensor) -> torch.Tensor:
    """Validate a Gram matrix and return it as float64.

    Raises:
        ValueError: if ``gram`` is not a square ``(K, K)`` matrix with ``K >= 1`` or holds NaN/inf (which means
            a loss or a gradient is not finite).
    """
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise ValueError(f"expected a square (K, K) Gram matrix with K >= 1, got shape {tuple(gram.shape)}")
    gram = gram.detach().to(torch.float64)
    if not torch.isfinite(gram).all():
        raise ValueError(
            "the Gram matrix holds NaN or inf: a loss or gradient is not finite; "
            "lower the learning rate or check the losses"
        )
    return gram


def zero_gradient_mask(gram: torch.Tensor, rtol: float = 1e-10) -> torch.Tensor:
    """Players whose gradient counts as zero: ``|g_i| <= rtol * max_j |g_j|`` (or exactly zero).

    The relative test keeps gradients whose norms are up to ``1/rtol`` apart as genuine players.
    """
    norms = gram.diagonal().clamp_min(0).sqrt()
    return (norms == 0) | (norms <= rtol * norms.max())


def zero_gradient_tag(zero: torch.Tensor) -> str | None:
    """``"zero_gradient:i,j"`` for the players flagged in the boolean mask ``zero``, or ``None``."""
    indices = torch.nonzero(zero).flatten().tolist()
    return "zero_gradient:" + ",".join(map(str, indices)) if indices else None


def join_tags(*tags: str | None) -> str:
    """Join the non-empty tags with ``";"``; ``"ok"`` when there are none."""
    present = [tag for tag in tags if tag]
    return ";".join(present) if present else "ok"


def name_players(status: str, names: Sequence[str]) -> str:
    """Replace player indices in a status by player names: ``"zero_gradient:1"`` -> ``"zero_gradient:forget"``."""
    tags = []
    for tag in status.split(";"):
        kind, sep, indices = tag.partition(":")
        if sep and all(index.isdigit() and int(index) < len(names) for index in indices.split(",")):
            tag = kind + ":" + ",".join(names[int(index)] for index in indices.split(","))
        tags.append(tag)
    return ";".join(tags)
