"""The recent stretch of a tracked series: its last tenth, but never fewer than five values.

Alpha's recent median and distribution (the live view, the figures and ``cockpit compare``)
read this window. A tenth of a short run is one or two tracked steps (the quick-start tracks
20), and the median of two is their mean, which one fit of a nearly flat parabola (an Alpha of
-19, say) drags anywhere; the median of five shrugs off two such values.
"""

from __future__ import annotations

import math

RECENT_SHARE = 0.1
RECENT_MIN = 5


def recent_count(total: int) -> int:
    """How many of ``total`` values the recent window holds (all of them when fewer than five)."""
    return min(total, max(RECENT_MIN, math.ceil(RECENT_SHARE * total)))


def recent_label(total: int) -> str:
    """The window's name for a series of ``total`` values: ``last 10%``, or ``last 5`` where a
    tenth is fewer than five."""
    count = recent_count(total)
    return "last 10%" if count == math.ceil(RECENT_SHARE * total) else f"last {count}"
