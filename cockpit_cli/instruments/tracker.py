"""Instruments plus the step records they complete: the piece any training loop plugs in.

The CLI's training loop and the Python API (:mod:`cockpit_cli.api`) both use a
:class:`Tracker`. It runs the backward pass through the instruments, holds each step's record
until its quantities are complete (Alpha's value for step t is known after step t+1), and hands
finished records to ``emit``. If the instruments fail, they are switched off, the step's
gradients are recomputed plainly, and training goes on (a failed collective of data-parallel
training is no instrument failure: it ends the run).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from torch import Tensor
from torch.nn import Module

from cockpit_cli.instruments.batch_inputs import Inputs, call_model, check_inputs
from cockpit_cli.instruments.engine import Instruments
from cockpit_cli.instruments.loss_scale import LossScale, checked_scale, scaled_loss
from cockpit_cli.instruments.sync import is_collective_failure
from cockpit_cli.training.events import StepRecord, names_by_reason


class Tracker:
    """Runs a loop's backward passes through ``instruments`` and emits completed step records.

    Args:
        instruments: The instruments, or ``None`` to track nothing.
        emit: Receives each :class:`StepRecord` once its quantities are complete, in order.
        model: What recomputes the gradients after a failure (default: the instruments' model;
            in data-parallel training, the wrapped model that averages them).
    """

    def __init__(self, instruments: Instruments | None, emit: Callable[[StepRecord], None], model: Module | None = None):
        self.instruments = instruments
        self.model = model
        self.emit = emit
        self.pending: deque[StepRecord] = deque()
        self.failure: str | None = None
        self._unavailable_at_start = set(instruments.unavailable) if instruments is not None else set()
        self._attached = instruments  # kept after a failure: the quantities it switched off
        self._handed_out: set[str] = set()  # warnings returned by new_warnings so far

    def backward(self, step: int, loss: Tensor, inputs: Inputs, outputs: Any, targets: Any, scale: LossScale = 1.0) -> None:
        """Replace ``(scale * loss).backward()``: compute the gradient and every quantity due at ``step``."""
        check_inputs(inputs)  # a caller's mistake, said as such (not an instrument's failure)
        scale = checked_scale(scale)
        if not isinstance(loss, Tensor) or not loss.requires_grad:
            raise RuntimeError(
                f"loss: {'a ' + type(loss).__name__ if not isinstance(loss, Tensor) else 'a tensor without gradients'} cannot be "
                "backpropagated; pass the loss as loss.backward() takes it (computed with gradients on, from the model's outputs)"
            )
        if self.instruments is None:
            scaled_loss(loss, scale).backward()
            return
        try:
            self.instruments.backward(step, loss, inputs, outputs, targets, scale)
        except Exception as error:  # an instrument never ends the run
            if is_collective_failure(error):
                raise
            instruments, self.instruments = self.instruments, None
            self.failure = f"instruments switched off at step {step}: {type(error).__name__}: {error}"
            if "backpropagation quantity" in str(error):
                self.failure += " (curvature quantities need the loss computed by the very loss module given to the instruments)"
            instruments.finish()
            for param in instruments.params:
                param.grad = None
            outputs = call_model(self.model or instruments.model, inputs)
            capture = instruments.capture  # the loss module's value times its factor in the step's loss, as found before the failure
            retry = capture.loss_weight * capture.loss_function(outputs, targets) + capture.regularization_tensor()
            scaled_loss(retry, scale).backward()

    def after_update(self, step: int, record: StepRecord) -> None:
        """Call after ``optimizer.step()``: finish the step's quantities and queue its record."""
        if self.instruments is not None:
            self.instruments.after_update(step)
        self._queue(step, record)

    def skip(self, step: int, record: StepRecord) -> None:
        """Record a step whose update was dropped (no backward pass, no quantities)."""
        if self.instruments is not None:
            self.instruments.skip(step)
        self._queue(step, record)

    def _queue(self, step: int, record: StepRecord) -> None:
        self.pending.append(record)
        if self.instruments is None:
            self.flush()
            return
        values = self.instruments.completed(step)
        while len(self.pending) > self.instruments.lag:  # a record a step, in order: the last lag ones wait
            done = self.pending.popleft()
            done.quantities = values.pop(done.step, {})
            self.emit(done)

    def flush(self) -> None:
        """Emit every queued record (at the end of a run; values still lagging stay missing)."""
        values = self.instruments.finish() if self.instruments is not None else {}
        while self.pending:
            done = self.pending.popleft()
            done.quantities = values.pop(done.step, done.quantities)
            self.emit(done)

    def state_dict(self) -> dict[str, Any]:
        """Return the queued records and the instruments' carried state (for checkpoints)."""
        return {
            "pending": [record.to_dict() for record in self.pending],
            "instruments": self.instruments.state_dict() if self.instruments is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.pending = deque(StepRecord(**record) for record in state["pending"])
        if self.instruments is not None and state.get("instruments") is not None:
            self.instruments.load_state_dict(state["instruments"])

    def warnings(self) -> list[str]:
        """What went wrong without ending the run, in order (the list only grows): each quantity
        switched off during the run (a failing quantity, a curvature factor too large for the
        memory; not one the data leave without a meaning, such as InputStats of token ids, which
        the manifest's unavailable quantities list) with the reason, a change of the way
        per-sample gradients are formed, and the instruments' failure."""
        switched, inapplicable = ({}, set()) if self._attached is None else (self._attached.unavailable, self._attached.inapplicable)
        during_run = {name: reason for name, reason in switched.items() if name not in self._unavailable_at_start | inapplicable}
        found = [f"{', '.join(names)} switched off: {reason}" for reason, names in names_by_reason(during_run).items()]
        changes = [] if self._attached is None else self._attached.changes  # the ways the instruments changed
        return changes + found + ([self.failure] if self.failure else [])  # nothing follows a failure

    def new_warnings(self) -> list[str]:
        """Return the warnings that arose since the last call (to say them when they happen)."""
        fresh = [warning for warning in self.warnings() if warning not in self._handed_out]
        self._handed_out.update(fresh)
        return fresh

    def describe(self) -> dict[str, Any]:
        """What is tracked, for the manifest."""
        return self._attached.describe() if self._attached is not None else {}  # after a failure too
