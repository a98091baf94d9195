"""One number per tracked value: per-parameter lists reduced to the whole network's value (no torch)."""

from __future__ import annotations

import math
from typing import Any

NORM_TOTALS = frozenset({"GradNorm", "Distance", "UpdateSize"})  # per-parameter norms -> the network's norm
SUM_TOTALS = frozenset({"HessTrace"})  # per-parameter traces -> the network's trace


def is_number(value: Any) -> bool:
    """True for ints and floats (bools excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def quantity_total(name: str, value: Any) -> float | None:
    """Return quantity ``name``'s value as one float, or ``None`` when it has none.

    Scalars are returned as they are; per-parameter lists of GradNorm, Distance and UpdateSize
    give the norm over all parameters, HessTrace's the sum; anything else has no total.
    """
    if is_number(value):
        return float(value)
    if not isinstance(value, list) or not value or not all(is_number(v) for v in value):
        return None
    if name in NORM_TOTALS:
        return math.sqrt(math.fsum(float(v) * float(v) for v in value))
    if name in SUM_TOTALS:
        return math.fsum(value)
    return None
