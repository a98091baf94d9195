"""The peak memory that CPU tensors take in a stretch of code, replayed from PyTorch's profiler.

``torch.profiler`` with ``profile_memory=True`` records every allocation and release of PyTorch's
CPU allocator with its address; replaying them gives the peak of the bytes held by blocks
allocated inside the window (releases of older blocks are ignored). The process's resident size
is no such measure: the allocator and the C library keep freed pages. Used by
``benchmarks/overhead.py`` and by the tests of the instruments' memory.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile


def cpu_allocations(profiler: profile) -> list[tuple[int, int, int]]:
    """Return ``(time ns, address, bytes)`` of each CPU allocation (bytes > 0) and release (< 0) recorded."""
    events = []
    stack = list(profiler.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.ptr, node.extra_fields.alloc_size))
    return sorted(events)


def peak_of(events: list[tuple[int, int, int]]) -> int:
    """Return the peak of the bytes held by blocks allocated among ``events`` (releases of older blocks are ignored)."""
    owned: set[int] = set()
    live = peak = 0
    for _, address, size in events:
        if size > 0:
            owned.add(address)
        elif address in owned:
            owned.discard(address)
        else:
            continue
        live += size
        peak = max(peak, live)
    return peak


def peak_cpu_bytes(run: Callable[[], None]) -> int:
    """Return the peak of the bytes held by CPU tensors allocated while ``run()`` runs."""
    gc.collect()  # garbage from before must not be released inside the window
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        run()
    return peak_of(cpu_allocations(profiler))
