"""HessMaxEV: the largest-magnitude eigenvalue of the mini-batch loss's Hessian.

Lanczos iteration on Hessian-vector products (at most ``max_iterations``), with full
reorthogonalisation: after k products the estimate is the largest-magnitude Ritz value of the
k-dimensional Krylov space, which is never worse than k steps of power iteration and separates
nearly equal top eigenvalues far sooner. It stops when the Ritz pair's residual
``||H y - lambda y||`` is at most ``atol + rtol * |lambda|``; a symmetric matrix has an eigenvalue
that close to ``lambda``. Each tracked step starts from the previous tracked step's Ritz vector
(``warm_start``), which usually converges in a few products where a random start needs dozens.
The random first start uses a private generator, so tracking never changes the training's random
numbers. Up to ``max_iterations`` vectors of the parameters' size are kept during a step.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cockpit_cli.instruments.quantities.base import HVP, Quantity, StepData, flat_dot, register


@register
class HessMaxEV(Quantity):
    name = "HessMaxEV"
    carried = ("eigenvector",)
    options_defaults: dict[str, Any] = {"max_iterations": 100, "rtol": 1e-3, "atol": 1e-6, "warm_start": True}

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.eigenvector: list[Tensor] | None = None
        self.iterations: list[int] = []
        self.generator = torch.Generator().manual_seed(0)

    def requirements(self, step: int) -> set[str]:
        return {HVP}

    def _start(self, params: list[Tensor]) -> list[Tensor]:
        if self.options["warm_start"] and self.eigenvector is not None:
            return self.eigenvector
        return [torch.randn(p.shape, generator=self.generator, dtype=p.dtype).to(p.device) for p in params]

    def compute(self, data: StepData) -> None:
        vector = _normalized(self._start(data.params))
        if math.sqrt(flat_dot(vector, vector)) == 0.0:
            vector = _normalized([torch.ones_like(p) for p in data.params])
        basis: list[list[Tensor]] = []
        diagonal: list[float] = []
        off_diagonal: list[float] = []
        eigenvalue, ritz = 0.0, np.ones(1)
        iterations = 0
        for iterations in range(1, int(self.options["max_iterations"]) + 1):
            basis.append(vector)
            product = [h.detach() for h in data.hvp(vector)]
            diagonal.append(flat_dot(vector, product))
            for _ in range(2):  # full reorthogonalisation, twice for round-off
                for previous in basis:
                    overlap = flat_dot(previous, product)
                    product = [w - overlap * b for w, b in zip(product, previous)]
            size = math.sqrt(flat_dot(product, product))
            values, vectors = np.linalg.eigh(np.diag(diagonal) + np.diag(off_diagonal, 1) + np.diag(off_diagonal, -1))
            top = int(np.argmax(np.abs(values)))
            eigenvalue, ritz = float(values[top]), vectors[:, top]
            residual = size * abs(float(ritz[-1]))
            if residual <= self.options["atol"] + self.options["rtol"] * abs(eigenvalue) or size == 0.0:
                break
            off_diagonal.append(size)
            vector = [w / size for w in product]
        self.eigenvector = _normalized([sum(float(c) * b[i] for c, b in zip(ritz, basis)) for i in range(len(data.params))])
        self.iterations.append(iterations)
        data.emit(self.name, eigenvalue)


def _normalized(vector: list[Tensor]) -> list[Tensor]:
    size = math.sqrt(flat_dot(vector, vector))
    return [v / size for v in vector] if size > 0 else vector
