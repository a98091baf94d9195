"""Plain values out of JSON records: numbers, nested fields, parameter layers, histogram shares."""

from __future__ import annotations

import math
from typing import Any

from cockpit_cli.storage.totals import is_number  # noqa: F401  (re-exported for the rules)


def layer_of(parameter: str) -> str:
    """The module a parameter belongs to: ``"3.weight"`` -> ``"3"``; a bare name is its own layer."""
    return parameter.rsplit(".", 1)[0] if "." in parameter else parameter


def field_of(item: Any, *parts: str | None) -> Any:
    """``item[part]...`` for the parts that are not ``None`` (``None`` where a level is missing)."""
    for part in parts:
        if part is not None:
            item = item.get(part) if isinstance(item, dict) else None
    return item


def as_float(value: Any) -> float | None:
    """``value`` as a float when it is a number, else ``None``."""
    return value if type(value) is float else float(value) if is_number(value) else None


def as_floats(value: Any) -> list[float] | None:
    """A list of numbers as floats (non-numbers become ``nan``); ``None`` when ``value`` is no list."""
    if not isinstance(value, list):
        return None
    return [x if type(x) is float else float(x) if is_number(x) else math.nan for x in value]


def share_in_edges(histogram: Any) -> float:
    """Share of a histogram's counts in its two edge bins (where out-of-range values are clamped)."""
    counts = histogram.get("counts") if isinstance(histogram, dict) else None
    total = sum(counts) if counts else 0
    return (counts[0] + counts[-1]) / total if total else math.nan


def peak_shares(histogram: Any) -> list[float]:
    """Per parameter, the share of its per-sample gradient elements in its two fullest adjacent bins.

    Two bins, because zero lies on the edge between the two middle bins of a symmetric range, so
    gradients collapsed onto zero fill both.
    """
    per_parameter = histogram.get("per_parameter") if isinstance(histogram, dict) else None
    shares = []
    for counts in per_parameter or []:
        total = sum(counts)
        shares.append(max(a + b for a, b in zip(counts, counts[1:] or [0])) / total if total else math.nan)
    return shares
