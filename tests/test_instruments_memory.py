"""Memory of the instruments: how many parameter-sized copies they keep, and exact in-place arithmetic."""

from __future__ import annotations

import copy
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from cockpit_cli.instruments.allocations import cpu_allocations, peak_of
from cockpit_cli.instruments.allocations import peak_cpu_bytes as peak_bytes
from cockpit_cli.instruments import PRESETS, QUANTITIES, Instruments, Schedule, row_blocks
from cockpit_cli.instruments.quantities.base import DIFFERENCE_BLOCK, UpdateData, difference_norms


def test_difference_norms_equal_the_norms_of_the_differences() -> None:
    generator = torch.Generator().manual_seed(0)
    shapes = [(3,), (40, 50), (DIFFERENCE_BLOCK + 1,), (700, 300)]  # small ones together, large ones in blocks
    tensors = [torch.randn(shape, generator=generator) for shape in shapes]
    others = [t + 1e-3 * torch.randn(t.shape, generator=generator) for t in tensors]
    others[1] = tensors[1].clone()  # no change at all
    expected = [float(torch.linalg.vector_norm(a.double() - b.double())) for a, b in zip(tensors, others)]
    values = difference_norms(tensors, others)
    assert values[1] == 0.0
    assert values == pytest.approx(expected, rel=1e-6)


def test_the_peak_counts_only_blocks_allocated_in_the_window() -> None:
    """Releases of blocks allocated before the window are left out (they would lower the peak),
    and an address reused after its release counts again."""
    events = [(0, 9, -1000), (1, 1, 100), (2, 2, 50), (3, 1, -100), (4, 8, -500), (5, 1, 70), (6, 3, 40), (7, 2, -50)]
    assert peak_of(events) == 160
    assert peak_of([(0, 9, -1000)]) == 0


def test_cpu_allocations_come_from_the_whole_event_tree_in_time_order() -> None:
    """Allocations and releases at any depth of the profiler's event tree, CPU ones only."""
    from torch._C._profiler import _EventType

    def allocation(time: int, address: int, size: int, device: str = "cpu") -> SimpleNamespace:
        fields = SimpleNamespace(device=torch.device(device), ptr=address, alloc_size=size)
        return SimpleNamespace(tag=_EventType.Allocation, start_time_ns=time, extra_fields=fields, children=[])

    def operation(time: int, *children: SimpleNamespace) -> SimpleNamespace:
        return SimpleNamespace(tag=_EventType.TorchOp, start_time_ns=time, extra_fields=None, children=list(children))

    tree = [operation(0, allocation(5, 1, 100), operation(6, allocation(7, 2, 64, "cuda"), allocation(3, 2, 64))), allocation(9, 1, -100)]
    profiler = SimpleNamespace(profiler=SimpleNamespace(kineto_results=SimpleNamespace(experimental_event_tree=lambda: tree)))
    assert cpu_allocations(profiler) == [(3, 2, 64), (5, 1, 100), (9, 1, -100)]


def updates_data(start_slopes: bool) -> tuple[UpdateData, list[Tensor], list[Tensor]]:
    """Return update data for random theta_t, theta_{t+1} and copies of both."""
    generator = torch.Generator().manual_seed(1)
    before = [torch.randn(5, 4, generator=generator), torch.randn(7, generator=generator)]
    after = [b - 0.1 * torch.randn(b.shape, generator=generator) for b in before]
    slopes = (lambda direction: torch.zeros(3)) if start_slopes else None
    data = UpdateData(step=0, before=[b.clone() for b in before], after=after, start_slopes=slopes)
    return data, before, after


def test_updates_are_formed_in_the_copies_of_theta_t_with_the_same_values() -> None:
    data, before, after = updates_data(start_slopes=False)
    copies = list(data.before)
    updates = data.updates
    assert all(u is c for u, c in zip(updates, copies))  # no third copy of the parameters
    assert all(torch.equal(u, a - b) for u, a, b in zip(updates, after, before))  # exactly theta_{t+1} - theta_t
    assert data.update_norms == pytest.approx([float((a - b).norm()) for a, b in zip(after, before)])


