"""What a quantity is, what the engine hands it, and the registry of quantities.

A quantity declares, for a step at which it is active, what it needs (:meth:`Quantity.requirements`): reductions of
per-sample gradients, the curvature diagonal, Hessian-vector products, the individual losses, a
snapshot of the parameters before the update. The engine gathers the union over all due
quantities, runs one backward pass, and hands each quantity a :class:`StepData`. Quantities
write their values with :meth:`StepData.emit` (a value may belong to an earlier step, as Alpha's
does). A quantity that is not active at a step is not asked and costs nothing there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from cockpit_cli.instruments.accumulator import Accumulator
from cockpit_cli.instruments.reductions import ReductionOptions
from cockpit_cli.instruments.schedules import Schedule

# Requirements other than reduction names.
INDIVIDUAL_LOSSES = "individual_losses"  # per-sample total losses [N]
CURVATURE = "curvature"  # the curvature diagonal in the backward pass
HVP = "hvp"  # Hessian-vector products of the mini-batch loss
PARAMS_BEFORE = "params_before"  # a copy of theta_t, handed to after_update
INPUTS = "inputs"  # the input batch
ACTIVATIONS = "activations"  # statistics of module outputs from the forward pass

HessianVectorProduct = Callable[[list[Tensor]], list[Tensor]]


@dataclass
class StepData:
    """What the engine hands the due quantities after the backward pass of a step.

    Attributes:
        step: The step.
        loss: Mini-batch loss (with the regulariser).
        batch_size: N.
        params: The tracked parameters (theta_t), in order.
        names: Their names.
        grads: Their gradients (of the mini-batch loss), in order.
        reductions: Sums from the fused per-sample pass (empty without one).
        individual_losses: ``[N]`` per-sample total losses, when requested.
        hvp: Hessian-vector product of the mini-batch loss, when requested.
        lr: Learning rate of the first parameter group.
        plain_sgd: Whether the optimizer is SGD without momentum, weight decay or Nesterov.
        inputs: The input batch, when requested.
        activations: ``{module name: {mean, std, zero_fraction}}`` when requested.
        elapsed: Seconds since the instruments were attached.
    """

    step: int
    loss: float
    batch_size: int
    params: list[Tensor]
    names: list[str]
    grads: list[Tensor]
    reductions: Accumulator
    lr: float
    plain_sgd: bool
    elapsed: float
    individual_losses: Tensor | None = None
    hvp: HessianVectorProduct | None = None
    inputs: Tensor | None = None
    activations: dict[str, dict[str, float]] | None = None
    outputs: dict[int, dict[str, Any]] = field(default_factory=dict)

    def emit(self, name: str, value: Any, step: int | None = None) -> None:
        """Record ``value`` of quantity ``name`` for ``step`` (default: this step)."""
        self.outputs.setdefault(self.step if step is None else step, {})[name] = value

    @cached_property
    def grad_norms(self) -> list[float]:
        """``||g_p||`` per parameter (computed once, shared by the quantities that show it)."""
        return norms(self.grads)

    @cached_property
    def param_norms(self) -> list[float]:
        """``||theta_p||`` per parameter."""
        return norms(self.params)


@dataclass
class UpdateData:
    """What the engine hands quantities after the optimizer's update of step ``step``.

    Attributes:
        step: The step whose update just happened.
        before: theta_t (copies), when requested at that step; the update ``theta_{t+1} - theta_t``
            once :attr:`updates` has been read (in place, unless ``start_slopes`` is set).
        after: theta_{t+1} (the live parameters).
        start_slopes: ``direction -> [N]``, the per-sample products g_i . direction at theta_t on
            step t's batch (forward mode), when START_SLOPES was requested at that step.
        outputs: Where to emit values, by step.
    """

    step: int
    before: list[Tensor] | None
    after: list[Tensor]
    start_slopes: Callable[[list[Tensor]], Tensor] | None = None
    outputs: dict[int, dict[str, Any]] = field(default_factory=dict)

    def emit(self, name: str, value: Any, step: int | None = None) -> None:
        """Record ``value`` of quantity ``name`` for ``step`` (default: the update's step)."""
        self.outputs.setdefault(self.step if step is None else step, {})[name] = value

    @cached_property
    def updates(self) -> list[Tensor]:
        """``theta_{t+1} - theta_t`` per parameter (computed once, shared by the quantities that use it).

        Without ``start_slopes`` (which evaluates at theta_t) the difference is formed in place in
        the copies ``before``, so that no third copy of the parameters is made: ``before`` holds
        the update from then on. Both ways give the same values: ``after + (-before)`` rounds
        exactly as ``after - before`` does.
        """
        with torch.no_grad():
            if self.start_slopes is not None:
                return list(torch._foreach_sub(self.after, self.before))
            torch._foreach_neg_(self.before)
            torch._foreach_add_(self.before, self.after)
            return self.before

    @cached_property
    def update_norms(self) -> list[float]:
        """``||theta_{t+1} - theta_t||`` per parameter."""
        return norms(self.updates)


class Quantity:
    """Base class: a named instrument with a schedule.

    Subclasses set ``name`` and override :meth:`requirements` and :meth:`compute` (and
    :meth:`after_update` if they need the parameters after the update). ``lag`` is the number of
    steps after a tracked step at which its value is complete (1 for Alpha).

    Args:
        schedule: When the quantity is tracked.
        options: Quantity-specific settings from the config (already validated).
    """

    name: ClassVar[str]
    lag: ClassVar[int] = 0
    per_sample: ClassVar[bool] = False  # needs per-sample gradients
    needs_curvature: ClassVar[bool] = False  # needs a curvature diagonal (BackPACK second order)
    plain_sgd_only: ClassVar[bool] = False
    options_defaults: ClassVar[dict[str, Any]] = {}
    options_minimums: ClassVar[dict[str, float]] = {}  # lower bounds of numeric options, checked with the config
    options_maximums: ClassVar[dict[str, float]] = {}  # upper bounds, likewise (of each number of a pair)

    def __init__(self, schedule: Schedule, options: dict[str, Any] | None = None):
        self.schedule = schedule
        self.options = {**self.options_defaults, **(options or {})}

    def attach(self, params: list[Tensor], plain_sgd: bool) -> None:
        """Called once when the instruments attach: the tracked parameters (theta_0) and whether
        the optimizer is plain SGD (``d = -lr g``)."""

    def is_active(self, step: int) -> bool:
        """Return whether the quantity works at ``step`` (its schedule, plus any pending work)."""
        return self.schedule(step)

    def next_active(self, step: int) -> int | None:
        """Return the first step at or after ``step`` at which :meth:`is_active` holds, as things
        stand (``None``: never). Override it together with :meth:`is_active`."""
        return self.schedule.next_step(step)

    def requirements(self, step: int) -> set[str]:
        """Return what the quantity needs at an active ``step``."""
        return set()

    def reduction_options(self, step: int, options: ReductionOptions) -> None:
        """Adjust the shared reduction options for this step (e.g. histogram ranges)."""

    def compute(self, data: StepData) -> None:
        """Compute from ``data`` and emit values."""

    def after_update(self, data: UpdateData) -> None:
        """Called after every optimizer step at which the quantity asked for PARAMS_BEFORE."""

    def forget(self, step: int) -> None:
        """Called instead of :meth:`compute` at an active ``step`` whose backward pass gave
        nothing to compute from (scaled gradients that overflowed): drop what waits for it."""

    # Attributes that carry state from one step to the next (saved in checkpoints).
    carried: ClassVar[tuple[str, ...]] = ()

    def state_dict(self) -> dict[str, Any]:
        """Return carried state (tensors and plain containers), for checkpoints."""
        return {name: getattr(self, name) for name in self.carried}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        for name in self.carried:
            if name in state:
                setattr(self, name, state[name])


QUANTITIES: dict[str, type[Quantity]] = {}


def register(cls: type[Quantity]) -> type[Quantity]:
    """Class decorator adding a quantity to :data:`QUANTITIES`; a name twice is an error."""
    if cls.name in QUANTITIES:
        raise ValueError(f"quantity '{cls.name}' is registered twice")
    QUANTITIES[cls.name] = cls
    return cls


def gradient_test_defined(batch_size: int, grad_sq: float) -> bool:
    """Whether the gradient tests (NormTest, InnerTest, OrthoTest: a spread over ``N (N - 1)``
    relative to ``||g||^2``) have a value: not for one sample, nor for a gradient of zero."""
    return batch_size > 1 and grad_sq > 0.0


LOW_PRECISION = (torch.float16, torch.bfloat16)


def norms(tensors: list[Tensor]) -> list[float]:
    """Return the 2-norm of each tensor (one batched norm, one conversion to Python floats); those
    of float16 and bfloat16 tensors in float32 (in their own precision they keep three digits)."""
    if any(t.dtype in LOW_PRECISION for t in tensors):
        return torch.stack([torch.linalg.vector_norm(t, dtype=torch.promote_types(t.dtype, torch.float32)) for t in tensors]).tolist()
    if len(tensors) <= 1:
        return [float(torch.linalg.vector_norm(t)) for t in tensors]
    return torch.stack(torch._foreach_norm(tensors)).tolist()


def counts_as_lists(total: Tensor, per_param: list[Tensor | None]) -> tuple[list, list[list | None]]:
    """Return histogram counts as nested lists: the total and each parameter's (``None`` where a
    parameter has none), all in one transfer from the device.

    Args:
        total: Counts of all parameters, any shape (``[bins]``, ``[bins_x, bins_y]``).
        per_param: Each parameter's counts, shaped like ``total``, or ``None``.
    """
    present = [counts for counts in per_param if counts is not None]
    rows = torch.stack([total, *present]).tolist()
    by_param = iter(rows[1:])
    return rows[0], [None if counts is None else next(by_param) for counts in per_param]


DIFFERENCE_BLOCK = 1 << 16  # elements of the largest temporary difference (256 KiB of float32)


def difference_norms(tensors: list[Tensor], others: list[Tensor]) -> list[float]:
    """Return ``||a - b||`` for each pair of same-shaped tensors, without a difference of more
    than :data:`DIFFERENCE_BLOCK` elements in memory (a large tensor's norm is combined, in
    float64, from the norms of its blocks)."""
    small = [i for i, t in enumerate(tensors) if t.numel() <= DIFFERENCE_BLOCK]
    values = [0.0] * len(tensors)
    if small:
        differences = torch._foreach_sub([tensors[i] for i in small], [others[i] for i in small])
        for i, value in zip(small, norms(list(differences))):
            values[i] = value
    for i, (a, b) in enumerate(zip(tensors, others)):
        if a.numel() > DIFFERENCE_BLOCK:
            blocks = zip(a.reshape(-1).split(DIFFERENCE_BLOCK), b.reshape(-1).split(DIFFERENCE_BLOCK))
            values[i] = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x - y) for x, y in blocks]).double()))
    return values
