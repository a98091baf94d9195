"""The largest-magnitude eigenpair from products: against ``numpy.linalg.eigh`` on explicit matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

from cockpit_cli.instruments.allocations import peak_cpu_bytes as peak_bytes
from cockpit_cli.instruments.top_eigenvalue import largest_eigenpair


def symmetric(eigenvalues: list[float], seed: int) -> tuple[Tensor, Tensor]:
    """Return ``Q diag(eigenvalues) Q^T`` ``[D, D]`` (float64) and its eigenvectors ``Q``."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=generator, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T, q


def spectrum(top: float, size: int = 80, seed: int = 0) -> list[float]:
    """``top`` and ``size - 1`` eigenvalues spread over ``(-1, 1)``, slowly decaying towards it."""
    rest = np.linspace(-0.9, 0.9, size - 1) * np.sign(top)
    return [top, *rest.tolist()]


def random_start(size: int, seed: int) -> Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("top", [1.3, -1.3])
@pytest.mark.parametrize("seed", [0, 1])
def test_finds_the_largest_magnitude_eigenvalue_with_its_sign(top: float, seed: int) -> None:
    matrix, q = symmetric(spectrum(top), seed)
    pair = largest_eigenpair(lambda v: matrix @ v, [random_start(80, seed)], rtol=1e-10, atol=0.0, max_products=200)
    assert pair.value == pytest.approx(top, rel=1e-9)
    assert abs(float(pair.vector @ q[:, 0])) == pytest.approx(1.0, abs=1e-6)
    assert float((matrix @ pair.vector - pair.value * pair.vector).norm()) <= 1e-10 * abs(top) * 1.01


def test_the_residual_tolerance_bounds_the_distance_to_an_eigenvalue() -> None:
    matrix, _ = symmetric(spectrum(1.05), 2)
    eigenvalues = np.linalg.eigvalsh(matrix.numpy())
    for rtol in (1e-1, 1e-2, 1e-3):
        pair = largest_eigenpair(lambda v: matrix @ v, [random_start(80, 3)], rtol=rtol, atol=0.0, max_products=200)
        assert pair.error <= rtol * abs(pair.value)
        assert np.min(np.abs(eigenvalues - pair.value)) <= pair.error


def test_a_negative_top_eigenvalue_stops_as_its_negation_does() -> None:
    """The tolerance is relative to the value's magnitude: ``-H`` takes the same products as ``H``."""
    matrix, _ = symmetric(spectrum(1.05), 2)
    for rtol in (1e-1, 1e-3):
        positive = largest_eigenpair(lambda v: matrix @ v, [random_start(80, 3)], rtol=rtol, atol=0.0, max_products=200)
        negative = largest_eigenpair(lambda v: -(matrix @ v), [random_start(80, 3)], rtol=rtol, atol=0.0, max_products=200)
        assert negative.products == positive.products < 40
        assert negative.value == pytest.approx(-positive.value, rel=1e-12)


def test_start_vectors_beyond_the_budget_are_not_taken() -> None:
    matrix, _ = symmetric(spectrum(1.01), 9)
    starts = [random_start(80, seed) for seed in (1, 2, 3)]
    pair = largest_eigenpair(lambda v: matrix @ v, starts, rtol=0.0, atol=0.0, max_products=2)
    assert pair.products == 2


def test_a_start_close_to_another_still_adds_its_direction() -> None:
    """Two starts 1e-3 apart in angle span a plane: the value is the Rayleigh-Ritz value of that
    plane (only a vector within round-off of the basis is dropped)."""
    matrix, _ = symmetric(spectrum(1.3), 10)
    first, other = random_start(80, 11), random_start(80, 12)
    pair = largest_eigenpair(lambda v: matrix @ v, [first, first + 1e-3 * first.norm() / other.norm() * other], rtol=0.0, atol=0.0, max_products=2)
    assert pair.products == 2
    basis, _ = torch.linalg.qr(torch.stack([first, other], 1))
    ritz = np.linalg.eigvalsh((basis.T @ matrix @ basis).numpy())
    assert pair.value == pytest.approx(ritz[np.argmax(np.abs(ritz))], rel=1e-8)


def test_one_start_spans_the_krylov_space_of_lanczos() -> None:
    """After k products from one start vector the Ritz value is that of the k-dimensional Krylov
    space (Lanczos iteration), computed here by Rayleigh-Ritz on an explicit Krylov basis."""
    matrix, _ = symmetric(spectrum(1.02), 4)
    start = random_start(80, 5)
    for k in (1, 2, 5, 9):
        pair = largest_eigenpair(lambda v: matrix @ v, [start], rtol=0.0, atol=0.0, max_products=k)
        assert pair.products == k
        columns = [start / start.norm()]
        for _ in range(k - 1):
            columns.append(matrix @ columns[-1])
            columns[-1] = columns[-1] / columns[-1].norm()
        basis, _ = torch.linalg.qr(torch.stack(columns, 1))
        ritz = np.linalg.eigvalsh((basis.T @ matrix @ basis).numpy())
        assert pair.value == pytest.approx(ritz[np.argmax(np.abs(ritz))], rel=1e-9)


