"""Row blocks of per-sample tensors: the size that bounds the temporaries of every pass.

A pass over per-sample gradients ``[N, D]`` (the sample pass, the formed rows of outer products,
the curvature diagonal of a convolution) takes its samples a block of rows at a time, each block
about :data:`CHUNK_ELEMENTS` elements, so that no temporary of the whole ``[N, D]`` is made.
"""

from __future__ import annotations

from torch import Tensor

CHUNK_ELEMENTS = 1 << 17  # 512 KiB of float32: fewer, larger blocks run faster, and still fit in the caches


def row_chunks(samples: Tensor) -> list[Tensor]:
    """Split ``[N, D]`` into row blocks of about :data:`CHUNK_ELEMENTS` elements (views)."""
    rows = max(1, CHUNK_ELEMENTS // max(samples.shape[1], 1))
    return [samples[i : i + rows] for i in range(0, samples.shape[0], rows)]
