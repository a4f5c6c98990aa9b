"""Rates with their uncertainty: the 95% Wilson score interval of a share of images, and how reports carry it.

A rate is ``successes / n`` over ``n`` images. Its Wilson interval, with ``z`` the two-sided 95% normal quantile
(1.959964) and ``p = successes / n``::

    centre = (p + z^2 / 2n) / (1 + z^2 / n)
    half   = z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n)
    [centre - half, centre + half]   (exactly 0 at 0 successes and 1 at n successes)

Unlike the normal approximation ``p +- z sqrt(p (1 - p) / n)`` it never leaves [0, 1] and is not empty at 0 or
n successes: 0 of 10 gives [0, 0.278], 5 of 10 gives [0.237, 0.763]. With ``n = 0`` there is no rate and no
interval (None).

Every metric that reports a rate ``K`` (a float, unchanged) also reports ``K_ci95`` (``[low, high]``) and ``K_n``
(the number of images it counts), via :func:`rate_fields`; a breakdown (one rate per group) uses
:func:`rate_entry`'s ``{"rate", "ci95", "n"}``. Readers find a rate's interval with :func:`interval_of`.

Example::

    >>> rate_fields("concept_rate", [True, False, False, False])
    {'concept_rate': 0.25, 'concept_rate_ci95': [0.0455..., 0.6993...], 'concept_rate_n': 4}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

WILSON_Z = 1.959963984540054  # two-sided 95% standard normal quantile
CI_SUFFIX = "_ci95"
N_SUFFIX = "_n"


def wilson_bounds(successes: int, total: int, z: float = WILSON_Z) -> tuple[float, float] | None:
    """The Wilson score interval ``(low, high)`` of ``successes`` out of ``total``; None when ``total`` is 0."""
    if total < 0 or not 0 <= successes <= total:
        raise ValueError(f"need 0 <= successes <= total, got {successes} of {total}")
    if total == 0:
        return None
    p = successes / total
    denominator = 1 + z**2 / total
    centre = (p + z**2 / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z**2 / (4 * total**2)) / denominator
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exactly 0 and 1 at the ends (no rounding residue)
    high = 1.0 if successes == total else min(1.0, centre + half)
    return low, high


def wilson_interval(successes: int, total: int) -> dict:
    """The share with its 95% Wilson interval: ``{"rate", "low", "high", "n"}`` (None's and n = 0 when ``total`` is
    0)."""
    bounds = wilson_bounds(successes, total)
    if bounds is None:
        return {"rate": None, "low": None, "high": None, "n": 0}
    return {"rate": successes / total, "low": bounds[0], "high": bounds[1], "n": total}


def rate_entry(hits: Sequence[bool]) -> dict:
    """One group's rate: ``{"rate": share of True, "ci95": [low, high], "n": len(hits)}`` (None's when empty)."""
    interval = wilson_interval(sum(map(bool, hits)), len(hits))
    low_high = None if interval["rate"] is None else [interval["low"], interval["high"]]
    return {"rate": interval["rate"], "ci95": low_high, "n": interval["n"]}


def rate_fields(key: str, hits: Sequence[bool]) -> dict:
    """``{key: rate, key_ci95: [low, high], key_n: n}`` for the images ``hits`` (True = counted in the rate)."""
    entry = rate_entry(hits)
    return {key: entry["rate"], key + CI_SUFFIX: entry["ci95"], key + N_SUFFIX: entry["n"]}


def interval_of(values: Mapping, key: str) -> tuple[list[float] | None, int | None] | None:
    """``(ci95, n)`` of the rate ``key`` in a metric's result, or None when ``key`` is no rate with an interval."""
    if key + CI_SUFFIX not in values:
        return None
    return values[key + CI_SUFFIX], values.get(key + N_SUFFIX)


def is_interval_field(key: str, values: Mapping) -> bool:
    """Whether ``key`` is the ``_ci95`` or ``_n`` companion of a rate in ``values`` (not a number of its own)."""
    for suffix in (CI_SUFFIX, N_SUFFIX):
        if key.endswith(suffix) and key[: -len(suffix)] in values and key[: -len(suffix)] + CI_SUFFIX in values:
            return True
    return False


def format_rate(rate: float | None, ci95: Sequence[float] | None = None, n: int | None = None) -> str:
    """``12.5% [6.1, 23.9]`` (percentages; the interval when given, then ``, n = 24`` when ``n`` is given)."""
    if rate is None:
        return "-" if not n else f"- (n = {n})"
    text = f"{100 * float(rate):.1f}%"
    if ci95 is not None:
        text += f" [{100 * float(ci95[0]):.1f}, {100 * float(ci95[1]):.1f}]"
    return text + (f", n = {n}" if n is not None else "")
