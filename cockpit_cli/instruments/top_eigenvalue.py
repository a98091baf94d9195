"""The largest-magnitude eigenpair of a symmetric operator known only by its products ``H v``.

A Rayleigh-Ritz iteration on a growing subspace: the subspace starts with a few given vectors
(the previous step's eigenvector and the current gradient, which the top eigenvectors of a
network's Hessian tend to lie close to), and each iteration adds the residual ``H u - theta u``
of the current Ritz pair ``(theta, u)``. From a single start vector this spans the same Krylov
space as Lanczos iteration, so until its first restart it is never slower than Lanczos (or power
iteration); from several, it is as good as the best of them. One product per added vector.

It stops when the residual norm ``r = ||H u - theta u||`` is at most ``atol + rtol * |theta|``:
a symmetric operator has an eigenvalue within ``r`` of ``theta``, and once ``theta`` is separated
from the rest of the spectrum by ``gap``, within about ``r^2 / gap``, far closer. Where the
spectrum's other end shows a Ritz value of the opposite sign and at least half that magnitude,
the residuals of that end's pair are added until the eigenvalue it approximates is known to be
the smaller in magnitude (or turns out the larger), so that the value does not depend on which
end the start vectors favoured. (No method that sees H only through products can rule out an
eigenvalue its vectors have not met yet: in a cluster of nearly equal top eigenvalues the value
may be another member of the cluster.) When
the basis is full, the iteration restarts from its best Ritz vectors, whose products it knows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

Product = Callable[[Tensor], Tensor]
KEPT_ON_RESTART = 3
# The Ritz pair at the spectrum's other end must converge too where its value is at least this
# share of the largest one's magnitude (:func:`_unsettled_other_end`).
OTHER_END = 0.5


@dataclass
class Eigenpair:
    """The result of :func:`largest_eigenpair`.

    Attributes:
        value: The Ritz value of largest magnitude.
        vector: Its unit Ritz vector ``[D]``.
        products: How many products ``H v`` were taken.
        error: The residual norm when it stopped, which bounds the distance of ``value`` to an eigenvalue.
    """

    value: float
    vector: Tensor
    products: int
    error: float


class _Subspace:
    """An orthonormal basis ``v_1 .. v_k`` (``[D]`` each), their products ``w_j = H v_j`` and
    ``T = V^T H V`` (``[k, k]``). The vectors are kept as a list, so that memory grows with the
    products actually taken (``2 k`` vectors), never to the largest basis allowed beforehand;
    the operations on them go a vector at a time (``k`` is small and ``D`` large)."""

    def __init__(self, product: Product, size: int):
        self.product = product
        self.size = size
        self.basis: list[Tensor] = []
        self.images: list[Tensor] = []
        self.projected = np.zeros((size, size))
        self.products = 0

    @property
    def k(self) -> int:
        return len(self.basis)

    @property
    def full(self) -> bool:
        return self.k == self.size

    def add(self, vector: Tensor) -> bool:
        """Orthonormalise ``vector`` against the basis and add it with its product; return
        whether it added a direction (``False`` if it lies in the span already)."""
        size = float(vector.norm())
        if size == 0.0 or not math.isfinite(size):
            return False
        vector = vector / size
        for _ in range(2):  # twice, for round-off
            for known in self.basis:
                vector.sub_(known, alpha=float(torch.dot(known, vector)))
        remaining = float(vector.norm())
        if remaining < 1e-6:  # already (numerically) in the span: the Ritz pair is exact
            return False
        vector.div_(remaining)
        self._append(vector, self.product(vector))
        self.products += 1
        return True

    def _append(self, vector: Tensor, image: Tensor) -> None:
        k = self.k
        self.basis.append(vector)
        self.images.append(image)
        column = torch.stack([torch.dot(known, image) for known in self.basis]).double().cpu().numpy()
        self.projected[: k + 1, k] = column
        self.projected[k, : k + 1] = column

    def ritz(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the Ritz values ``[k]`` (ascending) and their coefficients ``[k, k]`` in the basis (columns)."""
        return np.linalg.eigh(self.projected[: self.k, : self.k])

    def combine(self, coefficients: np.ndarray) -> tuple[Tensor, Tensor]:
        """Return ``V y`` and ``W y`` for coefficients ``y`` (``[k]``)."""
        return _combination(self.basis, coefficients), _combination(self.images, coefficients)

    def restart(self) -> None:
        """Keep only the best Ritz vectors (by magnitude) and their known products."""
        values, vectors = np.linalg.eigh(self.projected[: self.k, : self.k])
        best = np.argsort(-np.abs(values))[:KEPT_ON_RESTART]
        kept = [self.combine(vectors[:, i]) for i in best]
        self.basis, self.images = [], []
        self.projected[:] = 0.0
        for vector, image in kept:
            size = vector.norm()
            self._append(vector / size, image / size)


