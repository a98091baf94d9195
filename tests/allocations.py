"""The peak of the memory that CPU tensors take while a function runs, from PyTorch's profiler."""

from __future__ import annotations

import gc
from collections.abc import Callable

from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile


def peak_bytes(run: Callable[[], None]) -> int:
    """Return the peak of the bytes held by CPU tensors allocated while ``run()`` runs."""
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        run()
    events, stack = [], list(profiler.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.ptr, node.extra_fields.alloc_size))
    owned: set[int] = set()
    live = peak = 0
    for _, address, size in sorted(events):
        if size > 0:
            owned.add(address)
        elif address in owned:
            owned.discard(address)
        else:
            continue  # released, but allocated before the window
        live += size
        peak = max(peak, live)
    return peak