def test_updates_leave_theta_t_alone_where_the_start_slopes_evaluate_there() -> None:
    data, before, after = updates_data(start_slopes=True)
    updates = data.updates
    assert all(torch.equal(c, b) for c, b in zip(data.before, before))
    assert all(torch.equal(u, a - b) for u, a, b in zip(updates, after, before))


def trainer(template: nn.Module, batches: list[tuple[Tensor, Tensor]], every: int | None) -> Callable[[], None]:
    """Return a function that trains a copy of ``template`` on ``batches`` with SGD, plainly
    (``every=None``) or with economy every ``every`` steps (not test_instruments_exact.train: its
    snapshots of theta would count)."""

    def train() -> None:
        model = copy.deepcopy(template)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        loss_function = nn.CrossEntropyLoss()
        instruments = None
        if every is not None:
            chosen = [QUANTITIES[name](Schedule(every=every)) for name in PRESETS["economy"]]
            instruments = Instruments(model, loss_function, nn.CrossEntropyLoss(reduction="none"), optimizer, chosen)
        for step, (inputs, targets) in enumerate(batches):
            optimizer.zero_grad(set_to_none=True)
            outputs = model(inputs)
            loss = loss_function(outputs, targets)
            if instruments is None:
                loss.backward()
                optimizer.step()
                continue
            instruments.backward(step, loss, inputs, outputs, targets)
            optimizer.step()
            instruments.after_update(step)
            instruments.completed(step)

    return train


def test_economy_keeps_two_copies_of_the_parameters_besides_training_s_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """theta_0 (Distance) and theta_t, which becomes the update d (UpdateSize, Alpha): the copy of
    theta_{t+1} is made only after the last step's d is released, and nothing else of the
    parameters' size stays (float64 sums and differences go a block at a time). Blocks of
    per-sample products are made small here, so that only copies of the parameters' size count."""
    monkeypatch.setattr(row_blocks, "CHUNK_ELEMENTS", 1 << 12)
    torch.manual_seed(0)
    template = nn.Sequential(nn.Linear(600, 1000), nn.ReLU(), nn.Linear(1000, 10))
    parameter_bytes = sum(p.numel() * p.element_size() for p in template.parameters())
    batches = [(torch.randn(8, 600), torch.randint(0, 10, (8,))) for _ in range(4)]
    extra = peak_bytes(trainer(template, batches, 1)) - peak_bytes(trainer(template, batches, None))
    assert extra < 2.5 * parameter_bytes, f"{extra / parameter_bytes:.2f} copies of the parameters"


@pytest.mark.parametrize("every", [1, 4])
def test_economy_peaks_below_twice_plain_training_on_an_mlp(every: int) -> None:
    """mnist_mlp's network and batch: plain training holds the weights, their gradients and the
    activations; economy adds theta_0 and theta_t. It stays under twice plain training because
    nothing else of the parameters' size coincides with them: the mean gradient is the training's
    own, Alpha's direction (the last update) is released layer by layer as its products are
    taken, and the hooks hold no layer input past the backward pass (1.94x and 1.91x here; 2.21x
    and 2.03x while the direction stayed whole and the hooks held the inputs)."""
    torch.manual_seed(0)
    template = nn.Sequential(nn.Flatten(), nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 500), nn.ReLU(), nn.Linear(500, 100), nn.ReLU(), nn.Linear(100, 10))
    batches = [(torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))) for _ in range(every + 2)]
    ratio = peak_bytes(trainer(template, batches, every)) / peak_bytes(trainer(template, batches, None))
    assert ratio < 2.0, f"economy every {every} steps peaks at {ratio:.2f}x plain training"