def _combination(vectors: list[Tensor], coefficients: np.ndarray) -> Tensor:
    """Return ``sum_j coefficients[j] * vectors[j]`` (``[D]``)."""
    total = vectors[0] * float(coefficients[0])
    for vector, coefficient in zip(vectors[1:], coefficients[1:]):
        total.add_(vector, alpha=float(coefficient))
    return total


def largest_eigenpair(product: Product, starts: list[Tensor], rtol: float, atol: float, max_products: int, max_basis: int = 12) -> Eigenpair:
    """Return the largest-magnitude eigenpair of the symmetric ``H`` behind ``product``.

    Args:
        product: ``v -> H v`` for flat vectors ``[D]``.
        starts: Start vectors ``[D]`` (at least one non-zero); the first ones count most
            when the budget is small. The list is emptied as they enter the basis, so that
            the caller's copies are freed then.
        rtol: Relative tolerance of the residual norm (to the value).
        atol: Absolute tolerance of the residual norm.
        max_products: At most this many products.
        max_basis: Vectors kept at once (memory: twice as many of size D as were added, at most
            twice this many, and four more while it runs).
    """
    space = _Subspace(product, max(max_basis, KEPT_ON_RESTART + 1))
    while starts:
        start = starts.pop(0).reshape(-1)
        if space.products < max_products:
            space.add(start)
        del start
    if space.k == 0:
        raise ValueError("every start vector is zero")
    while True:
        values, coefficients = space.ritz()
        top = int(np.argmax(np.abs(values)))
        value = float(values[top])
        vector, residual = space.combine(coefficients[:, top])
        residual.sub_(vector, alpha=value)  # H u - theta u, in place of H u (not needed after)
        size = float(residual.norm())
        pair = Eigenpair(value, vector, space.products, size)  # (its vector is normalised when returned)
        if space.products >= max_products:
            return _normalised(pair)
        if size <= atol + rtol * abs(value):
            del residual
            residual = _unsettled_other_end(space, values, coefficients, top, rtol, atol)  # what to add instead
            if residual is None:
                return _normalised(pair)
        if space.full:
            space.restart()
        if not space.add(residual):  # the residual is round-off: nothing left to add
            return _normalised(pair)
        del pair, vector, residual  # before the next combination is formed


def _normalised(pair: Eigenpair) -> Eigenpair:
    """Return ``pair`` with its vector scaled to unit length (in place)."""
    pair.vector.div_(pair.vector.norm())
    return pair


def _unsettled_other_end(space: _Subspace, values: np.ndarray, coefficients: np.ndarray, top: int, rtol: float, atol: float) -> Tensor | None:
    """Return the residual of the Ritz pair at the spectrum's other end where its value has at
    least :data:`OTHER_END` of the converged value's magnitude and the eigenvalue it approximates
    may yet be the larger in magnitude: its residual norm (the distance within which an
    eigenvalue lies) exceeds both the gap between the two magnitudes and the tolerance. ``None``
    where the other end is far smaller, or settled (a few more products settle it)."""
    other = 0 if values[top] > 0 else len(values) - 1
    theta, largest = float(values[other]), abs(float(values[top]))
    if other == top or theta * values[top] >= 0 or abs(theta) < OTHER_END * largest:
        return None
    vector, image = space.combine(coefficients[:, other])
    residual = image.sub_(vector, alpha=theta)
    return None if float(residual.norm()) <= max(atol + rtol * abs(theta), largest - abs(theta)) else residual
