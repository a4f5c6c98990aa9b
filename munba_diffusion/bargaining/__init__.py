"""Rules that combine the players' gradients: Gram matrix in, weights out.

``get_combiner("nash")`` gives MUNBa's Nash bargaining; ``sum``, ``normalized``, ``mgda`` and ``pcgrad`` are
baselines behind the same :class:`~munba_diffusion.bargaining.base.Combiner` interface.
"""

from __future__ import annotations

import dataclasses

from .base import Combiner, Weighting, name_players
from .mgda import MGDAWeighting, mgda_weights
from .nash import NashBargaining, nash_bargaining_weights, nash_weights_closed_form, nash_weights_iterative
from .normalized import NormalizedWeighting, normalized_weights
from .pcgrad import PCGradWeighting, pcgrad_weights
from .sum import SumWeighting

_COMBINER_CLASSES = {
    cls.name: cls for cls in (NashBargaining, SumWeighting, NormalizedWeighting, MGDAWeighting, PCGradWeighting)
}
COMBINERS: tuple[str, ...] = tuple(_COMBINER_CLASSES)


def get_combiner(name: str, **kwargs) -> Combiner:
    """The combiner called ``name`` (one of :data:`COMBINERS`), built with ``kwargs`` as its options.

    Raises:
        ValueError: for an unknown name or an option the combiner does not have.
    """
    if name not in _COMBINER_CLASSES:
        raise ValueError(f"unknown combiner {name!r}; choose one of {', '.join(COMBINERS)}")
    cls = _COMBINER_CLASSES[name]
    options = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(kwargs) - options)
    if unknown:
        raise ValueError(
            f"combiner {name!r} has no option(s) {', '.join(unknown)}; "
            f"its options are {', '.join(sorted(options)) or 'none'}"
        )
    return cls(**kwargs)


__all__ = [
    "COMBINERS",
    "Combiner",
    "MGDAWeighting",
    "NashBargaining",
    "NormalizedWeighting",
    "PCGradWeighting",
    "SumWeighting",
    "Weighting",
    "get_combiner",
    "mgda_weights",
    "name_players",
    "nash_bargaining_weights",
    "nash_weights_closed_form",
    "nash_weights_iterative",
    "normalized_weights",
    "pcgrad_weights",
]