def test_a_start_at_the_eigenvector_needs_one_product_and_a_useless_start_costs_one() -> None:
    matrix, q = symmetric(spectrum(2.0), 6)
    exact = largest_eigenpair(lambda v: matrix @ v, [q[:, 0]], rtol=1e-8, atol=0.0, max_products=50)
    assert exact.products == 1
    assert exact.value == pytest.approx(2.0, rel=1e-12)
    useless = q[:, 40]  # an eigenvector far from the top
    both = largest_eigenpair(lambda v: matrix @ v, [useless, q[:, 0] + 1e-3 * q[:, 1]], rtol=1e-8, atol=0.0, max_products=50)
    alone = largest_eigenpair(lambda v: matrix @ v, [q[:, 0] + 1e-3 * q[:, 1]], rtol=1e-8, atol=0.0, max_products=50)
    assert both.value == pytest.approx(2.0, rel=1e-12)
    assert both.products <= alone.products + 1


def test_restarts_keep_converging_with_a_small_basis() -> None:
    matrix, _ = symmetric(spectrum(1.01, size=120), 7)
    full = largest_eigenpair(lambda v: matrix @ v, [random_start(120, 8)], rtol=1e-9, atol=0.0, max_products=400)
    small = largest_eigenpair(lambda v: matrix @ v, [random_start(120, 8)], rtol=1e-9, atol=0.0, max_products=400, max_basis=5)
    assert small.products > 5  # it did restart
    assert small.value == pytest.approx(1.01, rel=1e-9)
    assert full.value == pytest.approx(1.01, rel=1e-9)


def test_stops_at_the_product_budget_and_refuses_zero_starts() -> None:
    matrix, _ = symmetric(spectrum(1.01), 9)
    pair = largest_eigenpair(lambda v: matrix @ v, [random_start(80, 1)], rtol=0.0, atol=0.0, max_products=3)
    assert pair.products == 3
    with pytest.raises(ValueError, match="zero"):
        largest_eigenpair(lambda v: matrix @ v, [torch.zeros(80, dtype=torch.float64)], rtol=1e-3, atol=0.0, max_products=3)


def test_memory_grows_with_the_products_taken_and_the_starts_are_released() -> None:
    """Two vectors per product taken (the basis vector and its image) and four more while it runs
    (the Ritz vector, its image as the residual, one being orthogonalised, one product), not
    ``2 * max_basis`` allocated up front; the start vectors are freed as they enter the basis."""
    size, products = 200_000, 5
    scales = torch.linspace(1.0, 2.0, size)

    def run() -> None:
        starts = [torch.randn(size), torch.randn(size)]
        largest_eigenpair(lambda v: scales * v, starts, rtol=0.0, atol=0.0, max_products=products, max_basis=12)

    vector_bytes = size * 4
    assert peak_bytes(run) <= (2 * products + 4) * vector_bytes + 64 * 1024


def two_ended(top: float, bottom: float, size: int = 80, seed: int = 13) -> tuple[Tensor, Tensor]:
    """A matrix with eigenvalues ``top``, ``bottom`` and ``size - 2`` more spread over ``(-0.5, 0.5) * |bottom|``."""
    return symmetric([top, bottom, *(np.linspace(-0.5, 0.5, size - 2) * abs(bottom)).tolist()], seed)


def warm_starts(q: Tensor, seed: int) -> list[Tensor]:
    """The previous step's eigenvector of the positive end (slightly off), and a vector that leans
    towards the negative end, as a gradient may."""
    noise = random_start(q.shape[0], seed)
    return [0.8 * q[:, 1] + 0.6 * noise / noise.norm(), q[:, 0] + 1e-3 * noise / noise.norm()]


def test_an_other_end_of_nearly_equal_magnitude_is_settled_before_the_value_is_taken() -> None:
    """Started at the positive end's eigenvector, the iteration stopped there (19.2) though the
    negative end (-19.96) is the larger in magnitude and its Ritz value was already near."""
    matrix, q = two_ended(19.2, -19.96)
    pair = largest_eigenpair(lambda v: matrix @ v, warm_starts(q, 14), rtol=3e-2, atol=0.0, max_products=100)
    assert pair.value == pytest.approx(-19.96, rel=1e-3)


def test_an_other_end_known_to_be_smaller_is_refined_only_to_the_gap() -> None:
    """The other end's Ritz pair (-2.8 at first, of -4.5) is refined until the eigenvalue it
    approximates is known to be smaller in magnitude than the value (its residual below the gap),
    two more products here; to its own tolerance it would take three."""
    import cockpit_cli.instruments.top_eigenvalue as top_eigenvalue

    matrix, q = two_ended(5.0, -4.5)
    pair = largest_eigenpair(lambda v: matrix @ v, warm_starts(q, 15), rtol=3e-2, atol=0.0, max_products=100)
    assert pair.value == pytest.approx(5.0, rel=1e-3)
    original = top_eigenvalue.OTHER_END
    try:
        top_eigenvalue.OTHER_END = 2.0  # never looks at the other end
        unchecked = largest_eigenpair(lambda v: matrix @ v, warm_starts(q, 15), rtol=3e-2, atol=0.0, max_products=100)
    finally:
        top_eigenvalue.OTHER_END = original
    assert pair.products == unchecked.products + 2

